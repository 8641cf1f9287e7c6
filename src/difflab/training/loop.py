"""The one training loop.

Every kind of run is this loop running a `Task`: the denoiser (pixel, class, text, fine-tuning,
DreamBooth, LoRA, textual inversion: `training/trainer.py`), the VAE stage of a text run
(`training/autoencoder.py`) and the teaching model (`training/scratch_trainer.py`). The loop owns what
is the same for all of them: the budget (steps, epochs, minutes), SIGTERM/SIGHUP and Ctrl-C, the
progress bar, metrics.csv and the trackers, checkpoints (written atomically by `checkpoints.py`, and
resumed) and when grids and evaluations are due. A task says what one step is, what a checkpoint holds
of it, and what it writes at a grid or an evaluation point.

To add a kind of run: subclass `Task`, build a `Loop` over it and call `loop.run()`, then save what the
run made (docs/design.md, "The loop and its tasks").
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from difflab.errors import TrainingError
from difflab.progress import progress_bar
from difflab.training import checkpoints
from difflab.training.budget import Budget
from difflab.training.reporting import show_progress
from difflab.training.run_folder import MetricsLog, RunFolder
from difflab.training.signals import stop_if_signalled
from difflab.training.steps import StepLog, StepStats, TrainState

log = logging.getLogger("difflab")


@dataclass(frozen=True)
class Cadence:
    """Every how many steps the loop writes a metrics row, a checkpoint, a grid and an evaluation (0: never
    on the way; the last step's row and checkpoint are always written, its grid and evaluation by the task)."""

    log_every: int
    checkpoint_every: int = 0
    sample_every: int = 0
    eval_every: int = 0
    keep_checkpoints: int = 2

    @classmethod
    def of_run(cls, run) -> Cadence:
        return cls(run.log_every, run.checkpoint_every, run.sample_every, run.eval_every, run.keep_checkpoints)


class Task:
    """What one kind of run is to the loop. Subclasses set `label` (the progress bar's), `stream` (the data
    order: its epochs count towards the budget, and a checkpoint holds its position) and `lr` (the latest
    step's learning rate, for the metrics row), and implement `step`; the rest has defaults."""

    label = "training"
    stream = None
    lr = 0.0

    def step(self, loop: Loop) -> StepStats:
        """One optimizer step on the next batch; its statistics stay on the device."""
        raise NotImplementedError

    def advice(self) -> str:
        """What to do when the loss stops being a number (ends the error message)."""
        return "lower the learning rate and run again"

    def checkpoint_state(self) -> tuple[dict, dict] | None:
        """(tensor groups, JSON state) of the task for a checkpoint; called on every process (it may gather
        across them), None where this process does not write. The loop adds the step and the data position."""
        return None

    def load_checkpoint_state(self, tensors: dict, state: dict) -> None:
        """Take back what checkpoint_state saved."""

    def figures(self, row: dict) -> dict:
        """Columns a metrics row adds for this task (the VAE's PSNR), shown on the bar too."""
        return {}

    def at_grid(self, loop: Loop) -> None:
        """A sample grid is due (every `sample_every` steps)."""

    def at_eval(self, loop: Loop) -> None:
        """An evaluation is due (every `eval_every` steps)."""

    def interrupted(self, loop: Loop) -> None:
        """Ctrl-C, SIGTERM or SIGHUP stopped the run: keep what was learnt (by default a checkpoint)."""
        loop.save_checkpoint()


class Loop:
    """Runs `task` until `budget` is used, counting steps, images and training seconds (`clock`; tests
    inject one). `folder` holds metrics.csv and checkpoints/; `main`: this process writes them (with several
    processes, only the first); `track(row)`: the trackers of --log-with; `resumable`: whether the task
    is checkpointed at all (the teaching model is not)."""

    def __init__(self, task: Task, folder: RunFolder, budget: Budget, images_per_step: int, cadence: Cadence, *,
                 clock: Callable[[], float] = time.perf_counter, main: bool = True, group_names: tuple[str, ...] = (),
                 track: Callable[[dict], None] | None = None, resumable: bool = True):
        self.task, self.folder, self.cadence = task, folder, cadence
        self.main, self.track, self.resumable = main, track, resumable
        self.steps = StepLog(budget, images_per_step, clock, group_names)
        self.metrics = MetricsLog(folder.metrics)
        self.bar = None

    @property
    def state(self) -> TrainState:
        return self.steps.state

    @property
    def budget(self) -> Budget:
        return self.steps.budget

    def fraction_done(self) -> float:
        return self.steps.fraction_done(self.task.stream.epochs_done)

    @property
    def finished(self) -> bool:
        return self.fraction_done() >= 1.0

    # ---- the loop ------------------------------------------------------------------------------------
    def run(self, after_step: Callable[[TrainState], None] | None = None) -> None:
        """Train until the budget is used; the last metrics row and checkpoint are written. `after_step(state)`
        runs after each step and what it writes (a notebook's or a test's hook): a KeyboardInterrupt raised
        there stops the run as Ctrl-C does, through `task.interrupted`."""
        self.bar = progress_bar(total=self.budget.steps, initial=self.state.step, unit="step", desc=self.task.label,
                                enabled=self.main)
        try:
            while not self.finished:
                self.steps.start_step()
                self.steps.end_step(self.task.step(self))
                self.bar.update()
                self.write_what_is_due()
                stop_if_signalled(last=self.finished)  # SIGTERM/SIGHUP: through the Ctrl-C path
                if after_step is not None:
                    after_step(self.state)
        except KeyboardInterrupt:
            self.bar.close()
            self.task.interrupted(self)
            raise
        self.bar.close()
        if self.resumable:
            self.save_checkpoint()

    def write_what_is_due(self) -> None:
        """The metrics row, checkpoint, grid and evaluation due at this step (the last step's row here; its
        checkpoint in run, its grid and evaluation by the task once the loop ends)."""
        c, step, finished = self.cadence, self.state.step, self.finished
        if step % c.log_every == 0 or finished:
            self.log()
        if finished:
            return
        if self.resumable and c.checkpoint_every and step % c.checkpoint_every == 0:
            self.save_checkpoint()
        if c.sample_every and step % c.sample_every == 0:
            self.task.at_grid(self)
        if c.eval_every and step % c.eval_every == 0:
            self.task.at_eval(self)

    # ---- what the loop writes ------------------------------------------------------------------------
    def log(self) -> None:
        """The metrics row of the steps since the last one, on the bar, in metrics.csv and the trackers."""
        row = self.steps.row(self.task.stream.epochs_done, self.task.lr, self.advice)
        extra = self.task.figures(row)
        row.update(extra)
        show_progress(self.bar, row["loss"], row["images_per_s"], step=self.state.step,
                      fraction_done=self.fraction_done(), step_budget=self.budget.steps, **extra)
        self.record(row)

    def record(self, row: dict) -> None:
        """A row (a step's or an evaluation's) into metrics.csv and the trackers (main process only)."""
        if not self.main:
            return
        with self.writing(self.folder.metrics):
            self.metrics.append(row)
        if self.track is not None:
            self.track(row)

    def advice(self) -> str:
        """What to do when the loss diverged: the last good checkpoint, then the task's advice."""
        if not self.resumable:
            return self.task.advice()
        return f"{checkpoints.last_good(self.folder.checkpoints)}: {self.task.advice()}"

    @contextmanager
    def writing(self, path: Path | None = None):
        """A failed write (a full disk, a read-only folder) stops training with one line that names `path`
        (default: the file the error names) and says what to do; checkpoints.save_checkpoint reports its own."""
        try:
            yield
        except OSError as e:
            where = (f"{checkpoints.last_good(self.folder.checkpoints)}: " if self.resumable else "")
            again = "--resume" if self.resumable else "--overwrite"
            raise TrainingError(f"could not write {path or e.filename} ({e.strerror or e}); {where}free some disk "
                                f"space or make the run folder writable, then run again with {again}") from None

    def save_checkpoint(self) -> None:
        """The task's state, the step counts and the data position, as one atomic checkpoint (never a diverged
        model: the pending steps' statistics are checked first)."""
        self.steps.check_finite(self.advice)
        saved = self.task.checkpoint_state()
        if saved is None:
            return
        tensors, state = saved
        state = {"train": dataclasses.asdict(self.state), "data": self.task.stream.state_dict(), **state}
        checkpoints.save_checkpoint(self.folder.checkpoints, self.state.step, tensors, state,
                                    self.cadence.keep_checkpoints)

    def resume(self, path: Path) -> None:
        """Continue from the checkpoint at `path`: the task's state, the data position and the step counts;
        metrics rows logged after it are dropped."""
        tensors, state = checkpoints.load_checkpoint(path)
        self.task.load_checkpoint_state(tensors, state)
        self.task.stream.load_state_dict(state["data"])
        self.steps.resume(TrainState(**state["train"]))
        if self.main:
            self.metrics.truncate_after(self.state.step)
        log.info("resuming %s from %s (step %d)", self.task.label, path, self.state.step)

