"""Writing files so that a crash, a kill or a full disk never leaves half of one in place."""

from __future__ import annotations

import contextlib
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
