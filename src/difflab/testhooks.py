"""Test-only hooks, switched on by environment variables that only difflab's tests set.

Unset (always, in real use), every function here returns at once and does nothing.

- `DIFFLAB_TEST_PAUSE_AT=POINT` with `DIFFLAB_TEST_PAUSED_FILE=PATH`: when the process reaches the
  named point (a `pause_point(...)` call, for example "step_00000004:renamed" in the checkpoint
  writer), it creates PATH and waits there to be killed, so that tests/test_crash.py can SIGKILL it
  at exactly that moment.
- `DIFFLAB_TEST_REPORT_DIR=DIR`: every training process records the files it writes in the run
  folder and, when training ends, writes `DIR/rank<N>.json` with digests of its weights and EMA and
  its step counts (tests/test_multiprocess.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

PAUSE_AT = "DIFFLAB_TEST_PAUSE_AT"
PAUSED_FILE = "DIFFLAB_TEST_PAUSED_FILE"
REPORT_DIR = "DIFFLAB_TEST_REPORT_DIR"
PAUSE_SECONDS = 120  # the test kills the process long before this; if it does not, give up loudly

_WRITE_EVENTS = {"os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"}
_writes: set[str] = set()


def pause_point(name: str) -> None:
    """Wait here to be killed if a test asked for this point (see the module docstring)."""
    if os.environ.get(PAUSE_AT) != name:
        return
    Path(os.environ[PAUSED_FILE]).touch()
    time.sleep(PAUSE_SECONDS)
    print(f"difflab test hook: nobody killed the process at {name}", file=sys.stderr)
    os._exit(3)


def watch_writes(root: str | Path) -> None:
    """Record every file operation that changes something under `root` (Python's audit events)."""
    if not os.environ.get(REPORT_DIR):
        return
    root = os.path.abspath(root)

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(
                flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC))
            paths = [path] if writing else []
        elif event in _WRITE_EVENTS:
            paths = list(args[:2]) if event in ("os.rename", "os.replace") else [args[0]]
        else:
            return
        for path in paths:
            if isinstance(path, (str, bytes, os.PathLike)):
                path = os.path.abspath(os.fsdecode(path))
                if path == root or path.startswith(root + os.sep):
                    _writes.add(f"{event} {os.path.relpath(path, root)}")

    sys.addaudithook(hook)


def report(trainer) -> None:
    """Write this process's digests and the files it wrote (see the module docstring)."""
    folder = os.environ.get(REPORT_DIR)
    if not folder:
        return
    ema = trainer.ema
    info = {
        "rank": trainer.accelerator.process_index,
        "world_size": trainer.accelerator.num_processes,
        "step": trainer.state.step,
        "ema_step": ema.optimization_step if ema is not None else None,
        "weights": _digest(trainer.model.denoiser.state_dict().values()),
        "ema": _digest(ema.shadow_params) if ema is not None else None,
        "writes": sorted(_writes),
    }
    path = Path(folder) / f"rank{info['rank']}.json"
    path.write_text(json.dumps(info, indent=1), encoding="utf-8")


def _digest(tensors) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
