"""Files and folders: writing them so that a crash, a kill or a full disk never leaves half of one in
place, and reading the small JSON files models are described by. Both model kinds (diffusers folders and
the teaching model's) use these, so they live below both. What is at a path is difflab.layout's."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from difflab.errors import OutputError
from difflab.testhooks import pause_point  # a no-op unless a crash test asks to stop there


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """A hidden path next to `path` to write to. When the block ends, the file replaces `path` in
    one step (os.replace); when it fails, it is removed and `path` is left as it was."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    try:
        yield partial
        os.replace(partial, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename == str(partial):  # name the file the user knows
            raise type(e)(e.errno, e.strerror, str(path)) from e
        raise


@contextlib.contextmanager
def atomic_folder(folder: Path) -> Iterator[Path]:
    """A hidden sibling folder to write into, which replaces `folder` only once the block completes: a
    crash or a failed write never leaves half a model, and the old one stays until then."""
    partial = folder.with_name(f".{folder.name}.partial")
    previous = folder.with_name(f".{folder.name}.previous")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    pause_point("model:assembled")
    if folder.exists():
        shutil.rmtree(previous, ignore_errors=True)
        folder.rename(previous)
        pause_point("model:moved-aside")
    partial.rename(folder)
    shutil.rmtree(previous, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace `path` with `text`, flushed to the disk, all at once."""
    with atomic_path(path) as partial, open(partial, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def safetensors_os_error(error: Exception, path: str | Path) -> OSError:
    """safetensors reports I/O failures (a full disk, a read-only folder) as SafetensorError with the
    OS error in its text; as an OSError they are handled like every other failed write."""
    found = re.search(r"I/O error: (.*?) \(os error (\d+)\)", str(error))
    if found:
        return OSError(int(found[2]), found[1], str(path))
    return OSError(f"{error} ({path})")


def read_json_object(path: str | Path, error: type[Exception], hint: str = "") -> dict:
    """The JSON object in `path`; a missing file, bad JSON or another JSON value raise `error` with a
    one-line message ending in `hint` (say, what to do about it)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path} does not exist{hint}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON ({e}){hint}") from None
    if not isinstance(data, dict):
        raise error(f"{path} should hold a JSON object{hint}")
    return data


# ---- output paths, checked before the work that fills them ----------------------------------------

def check_output_file(path: str | Path, flag: str, example: str = "out.png") -> None:
    """`path` can be written as a file: it is not a folder, nothing above it is a file, and the folder
    it goes in (or the nearest one above that exists) takes new files. Checked before the work (an
    evaluation that runs for minutes, then cannot write its result, loses the user's time)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{flag} {path} is a folder; give a file name, such as {path / example}")
    _check_can_create_in(path.parent, flag, path)


def check_output_folder(path: str | Path, flag: str) -> None:
    """`path` is a folder, or one can be made there, and it takes new files."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {path} is a file; give a folder")
    _check_can_create_in(path, flag, path)


def _check_can_create_in(folder: Path, flag: str, path: Path) -> None:
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent  # what the write would have to create starts below here
    if not existing.is_dir():
        raise OutputError(f"{flag} {path} cannot be written: {existing} is a file, not a folder")
    try:  # the one sure test (modes, read-only file systems, quotas): make a file there, then drop it
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise OutputError(f"{flag} {path} cannot be written: {existing} does not take new files "
                          f"({e.strerror or e}); make it writable or choose another place") from None
