"""A folder of images, searched recursively; labels come from first-level sub-folder names."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from difflab.data.captions import fill_missing, folder_captions
from difflab.data.dataset import ImageDataset, split_indices
from difflab.data.decode import IMAGE_EXTENSIONS, UnreadableImage, is_grey, open_image, read_image_array
from difflab.data.streaming import StreamedImages
from difflab.errors import DataError

log = logging.getLogger("difflab")

MAX_DEFAULT_SIZE = 64  # default training size for folders of larger images
PARALLEL_FROM = 2000  # decode with worker processes from this many files on
NAMED = 20  # unreadable files named in the warning (the rest are counted)
CAN_READ = ("difflab reads PNG, JPEG, WebP, BMP and GIF files: convert the images to one of these, or check that "
            "they were copied whole")


DEFAULT_MEMORY_LIMIT_MB = 2048  # a folder's decoded images stay in memory up to this size; larger ones stream


@dataclass
class FolderListing:
    files: list[Path]
    labels: list[int] | None
    class_names: list[str] | None


def list_images(root: Path) -> FolderListing:
    """Every image file under `root` in a stable order. Symbolic links are followed, loops are not."""
    files: list[Path] = []
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [Path(dirpath) / f for f in sorted(filenames)
                  if Path(f).suffix.lower() in IMAGE_EXTENSIONS and not f.startswith(".")]
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    tops = [p.relative_to(root).parts for p in files]
    if files and all(len(parts) > 1 for parts in tops):
        class_names = sorted({parts[0] for parts in tops})
        index = {name: i for i, name in enumerate(class_names)}
        return FolderListing(files, [index[parts[0]] for parts in tops], class_names)
    return FolderListing(files, None, None)


def guess_size_and_channels(files: list[Path], folder: str | Path = "the folder") -> tuple[int, int]:
    """From the first readable images: the shorter side (capped) and grey (1) or colour (3)."""
    sizes, colour, first_failure = [], False, None
    for path in files:
        try:
            img = open_image(path)
        except UnreadableImage as e:
            first_failure = first_failure or f"{path.name}: {e}"
            continue
        sizes.append(min(img.size))
        colour = colour or not is_grey(img)
        if len(sizes) == 16:
            break
    if not sizes:
        raise DataError(f"none of the {len(files)} images in {folder} can be read (first: {first_failure}); "
                        f"{CAN_READ}")
    size = min(sizes)
    if size > MAX_DEFAULT_SIZE:
        log.info("resizing images to %d px (their own size is %d); use --image-size to choose", MAX_DEFAULT_SIZE, size)
        size = MAX_DEFAULT_SIZE
    return size, 3 if colour else 1


def _decode(args) -> np.ndarray | str:
    path, size, channels = args
    try:
        return read_image_array(path, size, channels)
    except UnreadableImage as e:
        return str(e)


def _check(args) -> str | None:
    """Decode a file only to learn whether it is readable (for folders streamed from disk)."""
    result = _decode(args)
    return result if isinstance(result, str) else None


def load_folder(folder: str, image_size: int | None, channels: int | None, split: str,
                strict: bool = False, memory_limit_mb: int = DEFAULT_MEMORY_LIMIT_MB,
                caption_column: str | None = None) -> ImageDataset | StreamedImages:
    """The folder's images, decoded into memory, or, when they would take more than `memory_limit_mb`
    (0: always), a dataset that decodes them from disk as training goes (the same batches either way).
    Captions come from metadata.jsonl/.csv files or sidecar .txt files where the folder has them."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"data folder {folder} does not exist")
    listing = list_images(root)
    if not listing.files:
        raise DataError(
            f"no images in {folder} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))} in it and its sub-folders)"
        )
    index = split_indices(len(listing.files), split).tolist()
    files = [listing.files[i] for i in index]
    if not files:
        raise DataError(f"{folder} has {len(listing.files)} image{'s' * (len(listing.files) != 1)}, too few to hold "
                        f"out a '{split}' split (every tenth image): it needs at least 10")
    # before decoding: a bad caption file stops at once
    captions = folder_captions(root, files, caption_column, listing.files)
    if image_size is None or channels is None:
        guessed_size, guessed_channels = guess_size_and_channels(files, folder)
        image_size = image_size or guessed_size
        channels = channels or guessed_channels

    streamed = len(files) * channels * image_size ** 2 > memory_limit_mb * 2 ** 20
    jobs = [(path, image_size, channels) for path in files]
    work = _check if streamed else _decode
    if len(jobs) >= PARALLEL_FROM and (os.cpu_count() or 1) > 1:
        with ProcessPoolExecutor() as pool:
            results = list(pool.map(work, jobs, chunksize=256))
    else:
        results = [work(job) for job in jobs]

    kept, arrays, labels, kept_captions, skipped = [], [], [], [], []
    for position, (path, result) in enumerate(zip(files, results)):
        if isinstance(result, str):
            if strict:
                raise DataError(f"cannot read {path}: {result} (remove it, or drop --strict to skip unreadable images)")
            skipped.append(f"{path.relative_to(root)} ({result})")
            continue
        kept.append(path)
        if not streamed:
            arrays.append(result)
        if listing.labels is not None:
            labels.append(listing.labels[index[position]])
        if captions is not None:
            kept_captions.append(captions[position])
    if not kept:
        raise DataError(f"none of the {len(files)} images in {folder} can be read (first: {skipped[0]}); {CAN_READ}")
    if skipped:
        shown = "; ".join(skipped[:NAMED]) + (f"; and {len(skipped) - NAMED} more" if len(skipped) > NAMED else "")
        log.warning("skipped %d unreadable image%s in %s: %s", len(skipped), "s" * (len(skipped) > 1), folder, shown)
    label_tensor = torch.tensor(labels, dtype=torch.int64) if listing.labels is not None else None
    if captions is not None:
        kept_captions = fill_missing(kept_captions, [p.relative_to(root).as_posix() for p in kept], folder, strict)
    else:
        kept_captions = None
    if streamed:
        log.info("reading the %d images of %s from disk as training goes (decoded, they would take %d MB; "
                 "--memory-limit-mb is %d)", len(kept), folder, len(kept) * channels * image_size ** 2 >> 20,
                 memory_limit_mb)
        return StreamedImages(kept, image_size, channels, label_tensor, listing.class_names, str(folder), skipped,
                              kept_captions)
    return ImageDataset(torch.from_numpy(np.stack(arrays)), label_tensor, listing.class_names, str(folder), skipped,
                        kept_captions)
