"""What the benchmark scripts share: their command line.

Each script is run as ``python benchmarks/<name>.py``, which puts this folder on the path,
so they ``import common``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

#: the server the Postgres benchmarks use unless told otherwise: the test suite's
LOCAL_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_POSTGRES_URL = os.environ.get("INCIDENT_TEST_POSTGRES_URL", LOCAL_POSTGRES_URL)


def parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser whose description is the first paragraph of the script's docstring."""
    return argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])


def add_postgres_url(parser: argparse.ArgumentParser, flag: str, help: str) -> None:
    """The server to measure (default: $INCIDENT_TEST_POSTGRES_URL, else a local one;
    help names the variable, not its value, which may hold a password)."""
    parser.add_argument(
        flag,
        default=DEFAULT_POSTGRES_URL,
        help=f"{help} (default: $INCIDENT_TEST_POSTGRES_URL, else {LOCAL_POSTGRES_URL})",
    )


def add_dir(parser: argparse.ArgumentParser, help: str) -> None:
    """``--dir``: where the SQLite files go; None when not given."""
    parser.add_argument("--dir", type=Path, default=None, help=help)


def add_workers(parser: argparse.ArgumentParser, *, commands: int) -> None:
    """``--commands`` per worker, ``--workers`` (process counts, e.g. 1,8: a list of ints
    once parsed) and ``--rounds``, for the benchmarks that scale over processes."""
    parser.add_argument("--commands", type=int, default=commands, help="per worker")
    parser.add_argument(
        "--workers", type=_counts, default="1,8", help="comma-separated process counts"
    )
    parser.add_argument("--rounds", type=int, default=3)


def with_schema(url: str, schema: str) -> str:
    """The Postgres URL naming ``schema`` (the store's ``?schema=`` option)."""
    return f"{url}{'&' if '?' in url else '?'}schema={schema}"


def _counts(text: str) -> list[int]:
    return [int(n) for n in text.split(",")]
