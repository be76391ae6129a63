"""The Python examples in docs/*.md run as written."""

from __future__ import annotations

import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
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
    assert typing_examples.use_subscriptions() == 1 + 0 + 0 + 2  # checkpoint, row balance


CONTINUES = "# continues the example above"
PAGES = [README, *DOCS]


def _blocks_of(page: Path) -> list[tuple[int, str]]:
    """(line number, code) of each ```python block of a page."""
    text = page.read_text()
    return [
        (text.count("\n", 0, match.start()) + 2, match.group(1))
        for match in re.finditer(r"```python\n(.*?)```", text, flags=re.DOTALL)
    ]


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_a_block_that_needs_an_earlier_one_says_so(
    page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader who copies one block gets a program that runs, or is told by its first
    line that it continues an earlier one: run alone, an unmarked block defines every
    name it uses."""
    monkeypatch.chdir(tmp_path)
    unmarked = []
    for line, block in _blocks_of(page):
        if block.startswith(CONTINUES):
            continue
        module = types.ModuleType(f"alone_{page.stem.replace('-', '_')}_{line}")
        monkeypatch.setitem(sys.modules, module.__name__, module)
        try:
            exec(compile(block, f"{page.name}:{line}", "exec"), module.__dict__)
        except NameError as error:
            unmarked.append(f"line {line} uses {error.name!r}")
        except Exception:
            pass  # fails alone for another reason (a file an earlier block wrote, say)
    assert not unmarked, f"{page.name}: start these blocks with {CONTINUES!r}: {unmarked}"


TESTING = Path(__file__).resolve().parent.parent / "docs" / "testing.md"


@pytest.mark.parametrize(
    "line, block",
    [
        pytest.param(line, block, id=f"testing.md:{line}")
        for line, block in _blocks_of(TESTING)
        if "incident.testing.contract" in block
    ],
)
def test_the_store_contract_examples_pass_under_pytest(
    line: int, block: str, tmp_path: Path
) -> None:
    """docs/testing.md's third-party store test modules, saved as files and run by
    pytest as a user would, run the contract's tests and pass every one."""
    (tmp_path / "test_example.py").write_text(block)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr
    assert run.returncode == 0, f"testing.md:{line}: {summary}\n{run.stdout[-3000:]}"
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 20, summary
    assert "skipped" not in summary and "failed" not in summary, summary
