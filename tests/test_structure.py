"""The package's shape, checked: no import cycle between its modules, no private name
imported from another module, and no module over 400 lines without its reason written
at its top (a line ``# Long: <why>`` in its first lines). A new maintainer reads the
folder list as the architecture; these keep it that way."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "incident"
MAX_LINES = 400


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path) -> list[tuple[str, str | None]]:
    """(module imported, name imported from it or None) for every import in ``path``,
    TYPE_CHECKING ones and those inside functions included."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found += [(module, alias.name) for alias in node.names]
    return found


def test_no_import_cycles() -> None:
    mods = modules()
    edges: dict[str, set[str]] = {name: set() for name in mods}
    for name, path in mods.items():
        for module, imported in imports(name, path):
            for target in (f"{module}.{imported}", module):
                if target in mods and target != name:
                    edges[name].add(target)
                    break
    cycles = []
    for start in mods:
        # a path back to ``start`` through its imports is a cycle
        seen, stack = set(), [(start, [start])]
        while stack:
            node, trail = stack.pop()
            for nxt in edges[node]:
                if nxt == start:
                    cycles.append(" -> ".join([*trail, start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*trail, nxt]))
    # a package importing its own submodules (its __init__ re-exporting) is no cycle
    real = [c for c in cycles if not _package_reexport(c)]
    assert not real, "import cycles:\n" + "\n".join(sorted(set(real)))


def _package_reexport(cycle: str) -> bool:
    steps = cycle.split(" -> ")
    return any(b.startswith(a + ".") for a, b in itertools.pairwise(steps))


def test_no_private_name_is_imported_across_modules() -> None:
    offenders = [
        f"{name} imports {imported} from {module}"
        for name, path in modules().items()
        for module, imported in imports(name, path)
        if module.startswith("incident")
        and imported is not None
        and imported.startswith("_")
        and not imported.startswith("__")
    ]
    assert not offenders, "\n".join(offenders)


def test_long_modules_say_why() -> None:
    unexplained = []
    for name, path in modules().items():
        lines = path.read_text().splitlines()
        if len(lines) > MAX_LINES and not any(line.startswith("# Long: ") for line in lines[:15]):
            unexplained.append(f"{name}: {len(lines)} lines")
    assert not unexplained, (
        f"over {MAX_LINES} lines without a '# Long: <why>' line at the top:\n"
        + "\n".join(unexplained)
    )
