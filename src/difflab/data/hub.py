"""Datasets through the Hugging Face `datasets` library: a Hub id (online, or cached) or
`imagefolder:PATH` (a local folder, with metadata files if it has them)."""

from __future__ import annotations

import numpy as np
import torch

from difflab.data.captions import DEFAULT_COLUMNS, clean, fill_missing
from difflab.data.dataset import ImageDataset, split_indices
from difflab.data.decode import image_to_array, is_grey
from difflab.data.folder import MAX_DEFAULT_SIZE
from difflab.errors import DataError


def load_hub_dataset(spec: str, image_size: int | None, channels: int | None, split: str,
                     caption_column: str | None = None, strict: bool = False) -> ImageDataset:
    """The dataset's image column, its class-label column if any, and its captions: the string column
    `caption_column`, or by default a string column named text or caption where there is one."""
    import datasets

    try:
        if spec.startswith("imagefolder:"):
            loaded = datasets.load_dataset("imagefolder", data_dir=spec.split(":", 1)[1])
        else:
            loaded = datasets.load_dataset(spec.removeprefix("hf:"))
    except Exception as e:  # the library raises many kinds; all mean "could not get it"
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(
            f"could not load dataset {spec!r} with the datasets library ({reason}); check the name and the "
            "network connection, or load it once while online so that it is cached"
        ) from None

    table = _pick_split(loaded, split)
    image_column = next((name for name, f in table.features.items() if isinstance(f, datasets.Image)), None)
    if image_column is None:
        raise DataError(f"dataset {spec!r} has no image column (columns: {', '.join(table.column_names)})")
    label_column = next((name for name, f in table.features.items() if isinstance(f, datasets.ClassLabel)), None)
    text_columns = [name for name, f in table.features.items()
                    if isinstance(f, datasets.Value) and f.dtype in ("string", "large_string")]
    if caption_column is not None and caption_column not in text_columns:
        what = "has no column" if caption_column not in table.column_names else "has no text in column"
        raise DataError(f"dataset {spec!r} {what} {caption_column!r} for captions (text columns: "
                        f"{', '.join(text_columns) or 'none'})")
    caption_column = caption_column or next((c for c in DEFAULT_COLUMNS if c in text_columns), None)

    first = table[0][image_column]
    size = image_size or min(min(first.size), MAX_DEFAULT_SIZE)
    channels = channels or (1 if is_grey(first) else 3)
    arrays = [image_to_array(row[image_column], size, channels) for row in table]
    labels = class_names = None
    if label_column is not None:
        labels = torch.tensor(table[label_column], dtype=torch.int64)
        class_names = list(table.features[label_column].names)
    captions = None
    if caption_column is not None:
        found = [clean(c) or None if c is not None else None for c in table[caption_column]]
        captions = fill_missing(found, [f"row {i}" for i in range(len(found))], spec, strict)
    return ImageDataset(torch.from_numpy(np.stack(arrays)), labels, class_names, spec, captions=captions)


def _pick_split(loaded, split: str):
    """The requested split where the dataset has it; otherwise our every-tenth-item rule on 'train'."""
    import datasets

    if split in loaded:
        return loaded[split]
    if split == "all":
        return datasets.concatenate_datasets(list(loaded.values()))
    base = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
    return base.select(split_indices(len(base), split).tolist())
