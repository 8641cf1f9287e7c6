"""The in-memory image dataset every source decodes into."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossGroups:
    """Named groups of a dataset's images whose losses are weighted, and reported, apart: DreamBooth's
    instance images and the class images of prior preservation. `index` holds each image's group."""

    index: torch.Tensor  # int64 [N]
    names: tuple[str, ...]
    weights: tuple[float, ...]

    def subset(self, indices: torch.Tensor) -> LossGroups:
        return LossGroups(self.index[indices], self.names, self.weights)


@dataclass
class ImageDataset:
    """Images decoded once and kept as a uint8 tensor [N, C, H, W], with optional integer labels,
    captions (a string per image) and attributes (what generated data knows about each image, e.g. a
    `shapes.Scene`). `mirror_caption` rewrites the caption of a mirrored image (for captions that name
    left and right); without it a flip leaves captions as they are."""

    images: torch.Tensor
    labels: torch.Tensor | None = None
    class_names: list[str] | None = None
    source: str = ""
    skipped: list[str] = field(default_factory=list)
    captions: list[str] | None = None
    attributes: list[Any] | None = None
    mirror_caption: Callable[[str], str] | None = None
    loss_groups: LossGroups | None = None
    notes: dict[str, Any] = field(default_factory=dict)  # what data made for a run says of itself (model card)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    @property
    def has_captions(self) -> bool:
        return self.captions is not None

    def batch(self, indices: torch.Tensor, flips: torch.Tensor | None = None) -> dict[str, Any]:
        """Images as floats in [-1, 1] (`flips`: a bool per image to mirror), and labels and captions
        (a list of strings) if any."""
        out = as_batch(self.images[indices], None if self.labels is None else self.labels[indices], flips,
                       pick(self.captions, indices), self.mirror_caption)
        return with_groups(out, self.loss_groups, indices)

    def read_ahead(self, plan) -> None:
        """Datasets read from disk prefetch the index batches `plan` will ask for; in memory there is
        nothing to do."""

    def close(self) -> None:
        """Datasets read from disk stop their reading processes; in memory there is nothing to do."""

    def subset(self, indices: torch.Tensor) -> ImageDataset:
        labels = None if self.labels is None else self.labels[indices]
        return ImageDataset(self.images[indices], labels, self.class_names, self.source, self.skipped,
                            pick(self.captions, indices), pick(self.attributes, indices), self.mirror_caption,
                            None if self.loss_groups is None else self.loss_groups.subset(indices))


def with_groups(batch: dict[str, Any], groups: LossGroups | None, indices: torch.Tensor) -> dict[str, Any]:
    """The batch with each image's loss group (`groups`), when the dataset has them."""
    if groups is not None:
        batch["groups"] = groups.index[indices]
    return batch


def pick(items: list | None, indices: torch.Tensor) -> list | None:
    """The entries of a per-image list at `indices` (None stays None)."""
    return None if items is None else [items[i] for i in indices.tolist()]


def as_batch(images: torch.Tensor, labels: torch.Tensor | None, flips: torch.Tensor | None,
             captions: list[str] | None = None, mirror_caption: Callable[[str], str] | None = None) -> dict[str, Any]:
    """A training batch from uint8 images [B, C, H, W]: floats in [-1, 1], mirrored where `flips` says;
    labels and captions travel with them (a mirrored image's caption through `mirror_caption`)."""
    x = images.float().div_(127.5).sub_(1.0)
    flipped = flips is not None and bool(flips.any())
    if flipped:
        x = torch.where(flips[:, None, None, None], x.flip(-1), x)
    out: dict[str, Any] = {"images": x}
    if labels is not None:
        out["labels"] = labels
    if captions is not None:
        out["captions"] = mirrored_captions(captions, flips if flipped else None, mirror_caption)
    return out


def mirrored_captions(captions: list[str], flips: torch.Tensor | None,
                      mirror_caption: Callable[[str], str] | None) -> list[str]:
    """Each caption as its image is shown: mirrored (through `mirror_caption`) where `flips` says."""
    if flips is None or mirror_caption is None:
        return captions
    return [mirror_caption(c) if f else c for c, f in zip(captions, flips.tolist())]


def split_indices(n: int, split: str) -> torch.Tensor:
    """Sources without an official split hold out every tenth item (positions 9, 19, ...) as 'test'."""
    index = torch.arange(n)
    if split == "all":
        return index
    held_out = index % 10 == 9
    return index[held_out] if split == "test" else index[~held_out]


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a uint8 batch [N, C, h, w] of square images to size x size (antialiased)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = []
    for chunk in images.split(4096):
        x = F.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(x.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out)


def match_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Grey -> RGB by repeating; RGB -> grey by ITU-R 601 luma (as PIL's 'L')."""
    have = images.shape[1]
    if have == channels:
        return images
    if have == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    if have == 3 and channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (images.float() * weights).sum(1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)
    raise ValueError(f"cannot convert {have} channels to {channels}")
