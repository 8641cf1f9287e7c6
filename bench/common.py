"""Helpers shared by the benchmarks: machine description and JSON output."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics

import torch

from difflab.devices import cpu_model_name

# The `shapes` text-to-image benchmarks' grid: one column per prompt, the last two combinations held out of
# training.
GRID_PROMPTS = (
    "a large red circle in the centre on a white background",
    "a small blue square at the top left on a black background",
    "a large orange triangle at the bottom right on a grey background",
    "a large green triangle in the centre on a white background",  # held out of training
    "a small purple circle at the top right on a black background",  # held out of training
)


def machine() -> dict:
    info = {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_model_name() or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def median(values: list[float]) -> float:
    return statistics.median(values)


def alternate(runs: dict, repeats: int) -> tuple[dict, dict]:
    """Time each of `runs` (name -> function) `repeats` times, taking turns after one warm-up run each,
    so that a change in the machine's load falls on all of them alike: (median seconds, all times)."""
    import time

    for fn in runs.values():
        fn()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: median(values) for name, values in times.items()}, times


def emit(result: dict) -> None:
    print(json.dumps({**result, "machine": machine()}, indent=2))
