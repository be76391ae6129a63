"""``python -m incident`` runs the CLI."""

from .cli import main

main(prog_name="incident")
