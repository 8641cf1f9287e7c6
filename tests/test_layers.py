"""The package's layers read downward: each package and root module imports only from the layers below
it, never from its own layer or above, not even inside a function; so there is no import circle, and a
module can be read knowing only what is under it."""

from __future__ import annotations

import ast
from pathlib import Path

import difflab

PACKAGE = Path(difflab.__file__).parent

# Lowest first. Entries of one layer sit side by side: neither imports the other.
LAYERS = [
    ["errors.py", "testhooks.py", "progress.py", "seeds.py"],
    ["files.py", "devices.py", "cpu_threads.py", "batch_memory.py", "layout.py"],
    ["images.py", "plots.py", "memory.py"],
    ["data"],
    ["models"],
    ["workload.py", "scratch.py"],
    ["diffusion", "storage"],
    ["checks.py"],
    ["config.py"],
    ["metrics"],
    ["training"],
    ["app"],
    ["cli"],
    ["__main__.py", "__init__.py"],
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported_modules(path: Path) -> set[str]:
    """The difflab modules `path` imports (`from difflab.x import y` counts y when it is a module)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        names.update(m for m in found if m in MODULES)
    return names


def entry_of(module: str) -> str:
    """The layer entry a module belongs to: its package (difflab.models.x -> models), or its file."""
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__.py"
    return parts[1] if (PACKAGE / parts[1]).is_dir() else parts[1] + ".py"


def test_every_package_and_root_module_has_a_layer():
    entries = [e for layer in LAYERS for e in layer]
    on_disk = {p.name for p in PACKAGE.iterdir() if p.suffix == ".py" or (p.is_dir() and any(p.glob("*.py")))}
    assert sorted(entries) == sorted(set(entries))
    assert set(entries) == on_disk


def test_layers_import_only_from_below():
    level = {e: i for i, layer in enumerate(LAYERS) for e in layer}
    upward = set()
    for module, path in MODULES.items():
        here = entry_of(module)
        for imported in imported_modules(path):
            there = entry_of(imported)
            if there == "__init__.py" or there == here:
                continue
            if level[there] >= level[here]:
                upward.add(f"{path.relative_to(PACKAGE)} imports {imported}")
    assert upward == set()


def test_no_import_circle_between_modules():
    graph = {m: imported_modules(p) - {m} for m, p in MODULES.items()}
    done, on_path, circles = set(), [], []

    def visit(m):
        if m in on_path:
            circles.append(" -> ".join(on_path[on_path.index(m):] + [m]))
            return
        if m in done:
            return
        on_path.append(m)
        for n in sorted(graph[m]):
            visit(n)
        on_path.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)
    assert circles == []


def test_an_upward_import_is_caught(tmp_path):
    """The check reads imports inside functions too."""
    source = tmp_path / "x.py"
    source.write_text("def f():\n    from difflab.training.trainer import train\n", encoding="utf-8")
    assert "difflab.training.trainer" in imported_modules(source)
