"""Every notebook runs top to bottom, so a notebook that breaks fails the suite."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))


def test_the_notebooks_are_there() -> None:
    names = [path.name for path in PATHS]
    assert len(names) >= 4, names


@pytest.mark.parametrize("path", PATHS, ids=lambda path: path.stem)
def test_notebook_runs(path: Path, tmp_path: Path) -> None:
    """Run in a scratch copy of the repository layout: databases and the saved figure
    land in the temporary directory, never in the checkout."""
    work = tmp_path / "notebooks"
    work.mkdir()
    (tmp_path / "docs").mkdir()
    shutil.copy(path, work / path.name)
    notebook = nbformat.read(work / path.name, as_version=4)
    client = NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=240,
        resources={"metadata": {"path": str(work)}},
    )
    client.execute()  # raises CellExecutionError, naming the cell, when one fails
    if "savefig" in path.read_text():
        figures = list((tmp_path / "docs").glob("*.png"))
        assert figures, "the notebook saves its figure for the README"
        assert all(0 < figure.stat().st_size < 200_000 for figure in figures)


@pytest.mark.parametrize("path", PATHS, ids=lambda path: path.stem)
def test_committed_outputs_are_small(path: Path) -> None:
    """Outputs stay readable in a diff: no inline images, no big dumps."""
    notebook = json.loads(path.read_text())
    assert path.stat().st_size < 60_000
    for cell in notebook["cells"]:
        for output in cell.get("outputs", []):
            assert "image/png" not in output.get("data", {}), "save figures to docs/ instead"
