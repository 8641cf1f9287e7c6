"""Captions, in the conventions people already use.

- A folder with `metadata.jsonl` (or `metadata.csv`): one entry per image, `file_name` relative to
  the metadata file's own folder and the caption in `text` (the Hugging Face imagefolder convention;
  `caption_column` names another column). A metadata file covers its folder and the folders below it;
  the nearest one wins.
- Sidecar files (the kohya convention): `IMAGE.txt` (or `IMAGE.caption`) beside `IMAGE.png`. Where
  an image has both, the metadata entry wins.
- A Hugging Face dataset's string column (`caption_column`; by default `text` or `caption`, if any).
- Labelled data: a template such as "a photo of a {label}", filled with each image's class name.

Captions are stripped and their runs of white space (line breaks included) become one space. Data
with captions for some images only keeps the others with an empty caption (what caption dropout
trains on anyway), counted and named in one warning, or refused when `strict`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path

from difflab.errors import DataError

log = logging.getLogger("difflab")

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
SIDECAR_SUFFIXES = (".txt", ".caption")
DEFAULT_COLUMNS = ("text", "caption")  # looked for, in this order, when no caption column is named
NAMED = 20  # images without a caption named in the warning (the rest are counted)


def clean(text: str) -> str:
    return " ".join(text.split())


def read_text(path: Path, what: str) -> str:
    """A text file's contents as UTF-8 (a byte-order mark allowed); anything else is a one-line error."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {what} {path}: {e.strerror or type(e).__name__}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{what} {path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                        "save it as UTF-8") from None


def read_caption_file(path: Path) -> str:
    """One sidecar caption: its text, which must not be empty."""
    caption = clean(read_text(path, "caption file"))
    if not caption:
        raise DataError(f"caption file {path} is empty; write the image's caption in it, or delete it")
    return caption


def _key(path: Path | str) -> str:
    return os.path.normpath(str(path))


def read_metadata(path: Path, caption_column: str | None) -> dict[str, str | None]:
    """{image path: caption} from one metadata.jsonl / metadata.csv (None: the entry has no caption)."""
    text = read_text(path, "metadata file")
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {number} is not JSON ({e.msg}); each line must be an object "
                                'such as {"file_name": "0001.png", "text": "a red circle"}') from None
            if not isinstance(row, dict):
                raise DataError(f"{path} line {number} is not a JSON object; each line must be an object "
                                'such as {"file_name": "0001.png", "text": "a red circle"}')
            rows.append((number, row))
    else:
        rows = [(number, row) for number, row in enumerate(csv.DictReader(io.StringIO(text)), 2)]
    found: dict[str, str | None] = {}
    column = None
    for number, row in rows:
        if "file_name" not in row:
            raise DataError(f"{path} line {number} has no file_name (the image's path relative to {path.parent})")
        if column is None:
            column = caption_column or next((c for c in DEFAULT_COLUMNS if c in row), DEFAULT_COLUMNS[0])
        value = row.get(column)
        if value is not None and not isinstance(value, str):
            raise DataError(f"{path} line {number}: the caption ({column}) is a {type(value).__name__}, "
                            "not a string")
        if value is not None and not clean(value):
            raise DataError(f"{path} line {number}: the caption ({column}) of {row['file_name']} is empty; "
                            "write one, or leave the column out for images without a caption")
        found[_key(path.parent / str(row["file_name"]))] = None if value is None else clean(value)
    if rows and caption_column and all(caption_column not in row for _, row in rows):
        raise DataError(f"{path} has no column {caption_column!r} (it has: {', '.join(rows[0][1])})")
    return found


def folder_captions(root: Path, files: list[Path], caption_column: str | None = None,
                    listed: list[Path] | None = None) -> list[str | None] | None:
    """Each file's caption (None where it has none), or None when nothing in the folder is captioned.
    `listed`: every image file of the folder (`files` may be one split of them)."""
    folders = sorted({parent for path in files for parent in path.parents if parent == root or root in parent.parents},
                     key=lambda p: len(p.parts))
    from_metadata: dict[str, str | None] = {}
    metadata_files = [folder / name for folder in folders for name in METADATA_FILES if (folder / name).is_file()]
    if caption_column and not metadata_files:
        sidecars = any(path.with_suffix(s).is_file() for path in files for s in SIDECAR_SUFFIXES)
        found = "its captions are IMAGE.txt files, which have no columns" if sidecars else "it has no captions"
        raise DataError(f"--caption-column {caption_column} names a column of a metadata.jsonl or metadata.csv, and "
                        f"{root} has none ({found}); leave out --caption-column")
    for path in metadata_files:  # the nearest metadata file wins: deeper folders come later
        entries = read_metadata(path, caption_column)
        warn_unknown_entries(path, entries, files if listed is None else listed)
        from_metadata.update(entries)
    captions: list[str | None] = []
    for path in files:
        caption = from_metadata.get(_key(path))
        if caption is None:
            sidecar = next((path.with_suffix(s) for s in SIDECAR_SUFFIXES if path.with_suffix(s).is_file()), None)
            caption = None if sidecar is None else read_caption_file(sidecar)
        captions.append(caption)
    if all(c is None for c in captions):
        if caption_column and from_metadata:
            raise DataError(f"no image in {root} has a caption in column {caption_column!r} of its metadata file")
        return None
    return captions


def warn_unknown_entries(path: Path, entries: dict[str, str | None], files: list[Path]) -> None:
    """Entries of a metadata file that name no image of the folder (a file moved, renamed or misspelt)
    caption nothing: named in one warning, so a caption is never dropped without a word."""
    images = {_key(f) for f in files}
    unknown = [key for key in entries if key not in images]
    if unknown:
        names = [os.path.relpath(key, path.parent) for key in unknown]
        shown = ", ".join(names[:NAMED]) + (f" and {len(names) - NAMED} more" if len(names) > NAMED else "")
        log.warning("%d entr%s of %s name%s no image file in the folder, and caption nothing: %s", len(unknown),
                    "y" if len(unknown) == 1 else "ies", path, "s" if len(unknown) == 1 else "", shown)


def fill_missing(captions: list[str | None], names: list[str], source: str, strict: bool) -> list[str]:
    """Empty captions for images without one, counted and named in one warning (an error when strict)."""
    missing = [name for name, caption in zip(names, captions) if caption is None]
    if missing:
        shown = ", ".join(missing[:NAMED]) + (f" and {len(missing) - NAMED} more" if len(missing) > NAMED else "")
        if strict:
            raise DataError(f"{len(missing)} of the {len(names)} images in {source} have no caption ({shown}); "
                            "caption them, or drop --strict to train them with an empty caption")
        log.warning("%d of the %d images in %s have no caption; they train with an empty caption: %s",
                    len(missing), len(names), source, shown)
    return ["" if caption is None else caption for caption in captions]


def template_captions(template: str, labels: list[int], class_names: list[str]) -> list[str]:
    """'a photo of a {label}' filled with each image's class name."""
    if "{label}" not in template:
        raise DataError(f"the caption template {template!r} has no {{label}}; write it like 'a photo of a {{label}}'")
    try:
        by_class = [template.format(label=name) for name in class_names]
    except (KeyError, IndexError, ValueError) as e:
        raise DataError(f"the caption template {template!r} cannot be filled ({type(e).__name__}: {e}); "
                        "{label} is the only field (double other braces: {{ }})") from None
    return [by_class[label] for label in labels]
