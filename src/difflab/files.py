"""Files: writing them so that a crash, a kill or a full disk never leaves half of one in place, and
reading the small JSON files models are described by."""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path


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
