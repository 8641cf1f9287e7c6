"""Image folders too large to keep decoded in memory.

`StreamedImages` has the same `batch(indices, flips)` as the in-memory `ImageDataset`, and gives
the same batches, but decodes the files as training goes: a `torch.utils.data.DataLoader` whose
worker processes read ahead of the batch stream, following the index batches it will ask for
(`read_ahead`). Which files are readable was settled before training (load_folder decodes each one
once), so the dataset has a fixed length and the same images as the in-memory path.
"""

from __future__ import annotations

import atexit
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from difflab.data.dataset import as_batch, pick
from difflab.data.decode import UnreadableImage, read_image_array
from difflab.errors import DataError

MAX_WORKERS = 4


class _Files(Dataset):
    """Decodes one file per item, in a worker process; a failure comes back as its reason."""

    def __init__(self, files: list[Path], size: int, channels: int):
        self.files, self.size, self.channels = files, size, channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | str]:
        try:
            return index, torch.from_numpy(read_image_array(self.files[index], self.size, self.channels))
        except UnreadableImage as e:
            return index, f"{self.files[index]} ({e})"


def _collate(items: list[tuple[int, torch.Tensor | str]]) -> tuple[list[int], torch.Tensor | str]:
    indices = [index for index, _ in items]
    problems = [image for _, image in items if isinstance(image, str)]
    return indices, problems[0] if problems else torch.stack([image for _, image in items])


def _close(dataset: weakref.ref) -> None:
    if dataset() is not None:
        dataset().close()


@dataclass(eq=False)
class StreamedImages:
    files: list[Path]
    image_size: int
    channels: int
    labels: torch.Tensor | None = None
    class_names: list[str] | None = None
    source: str = ""
    skipped: list[str] = field(default_factory=list)
    captions: list[str] | None = None
    workers: int = field(default_factory=lambda: min(MAX_WORKERS, os.cpu_count() or 1))

    def __post_init__(self):
        self._plan = None
        self._loaded = None  # the DataLoader's iterator over the planned batches
        # At exit, stop the workers while the DataLoader can still do it cleanly (later, it leaves
        # them to notice on their own, which takes seconds).
        atexit.register(_close, weakref.ref(self))

    def __len__(self) -> int:
        return len(self.files)

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    @property
    def has_captions(self) -> bool:
        return self.captions is not None

    def read_ahead(self, plan) -> None:
        """Decode the index batches that `plan` yields ahead of time, in worker processes. The next
        `batch()` calls must ask for them in that order (the batch stream's own order)."""
        self._plan, self._loaded = plan, None  # workers reading for an old plan are shut down

    def close(self) -> None:
        """Stop the worker processes (they also stop when the dataset is dropped, or at exit)."""
        self._plan = self._loaded = None

    def batch(self, indices: torch.Tensor, flips: torch.Tensor | None = None) -> dict[str, Any]:
        """Images as floats in [-1, 1] (`flips`: a bool per image to mirror), and labels and captions if any."""
        if self._plan is not None and self._loaded is None:
            files = _Files(self.files, self.image_size, self.channels)
            batches = (ids.tolist() for ids in self._plan)
            self._loaded = iter(DataLoader(files, batch_sampler=batches, num_workers=self.workers, collate_fn=_collate))
        if self._loaded is not None:
            got, images = next(self._loaded)
            if got != indices.tolist():
                raise RuntimeError("the read-ahead of a streamed dataset fell out of step with its batch stream")
        else:
            got, images = _collate([_Files(self.files, self.image_size, self.channels)[i] for i in indices.tolist()])
        if isinstance(images, str):
            raise DataError(f"cannot read {images} although it was readable when training started; "
                            "put it back, then run again with --resume")
        return as_batch(images, None if self.labels is None else self.labels[indices], flips,
                        pick(self.captions, indices))
