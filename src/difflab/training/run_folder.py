"""The run folder: everything a run makes, as plain files a person can open.

    runs/NAME/config.toml   metrics.csv   loss.png   samples/   checkpoints/   model/
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

from difflab.config import differences, dumps_config, load_config
from difflab.errors import RunFolderError
from difflab.training.checkpoints import find_latest, write_text_atomic


class RunFolder:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.config = self.root / "config.toml"
        self.metrics = self.root / "metrics.csv"
        self.loss_plot = self.root / "loss.png"
        self.samples = self.root / "samples"
        self.checkpoints = self.root / "checkpoints"
        self.model = self.root / "model"

    def holds_run(self) -> bool:
        return self.config.is_file()

    def latest_checkpoint(self) -> Path | None:
        return find_latest(self.checkpoints)

    def save_samples(self, grid, step: int, settings: dict, metrics: MetricsLog) -> Path:
        """samples/step_NNNNNN.png (with its settings in the PNG), and loss.png redrawn with it."""
        from difflab.images import save_png
        from difflab.plots import loss_curve

        path = save_png(grid, self.samples / f"step_{step:06d}.png", settings)
        steps, values = metrics.series("loss")
        if values:
            loss_curve(steps, values, self.loss_plot)
        return path

    def prepare(self, config, *, resume: bool, overwrite: bool, write: bool = True,
                resumable: bool = True) -> Path | None:
        """Check the folder may be used for this run; returns the checkpoint to resume from, if any.
        Only the main process writes (`write`). Runs that cannot be resumed say so (`resumable`)."""
        if self.root.exists() and not self.root.is_dir():
            raise RunFolderError(f"{self.root} is a file; give a folder for the run")
        occupied = self.root.is_dir() and any(self.root.iterdir())
        if occupied and not self.holds_run():
            raise RunFolderError(f"{self.root} is not empty and is not a difflab run; choose another --out")
        checkpoint = None
        if occupied and overwrite:
            if write:
                shutil.rmtree(self.root)
        elif occupied and resume:
            changed = differences(load_config(self.config, type(config)), config)
            if changed:
                raise RunFolderError(
                    f"{self.root} holds a different run ({changed[0]}); resume with the same settings "
                    "or choose another --out"
                )
            checkpoint = self.latest_checkpoint()
        elif occupied:
            choices = "add --resume to continue it or --overwrite" if resumable else "add --overwrite"
            raise RunFolderError(f"{self.root} already holds a run; {choices} to start again")
        if write:
            self.root.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.config, dumps_config(config))
        return checkpoint


class MetricsLog:
    """metrics.csv: one row per logged step. New columns (evaluation figures) widen the header."""

    def __init__(self, path: Path):
        self.path = path
        self.columns: list[str] = []
        self.rows: list[dict[str, str]] = []
        if path.is_file():
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or [])
                self.rows = list(reader)

    def truncate_after(self, step: int) -> None:
        """Forget rows logged after the checkpoint a run resumes from."""
        kept = [row for row in self.rows if int(row["step"]) <= step]
        if len(kept) != len(self.rows):
            self.rows = kept
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
        partial = self.path.with_name(f".{self.path.name}.partial")
        with open(partial, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, self.columns, lineterminator="\n")
            writer.writeheader()
            writer.writerows(self.rows)
        partial.replace(self.path)

    def series(self, column: str) -> tuple[list[int], list[float]]:
        pairs = [(int(r["step"]), float(r[column])) for r in self.rows if r.get(column) not in (None, "")]
        return [p[0] for p in pairs], [p[1] for p in pairs]


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
