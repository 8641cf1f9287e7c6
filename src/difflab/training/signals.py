"""SIGTERM and SIGHUP stop training the way Ctrl-C does: a checkpoint is saved, then the process exits
with the conventional status 128 + the signal's number.

Job schedulers (Slurm, Kubernetes, `docker stop`, torchrun's agent) stop a process with SIGTERM, and a
closed terminal sends SIGHUP; by default either kills the run on the spot. Inside `stop_signals()`
they raise `Stopped`, a KeyboardInterrupt, so the trainer's Ctrl-C path (save a checkpoint, re-raise)
serves them too.

While training steps run, the signal only sets a flag, and the loop stops at the end of the step
(`stop_if_signalled`, called after each step): a step is never cut in half, so the checkpoint and
metrics.csv agree, and a resumed run is exact. With several processes, raising wherever the signal
lands would also leave them in different collective operations (one in a gradient all-reduce, another
saving a checkpoint), and they would hang; there every process asks, once per step, whether any
process was signalled, and all of them stop after the same step. Before the first step (loading
data, building the model) and after the last (the final grid, evaluation and model) the signal raises
at once.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading

log = logging.getLogger("difflab")

SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Stopped(KeyboardInterrupt):
    """Raised for SIGTERM or SIGHUP; `exit_status` is the shell's convention, 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_status = 128 + signum


class _Watch:
    received: int | None = None  # the first signal that arrived
    stepping = False  # training steps have started: only note the signal (see stop_if_signalled)
    group = None  # several processes: a CPU (gloo) process group for the per-step question, made on first use


_watch = _Watch()


def _handle(signum, frame) -> None:
    if _watch.received is not None:
        return  # stopping already: let the checkpoint being saved finish
    _watch.received = signum
    log.warning("received %s: stopping once the run's state is saved", signal.Signals(signum).name)
    if not _watch.stepping:
        raise Stopped(signum)


@contextlib.contextmanager
def stop_signals():
    """Turn SIGTERM and SIGHUP into `Stopped` inside the block; the previous handlers come back after
    it. Outside the main thread (where Python cannot set handlers) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handle) for s in SIGNALS}
    _watch.received, _watch.group, _watch.stepping = None, None, False
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _watch.received, _watch.group, _watch.stepping = None, None, False


def stop_if_signalled(last: bool = False) -> None:
    """Called at the end of every training step: raise `Stopped` if this process was signalled or, with
    several processes, if any of them was (one all-reduce of a single number, on the CPU). After the
    `last` step (the final grid, evaluation and model follow, which may take long), a signal raises at
    once again."""
    _watch.stepping = not last
    if not _several_processes():
        if _watch.received is not None:
            raise Stopped(_watch.received)
        return
    import torch
    import torch.distributed as dist

    if _watch.group is None:  # the same call on every process, at the same step
        _watch.group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    flag = torch.tensor([_watch.received or 0], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_watch.group)
    if flag.item():
        _watch.received = int(flag.item())
        raise Stopped(int(flag.item()))


def _several_processes() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
