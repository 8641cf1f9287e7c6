"""Which part of a damaged model folder does not load, and why, in words.

diffusers and transformers report a damaged part of a pipeline folder without naming it ("look at the
above report!" with the report in a log nobody sees, or a bare "('added_tokens')"). When a folder fails
to load, each part it names in model_index.json is tried alone: a tokenizer or scheduler is loaded, and
a network's config is built on the meta device (no memory, no time) and its weights' shapes compared
with those in its safetensors files' headers, so the message can name the part, the file and the layer.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

NETWORK_WEIGHTS = ("*.safetensors",)
SHOWN = 2  # mismatched layers named in a message (the rest are counted)


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if isinstance(error, KeyError) or not text:
        return f"{type(error).__name__} {text}".strip()
    return text


def damaged_part(folder: Path) -> str | None:
    """'its text_encoder/ …': the first part of a pipeline folder that does not load, and why; None
    when each part loads alone (the fault is elsewhere)."""
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(index, dict):
        return None
    for name, spec in index.items():
        if name.startswith("_") or not (isinstance(spec, list) and len(spec) == 2 and all(spec)):
            continue
        if not (folder / name).is_dir():
            continue
        problem = part_problem(folder / name, *spec)
        if problem:
            return f"its {name}/ {problem}"
    return None


def part_problem(path: Path, library: str, class_name: str) -> str | None:
    """Why the part in `path` (a `library.class_name`) does not load; None when it does."""
    try:
        cls = getattr(importlib.import_module(library), class_name)
    except (ImportError, AttributeError):
        return None
    try:
        if not hasattr(cls, "config_class") and not hasattr(cls, "load_config") or "Tokenizer" in class_name:
            cls.from_pretrained(str(path))  # a tokenizer, scheduler or image processor: loading is the check
            return None
        mismatch = shape_mismatch(path, cls)
        if mismatch:
            return mismatch
        cls.from_pretrained(str(path), use_safetensors=True)
    except Exception as e:  # whatever a damaged part makes the libraries raise, it is this part's fault
        return f"cannot be loaded ({first_line(e)})"
    return None


def shape_mismatch(path: Path, cls) -> str | None:
    """'does not fit its weights: …' when the network its config.json builds has layers of other shapes
    than its safetensors files hold."""
    import torch
    from safetensors import safe_open

    files = sorted(f for pattern in NETWORK_WEIGHTS for f in path.glob(pattern))
    if not files:
        return None
    with torch.device("meta"):
        if hasattr(cls, "load_config"):  # diffusers
            network = cls.from_config(cls.load_config(str(path)))
        else:  # transformers
            network = cls(cls.config_class.from_pretrained(str(path)))
    wanted = {_plain(k): tuple(v.shape) for k, v in network.state_dict().items()}
    problems = []
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                shape = tuple(f.get_slice(key).get_shape())
                want = wanted.get(_plain(key))
                if want is not None and want != shape:
                    problems.append(f"{key} is {_size(shape)} in {file.name} and {_size(want)} by config.json")
    if not problems:
        return None
    more = f" (and {len(problems) - SHOWN} more)" if len(problems) > SHOWN else ""
    return f"does not fit its weights: {'; '.join(problems[:SHOWN])}{more}"


def _plain(key: str) -> str:
    """A layer's name without the wrapper prefix transformers versions disagree on."""
    return key.removeprefix("text_model.")


def _size(shape: tuple) -> str:
    return "×".join(map(str, shape)) or "a scalar"
