"""How many CPU threads difflab's work uses.

PyTorch takes every core. That is fastest on a machine left to the job, and many times slower on one
where other work holds some of the cores: each of PyTorch's threads waits at every operation for the
one the system put aside, and difflab's small networks run many short operations (measured on 2 cores
beside one busy process: docs/benchmarks.md, "Threads"). So by default difflab uses the cores that
other work leaves free — measured over a quarter of a second as it starts (/proc/stat; the load
average where there is none, which lags a minute behind) — and says so; `--threads N` chooses, and an
OMP_NUM_THREADS in the environment is taken as the user's choice too.
"""

from __future__ import annotations

import os
import time

from difflab.errors import ConfigError

SAMPLE_SECONDS = 0.25


def usable_cores() -> set[int]:
    """The cores this process may run on (its CPU affinity: taskset, a container's cpuset)."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def busy_cores(cores: set[int], seconds: float = SAMPLE_SECONDS, stat: str = "/proc/stat") -> float | None:
    """How many of `cores` other work keeps busy now: their busy share over `seconds` (this process sleeps
    meanwhile) from /proc/stat; the one-minute load average where that cannot be read; None where
    neither can."""
    def busy_and_total() -> tuple[int, int]:
        busy = total = 0
        with open(stat, encoding="ascii") as f:
            for line in f:
                name, *values = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cores:
                    ticks = [int(v) for v in values]
                    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle and iowait
                    busy, total = busy + sum(ticks) - idle, total + sum(ticks)
        return busy, total

    try:
        busy, total = busy_and_total()
        time.sleep(seconds)
        busy2, total2 = busy_and_total()
        if total2 > total:
            return len(cores) * (busy2 - busy) / (total2 - total)
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def choose_threads(requested: int | None, *, cores: int, load: float | None, environment: str | None
                   ) -> tuple[int | None, str | None]:
    """(threads to use, or None to leave PyTorch's choice; a note for the log, or None). `requested` is
    --threads; `environment` is OMP_NUM_THREADS; `load` the cores other work keeps busy (busy_cores)."""
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ConfigError(f"--threads must be a whole number, at least 1 (got {requested!r})")
        return requested, None
    if environment or load is None or cores < 2:
        return None, None
    busy = min(cores - 1, round(load))  # cores other work holds; one is always left to this job
    if busy < 1:
        return None, None
    threads = cores - busy
    return threads, (f"the machine is busy (other work keeps {load:.1f} of {cores} cores busy): using {threads} "
                     f"of {cores} threads, which is faster beside other work; --threads {cores} to use all")


def set_threads(requested: int | None) -> str | None:
    """Choose and set PyTorch's thread count for this process; the note to log, if any."""
    environment, cores = os.environ.get("OMP_NUM_THREADS"), usable_cores()
    measure = requested is None and not environment and len(cores) > 1  # the quarter second only where it decides
    threads, note = choose_threads(requested, cores=len(cores), load=busy_cores(cores) if measure else None,
                                   environment=environment)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    return note
