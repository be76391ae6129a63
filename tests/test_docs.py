"""The Python examples in docs/*.md run as written."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

DOCS = sorted((Path(__file__).resolve().parent.parent / "docs").glob("*.md"))


@pytest.mark.parametrize("page", DOCS, ids=[page.name for page in DOCS])
def test_doc_examples_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL)
    monkeypatch.chdir(tmp_path)
    module = types.ModuleType(f"docs_{page.stem.replace('-', '_')}")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    for block in blocks:
        exec(compile(block, str(page), "exec"), module.__dict__)


def test_typed_usage_examples_run() -> None:
    """tests/typing_examples.py is checked by mypy and must also run."""
    import typing_examples

    assert typing_examples.use() == 3  # balance 1, row balance 1, one row
