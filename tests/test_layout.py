"""The package's layers: each imports only from itself and the layers before it, the real data loader never imports
the demo generator, and no source file grows past 450 lines."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
# In import order: a module may import from its own layer and from those before it. The demo generator sits beside
# the data layer (it writes data in the competition's layout) and is imported only by commands that make demo data.
LAYERS = ["core", "data", "demo", "model", "inference", "training", "pipeline", "tools", "cli"]
MAX_LINES = 450


def layer_of(module: str) -> str:
    """The layer of src.LAYER.module; the modules at the top (cli.py, environment.py: the entry points) are 'cli'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and (SRC / parts[1]).is_dir() else "cli"


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import of a module of the package in the file, lazy ones included."""
    module = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[:len(package.split(".")) - node.level + 1]
            found.append((node.lineno, ".".join(base + ([node.module] if node.module else []))))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("src."):
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("src.")]
    return found


SOURCES = sorted(SRC.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: str(path.relative_to(SRC)))
def test_no_import_runs_upward(path):
    here = layer_of(".".join(path.relative_to(SRC.parent).with_suffix("").parts))
    for line, module in imported_modules(path):
        there = layer_of(module)
        assert LAYERS.index(there) <= LAYERS.index(here), f"{path.relative_to(SRC)}:{line} imports {module}"


def test_the_data_loader_does_not_import_the_demo_generator():
    for path in (SRC / "data").rglob("*.py"):
        assert not [module for _, module in imported_modules(path) if module.startswith("src.demo")], path


def test_every_layer_is_a_package_and_no_file_is_longer_than_450_lines():
    assert sorted(p.name for p in SRC.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(LAYERS[:-1])
    long = {str(path.relative_to(SRC)): n for path in SOURCES if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long
