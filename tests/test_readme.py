"""The README's Python examples run as written, so they cannot drift from the code."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    text = README.read_text()
    # ```python blocks are programs; illustrations are fenced as ```py
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_the_readme_has_runnable_examples() -> None:
    assert len(python_blocks()) >= 3


def test_readme_examples_run_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks run one after another in one namespace, as a reader would paste them."""
    monkeypatch.chdir(tmp_path)
    # a real module, so msgspec can resolve the annotations of classes defined in it
    module = types.ModuleType("readme_examples")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    for block in python_blocks():
        exec(compile(block, str(README), "exec"), module.__dict__)
