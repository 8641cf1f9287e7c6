"""`difflab train ARGS...` as tests/test_multiprocess.py runs it under `accelerate launch`, reporting what
each process did: writes REPORT_DIR/rank<N>.json (REPORT_DIR from the DIFFLAB_TEST_REPORT_DIR variable)
with digests of its weights and moving average, its step counts, and every file operation it made
under the run folder (recorded with a Python audit hook, installed here and never by difflab).

    python tests/helpers/train_and_report.py train --out RUN [difflab train flags...]
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from difflab.cli import build_parser, setup_logging
from difflab.cli.train import resolve_config
from difflab.training.signals import Stopped, stop_signals
from difflab.training.trainer import Trainer

WRITE_EVENTS = {"os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"}


def record_writes(root: Path) -> set[str]:
    """A set that fills with every file operation changing something under `root` (Python's audit events)."""
    root_text = os.path.abspath(root)
    writes: set[str] = set()

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(
                flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC))
            paths = [path] if writing else []
        elif event in WRITE_EVENTS:
            paths = list(args[:2]) if event in ("os.rename", "os.replace") else [args[0]]
        else:
            return
        for path in paths:
            if isinstance(path, (str, bytes, os.PathLike)):
                path = os.path.abspath(os.fsdecode(path))
                if path == root_text or path.startswith(root_text + os.sep):
                    writes.add(f"{event} {os.path.relpath(path, root_text)}")

    sys.addaudithook(hook)
    return writes


def digest(tensors) -> str:
    sha = hashlib.sha256()
    for t in tensors:
        sha.update(t.detach().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet)
    config, out = resolve_config(args)
    writes = record_writes(out)
    with stop_signals():  # as difflab.training.trainer.train: SIGTERM and SIGHUP save a checkpoint
        trainer = Trainer(config, out, resume=args.resume, overwrite=args.overwrite)
        try:
            trainer.fit()
        finally:
            trainer.stream.close()
    ema = trainer.ema
    report = {
        "rank": trainer.accelerator.process_index,
        "world_size": trainer.accelerator.num_processes,
        "step": trainer.state.step,
        "ema_step": ema.optimization_step if ema is not None else None,
        "weights": digest(trainer.model.denoiser.state_dict().values()),
        "ema": digest(ema.shadow_params) if ema is not None else None,
        "writes": sorted(writes),
    }
    path = Path(os.environ["DIFFLAB_TEST_REPORT_DIR"]) / f"rank{report['rank']}.json"
    path.write_text(json.dumps(report, indent=1), encoding="utf-8")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except Stopped as stopped:  # what the difflab command does with it
        print(f"difflab: stopped by {stopped}", file=sys.stderr)
        sys.exit(stopped.exit_status)
