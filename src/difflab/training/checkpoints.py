"""Full training checkpoints that an interrupted write can never break.

A checkpoint is a folder `step_XXXXXXXX/` of safetensors files plus `state.json`, which is written
last and holds each file's SHA-256. It is assembled under a hidden `.partial` name and renamed into
place only when complete, and the `latest` pointer is replaced atomically after that. Old
checkpoints are renamed to a hidden `.deleting` name before they are deleted, so a visible
`step_*` folder is always a complete checkpoint. Loading verifies the checksums and takes the newest
intact checkpoint. A failed write (disk full, read-only folder) is a `TrainingError` that leaves the
earlier checkpoints as they were.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from difflab.errors import TrainingError
from difflab.files import safetensors_os_error, write_text_atomic
from difflab.testhooks import pause_point  # test-only: a no-op unless a crash test asks to stop there

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


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    except SafetensorError as e:
        raise safetensors_os_error(e, path) from None


def last_good(root: Path) -> str:
    """For error messages: the checkpoint that --resume would continue from."""
    last = find_latest(root)
    return f"the last good checkpoint, {last.name}, is intact" if last else "no checkpoint was saved yet"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(root: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict,
                    keep: int) -> Path:
    """Write groups of tensors (one safetensors file each) and a JSON state; keep the `keep` newest."""
    final = root / checkpoint_name(step)
    try:
        if verify(final) is None:  # not there yet, or a damaged leftover of an earlier crash
            _assemble(root, final, step, tensors, state)
        write_text_atomic(root / LATEST_FILE, final.name + "\n")
        pause_point(f"{final.name}:latest-written")
    except OSError as e:
        shutil.rmtree(root / f".{final.name}.partial", ignore_errors=True)  # give back the space it took
        raise TrainingError(
            f"could not write checkpoint {final} ({e.strerror or e}); {last_good(root)}: free some disk space "
            f"or make {root} writable, then run again with --resume"
        ) from None
    prune(root, keep)
    return final


def _assemble(root: Path, final: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict) -> None:
    partial = root / f".{final.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    pause_point(f"{final.name}:started")
    files = {}
    for group, group_tensors in tensors.items():
        path = partial / f"{group}.safetensors"
        save_tensors(group_tensors, path)
        _fsync(path)
        files[path.name] = _sha256(path)
        pause_point(f"{final.name}:{group}-written")
    write_text_atomic(partial / STATE_FILE, json.dumps({**state, "step": step, "files": files}, indent=1))
    _fsync(partial)
    pause_point(f"{final.name}:state-written")
    if final.exists():  # damaged: move it out of the way, so that a visible step_* is always complete
        _remove(final)
    os.rename(partial, final)
    _fsync(root)
    pause_point(f"{final.name}:renamed")


def _remove(checkpoint: Path) -> None:
    """Hide a checkpoint first (one atomic rename), then delete it: a crash halfway leaves only a
    hidden leftover, never a visible half-deleted checkpoint."""
    doomed = checkpoint.with_name(f".{checkpoint.name}.deleting")
    shutil.rmtree(doomed, ignore_errors=True)
    os.rename(checkpoint, doomed)
    pause_point(f"{checkpoint.name}:hidden-for-deletion")
    shutil.rmtree(doomed, ignore_errors=True)


def prune(root: Path, keep: int) -> None:
    """Delete all but the `keep` newest complete checkpoints, and leftovers of interrupted writes."""
    complete = sorted(p for p in root.glob("step_*") if (p / STATE_FILE).is_file())
    try:
        for old in complete[:-keep]:
            _remove(old)
    except OSError as e:  # the new checkpoint is safe; an old one left behind is only clutter
        log.warning("could not delete an old checkpoint in %s (%s)", root, e.strerror or e)
    for leftover in [*root.glob(".step_*.partial"), *root.glob(".step_*.deleting")]:
        shutil.rmtree(leftover, ignore_errors=True)


def verify(path: Path) -> dict | None:
    """The checkpoint's state if it is complete and every file matches its checksum, else None."""
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        if all(_sha256(path / name) == digest for name, digest in state["files"].items()):
            return state
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def find_latest(root: Path) -> Path | None:
    """The newest intact checkpoint. `latest` names it too, but is written after the checkpoint, so a
    crash in between may leave it one behind; the checkpoints themselves decide."""
    if not root.is_dir():
        return None
    for candidate in sorted(root.glob("step_*"), reverse=True):
        if verify(candidate) is not None:
            return candidate
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
    """An optimizer's state as tensors (`INDEX.KEY`, and `INDEX.KEY/INNER` for a nested dict such as
    bitsandbytes' quantisation state) and JSON for the rest."""
    tensors, scalars = {}, {}
    for index, values in state_dict["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value
            elif isinstance(value, dict):
                for inner, v in value.items():
                    if torch.is_tensor(v):
                        tensors[f"{index}.{key}/{inner}"] = v
                    else:
                        scalars.setdefault(str(index), {}).setdefault(key, {})[inner] = v
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        if "/" in key:
            key, inner = key.split("/", 1)
            state.setdefault(int(index), {}).setdefault(key, {})[inner] = value
        else:
            state.setdefault(int(index), {})[key] = value
    for index, values in meta["scalars"].items():
        for key, value in values.items():
            if isinstance(value, dict):
                state.setdefault(int(index), {}).setdefault(key, {}).update(value)
            else:
                state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}
