"""The run's `Accelerator`: device, mixed precision and trackers, fresh for each run."""

from __future__ import annotations

from pathlib import Path

from difflab.config import TrainConfig
from difflab.devices import auto_precision
from difflab.training.reporting import TRACKER_FOLDER


def mixed_precision(choice: str, device: str = "auto") -> str:
    """auto: what runs fast on the device (devices.auto_precision); otherwise the choice itself."""
    return auto_precision(device) if choice == "auto" else choice


def make_accelerator(config: TrainConfig, out: str | Path | None = None):
    """A fresh Accelerator for this run. accelerate keeps one state per process and refuses a second
    run with other settings (say, another precision); clearing its per-run part, not the distributed
    part, lets one process train several runs (a notebook, the tests). Trackers (`--log-with`) write
    under the run folder `out`."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # private API, but the only way to a second run with other settings in one process (pinned by
    # tests/test_training.py::test_one_process_trains_runs_of_different_precisions)
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    trackers = {}
    if config.run.log_with:
        trackers = {"log_with": config.run.log_with, "project_dir": str(Path(out) / TRACKER_FOLDER)}
    return Accelerator(cpu=config.run.device == "cpu",
                       mixed_precision=mixed_precision(config.optim.precision, config.run.device), **trackers)
