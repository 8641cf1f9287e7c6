"""The run folder: everything a run makes, as plain files a person can open.

    runs/NAME/config.toml   metrics.csv   loss.png   samples/   checkpoints/   model/

A text-to-image run also holds what it made before the UNet: `tokenizer/`, and `vae/` (the VAE
stage: a run folder of its own, without config.toml).
"""

from __future__ import annotations

import contextlib
import csv
import io
import shutil
from pathlib import Path

from difflab.config import differences, dumps_config, load_config
from difflab.errors import RunFolderError
from difflab.files import atomic_path, write_text_atomic
from difflab.layout import (
    RUN_CHECKPOINTS,
    RUN_CONFIG,
    RUN_LOSS_PLOT,
    RUN_METRICS,
    RUN_MODEL,
    RUN_SAMPLES,
    TOKENIZER,
    VAE_STAGE,
    is_run_folder,
)
from difflab.training.checkpoints import find_latest


class RunFolder:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.config = self.root / RUN_CONFIG
        self.metrics = self.root / RUN_METRICS
        self.loss_plot = self.root / RUN_LOSS_PLOT
        self.samples = self.root / RUN_SAMPLES
        self.checkpoints = self.root / RUN_CHECKPOINTS
        self.model = self.root / RUN_MODEL
        self.vae_stage = self.root / VAE_STAGE
        self.created = False  # whether prepare() made the folder (a refused start then removes it)

    def holds_run(self) -> bool:
        return is_run_folder(self.root)

    def latest_checkpoint(self) -> Path | None:
        return find_latest(self.checkpoints)

    def sample_path(self, step: int) -> Path:
        return self.samples / f"step_{step:06d}.png"

    def save_samples(self, grid, step: int, settings: dict, metrics: MetricsLog) -> Path:
        """samples/step_NNNNNN.png (with its settings in the PNG), and loss.png redrawn with it. Both loops
        write their grids here. A failed write is an OSError naming the file that was being written."""
        from difflab.images import save_png

        path = self.sample_path(step)
        with _naming(path):
            save_png(grid, path, settings)
        with _naming(self.loss_plot):
            self.plot_loss(metrics)
        return path

    def plot_loss(self, metrics: MetricsLog) -> None:
        from difflab.plots import loss_curve

        steps, values = metrics.series("loss")
        if values:
            loss_curve(steps, values, self.loss_plot)

    def prepare(self, config, *, resume: bool, overwrite: bool, write: bool = True,
                barrier=lambda: None, resumable: bool = True) -> Path | None:
        """Check the folder may be used for this run; returns the checkpoint to resume from, if any.
        Only the main process writes (`write`), and only after every process has looked (`barrier`).
        Runs that cannot be resumed say so (`resumable`).

        Nothing a run made is ever replaced without --overwrite: a resume with no intact checkpoint is
        an error (it would start again at step 0 over the finished work), and so is a resume of a
        folder with no run. A folder whose run never trained a step (only its config.toml: a start that
        failed on a bad setting, or was killed at once) is taken over by a new run."""
        if self.root.exists() and not self.root.is_dir():
            raise RunFolderError(f"{self.root} is a file; give a folder for the run")
        occupied = self.root.is_dir() and any(not _leftover(p) for p in self.root.iterdir())
        if occupied and not self.holds_run():
            raise RunFolderError(f"{self.root} is not empty and is not a difflab run; choose another --out")
        checkpoint = None
        if resume and not overwrite:
            if not occupied:
                state = "does not exist" if not self.root.exists() else "is empty"
                raise RunFolderError(f"{self.root} {state}: there is no run to resume; check --out, or leave out "
                                     "--resume to start a new run there")
            changed = differences(load_config(self.config, type(config)), config)
            if changed:
                raise RunFolderError(
                    f"{self.root} holds a different run ({changed[0]}); resume with the same settings "
                    "or choose another --out"
                )
            checkpoint = self.latest_checkpoint()
            if checkpoint is None and not self.stage_started():
                raise RunFolderError(self.nothing_to_resume())
        elif occupied and not overwrite and self.work_done():
            choices = "add --resume to continue it or --overwrite" if resumable else "add --overwrite"
            raise RunFolderError(f"{self.root} already holds a run; {choices} to start again")
        barrier()  # every process has looked before the main one changes anything
        if write:
            try:
                self.created = not self.root.exists()
                if occupied and overwrite:
                    shutil.rmtree(self.root)
                elif checkpoint is None:
                    self.metrics.unlink(missing_ok=True)  # a header without rows, from a run that never trained
                    if not resume:  # learnt from the captions of a start that never trained: not this run's
                        shutil.rmtree(self.root / TOKENIZER, ignore_errors=True)
                self.root.mkdir(parents=True, exist_ok=True)
                write_text_atomic(self.config, dumps_config(config))
            except OSError as e:
                raise RunFolderError(
                    f"cannot write the run folder {self.root} ({e.strerror or e}); "
                    "make it writable or choose another --out"
                ) from None
        return checkpoint

    def discard_unstarted(self) -> None:
        """After a start refused before its first step: remove what setting up wrote (config.toml, a
        header-only metrics.csv, the tokenizer learnt from the captions, empty folders), and the folder
        itself if this run made it, so that nothing is left behind. A folder holding anything else (a VAE
        stage, class images, checkpoints: work) is left as it is."""
        if not self.root.is_dir() or self.work_done():
            return
        setup = {self.config.name, self.metrics.name, TOKENIZER}
        entries = [p for p in self.root.iterdir() if not _leftover(p)]
        if any(p.name not in setup and not (p.is_dir() and not any(p.rglob("*"))) for p in entries):
            return  # something of the user's or of the run's work
        for p in entries:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        if self.created:
            shutil.rmtree(self.root, ignore_errors=True)

    def stage_started(self) -> bool:
        """Whether an earlier stage (the VAE's) has a checkpoint or its result: a run to resume."""
        stage = RunFolder(self.vae_stage)
        return stage.latest_checkpoint() is not None or (stage.model / "config.json").is_file()

    def work_done(self, damaged: bool = False) -> list[str]:
        """What the folder holds that a new start would lose, in words (empty: only settings).
        `damaged`: its checkpoints are known to fail their checksums."""
        found = ["a VAE stage (vae/)"] if self.stage_started() else []
        checkpoints = sorted(self.checkpoints.glob("step_*")) if self.checkpoints.is_dir() else []
        if checkpoints:
            kind = "damaged checkpoint" if damaged else "checkpoint"
            found.append(f"{len(checkpoints)} {kind}{'s' * (len(checkpoints) > 1)} "
                         f"({', '.join(p.name for p in checkpoints)})")
        steps = [int(row["step"]) for row in MetricsLog(self.metrics).rows] if self.metrics.is_file() else []
        if steps:
            found.append(f"metrics up to step {max(steps)}")
        if self.model.exists() or self.model.with_name(f".{self.model.name}.previous").exists():
            found.append("a model folder")
        if self.samples.is_dir() and any(self.samples.glob("step_*.png")):
            found.append("sample grids")
        return found

    def nothing_to_resume(self) -> str:
        """The message for a --resume with no intact checkpoint: what is there, and what to do."""
        found = self.work_done(damaged=True)  # called when no checkpoint verifies
        if not found:
            return (f"{self.root} holds the settings of a run that never trained a step (only config.toml); "
                    "leave out --resume to start it")
        return (f"{self.root} has no intact checkpoint to resume from (found: {'; '.join(found)}); "
                "nothing was changed: run again with --overwrite to delete it and start over, or choose another --out")


@contextlib.contextmanager
def _naming(path: Path):
    """OSErrors raised inside name `path` (not a hidden partial file or the folder that refused it)."""
    try:
        yield
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from e


def _leftover(path: Path) -> bool:
    """A hidden half-written file of ours (a crash before the first config.toml was in place)."""
    return path.name.startswith(".") and path.name.endswith(".partial")


class MetricsLog:
    """metrics.csv: one row per logged step. New columns (evaluation figures) widen the header."""

    def __init__(self, path: Path):
        self.path = path
        self.columns: list[str] = []
        self.rows: list[dict[str, str]] = []
        self.torn = False  # a row cut short by a crash or a full disk, dropped on reading
        if path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace")
            reader = csv.DictReader(io.StringIO(text, newline=""))
            self.columns = list(reader.fieldnames or [])
            rows = list(reader)
            if rows and not text.endswith("\n"):  # the last row may be cut short
                rows.pop()
                self.torn = True
            for row in rows:
                if _complete(row, self.columns):
                    self.rows.append(row)
                else:
                    self.torn = True

    def truncate_after(self, step: int) -> None:
        """Forget rows logged after the checkpoint a run resumes from (and torn rows)."""
        kept = [row for row in self.rows if int(row["step"]) <= step]
        if len(kept) != len(self.rows) or self.torn:
            self.rows, self.torn = kept, False
            self._rewrite()

    def append(self, row: dict) -> None:
        row = {k: _fmt(v) for k, v in row.items()}
        self.rows.append(row)
        if any(k not in self.columns for k in row):
            self.columns += [k for k in row if k not in self.columns]
            self._rewrite()
        else:
            with open(self.path, "a", newline="", encoding="utf-8") as f:
                csv.DictWriter(f, self.columns, lineterminator="\n").writerow(row)

    def _rewrite(self) -> None:
        with atomic_path(self.path) as partial, open(partial, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, self.columns, lineterminator="\n")
            writer.writeheader()
            writer.writerows(self.rows)

    def series(self, column: str) -> tuple[list[int], list[float]]:
        pairs = [(int(r["step"]), float(r[column])) for r in self.rows if r.get(column) not in (None, "")]
        return [p[0] for p in pairs], [p[1] for p in pairs]


def _complete(row: dict, columns: list[str]) -> bool:
    if None in row or any(row.get(c) is None for c in columns):  # too many or too few fields
        return False
    try:
        int(row["step"])
    except (KeyError, ValueError):
        return False
    return True


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
