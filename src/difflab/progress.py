"""Progress bars: tqdm, silenced everywhere by `difflab -q` (which sets DIFFLAB_QUIET=1, inherited by
worker processes)."""

from __future__ import annotations

import os

from tqdm.auto import tqdm


def progress_bar(*args, enabled: bool = True, **kwargs) -> tqdm:
    quiet = os.environ.get("DIFFLAB_QUIET") == "1"
    return tqdm(*args, disable=quiet or not enabled, dynamic_ncols=True, **kwargs)
