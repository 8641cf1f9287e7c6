"""How many CPU threads difflab's work uses.

PyTorch takes every core. That is fastest on a machine left to the job, and many times slower on one
where other work holds some of the cores: each of PyTorch's threads waits at every operation for the
one the system put aside, and difflab's small networks run many short operations (measured on 2 cores
beside one busy process: docs/benchmarks.md, "Threads"). So by default difflab uses the cores that
other work leaves free, as the load average tells, and says so; `--threads N` chooses, and an
OMP_NUM_THREADS in the environment is taken as the user's choice too.
"""

from __future__ import annotations

import os

from difflab.errors import ConfigError


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity; a container's limit where it sets one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def choose_threads(requested: int | None, *, cores: int, load: float | None, environment: str | None
                   ) -> tuple[int | None, str | None]:
    """(threads to use, or None to leave PyTorch's choice; a note for the log, or None). `requested` is
    --threads; `environment` is OMP_NUM_THREADS; `load` the one-minute load average (other work: this
    process has only just started)."""
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
    return threads, (f"the machine is busy (load average {load:.1f} on {cores} cores): using {threads} of "
                     f"{cores} threads, which is faster beside other work; --threads {cores} to use all")


def set_threads(requested: int | None) -> str | None:
    """Choose and set PyTorch's thread count for this process; the note to log, if any."""
    threads, note = choose_threads(requested, cores=usable_cores(), load=load_average(),
                                   environment=os.environ.get("OMP_NUM_THREADS"))
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    return note
