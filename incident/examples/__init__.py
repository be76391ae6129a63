"""Example applications built with incident."""
