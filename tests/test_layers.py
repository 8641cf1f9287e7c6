"""The package's layers read downward: models, sampling, data and the file helpers never import the
modules built on them (pipelines, training, metrics, the CLI, the demo), not even inside a function,
so there is no import circle to trip over."""

from __future__ import annotations

import ast
from pathlib import Path

import difflab

PACKAGE = Path(difflab.__file__).parent
LOWER = ["models", "diffusion", "data", "files.py", "images.py", "config.py", "devices.py", "errors.py"]
UPPER = ("difflab.pipelines", "difflab.training", "difflab.metrics", "difflab.cli", "difflab.app")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_lower_layers_never_import_upper_ones():
    files = [p for name in LOWER for p in ((PACKAGE / name).rglob("*.py") if (PACKAGE / name).is_dir()
                                           else [PACKAGE / name])]
    assert len(files) > 20
    upward = {f"{p.relative_to(PACKAGE)} imports {m}" for p in files for m in imported_modules(p)
              if m.startswith(UPPER)}
    assert upward == set()


def test_the_scratch_model_finds_its_folder_helpers_below_it():
    imported = imported_modules(PACKAGE / "models" / "scratch_model.py")
    assert "difflab.files" in imported and not any(m.startswith("difflab.pipelines") for m in imported)
