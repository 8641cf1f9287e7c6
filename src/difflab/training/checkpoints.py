"""Full training checkpoints that an interrupted write can never break.

A checkpoint is a folder `step_XXXXXXXX/` of safetensors files plus `state.json`, which is written
last and holds each file's SHA-256. It is assembled under a hidden `.partial` name and renamed into
place only when complete, and the `latest` pointer is replaced atomically after that. Loading
verifies the checksums and falls back to the newest intact checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from difflab.errors import TrainingError

log = logging.getLogger("difflab")

STATE_FILE = "state.json"
LATEST_FILE = "latest"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(root: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict,
                    keep: int) -> Path:
    """Write groups of tensors (one safetensors file each) and a JSON state; keep the `keep` newest."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    if not (final / STATE_FILE).is_file():
        partial = root / f".{final.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        files = {}
        for group, group_tensors in tensors.items():
            path = partial / f"{group}.safetensors"
            save_file({k: v.detach().cpu().contiguous() for k, v in group_tensors.items()}, str(path))
            _fsync(path)
            files[path.name] = _sha256(path)
        write_text_atomic(partial / STATE_FILE, json.dumps({**state, "step": step, "files": files}, indent=1))
        _fsync(partial)
        shutil.rmtree(final, ignore_errors=True)  # an incomplete leftover of an earlier crash
        os.rename(partial, final)
        _fsync(root)
    write_text_atomic(root / LATEST_FILE, final.name + "\n")
    prune(root, keep)
    return final


def prune(root: Path, keep: int) -> None:
    complete = sorted(p for p in root.glob("step_*") if (p / STATE_FILE).is_file())
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in root.glob(".step_*.partial"):
        shutil.rmtree(leftover, ignore_errors=True)


def verify(path: Path) -> dict | None:
    """The checkpoint's state if it is complete and every file matches its checksum, else None."""
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        if all(_sha256(path / name) == digest for name, digest in state["files"].items()):
            return state
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def find_latest(root: Path) -> Path | None:
    """The newest intact checkpoint: the one `latest` names, or else the newest that verifies."""
    if not root.is_dir():
        return None
    candidates = sorted(root.glob("step_*"), reverse=True)
    pointer = root / LATEST_FILE
    if pointer.is_file():
        named = root / pointer.read_text(encoding="utf-8").strip()
        candidates = [named] + [c for c in candidates if c != named]
    for candidate in candidates:
        if verify(candidate) is not None:
            return candidate
        if candidate.exists():
            log.warning("checkpoint %s is incomplete or damaged; skipping it", candidate)
    return None


def load_checkpoint(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    state = verify(path)
    if state is None:
        raise TrainingError(f"checkpoint {path} is incomplete or damaged; delete it to resume from an earlier one")
    tensors = {name.removesuffix(".safetensors"): load_file(str(path / name)) for name in state["files"]}
    return tensors, state


# ---- optimizer state <-> tensors + JSON ------------------------------------------------------------

def flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, values in state_dict["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}
