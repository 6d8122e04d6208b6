"""The package layout says which way dependencies run: the store model
(castore) knows neither workers nor supervisor, and a worker never reaches up
into its supervisor's package. Checked on the source, import by import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import tvix_mountd

PACKAGE = Path(tvix_mountd.__file__).parent

# Package -> the tvix_mountd subpackages it must not import from.
FORBIDDEN = {
    "castore": ("tvix_mountd.workers", "tvix_mountd.supervisor"),
    "workers": ("tvix_mountd.supervisor",),
}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in `path`, nested and relative
    ones included."""
    package = ["tvix_mountd", *path.parent.relative_to(PACKAGE).parts]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.append((node.lineno, module))
    return found


@pytest.mark.parametrize("subpackage", sorted(FORBIDDEN))
def test_dependencies_run_one_way(subpackage: str) -> None:
    files = sorted((PACKAGE / subpackage).rglob("*.py"))
    assert files, subpackage
    wrong = [
        f"{path.relative_to(PACKAGE)}:{line}: {module}"
        for path in files
        for line, module in _imports(path)
        if module.startswith(FORBIDDEN[subpackage])
    ]
    assert wrong == [], wrong
