"""Named pause points for the crash tests: the only test machinery in the product.

`DIFFLAB_TEST_PAUSE_AT=POINT` with `DIFFLAB_TEST_PAUSED_FILE=PATH`: when the process reaches the named
point (a `pause_point(...)` call, for example "step_00000004:renamed" in the checkpoint writer), it
creates PATH and waits there to be killed, so that tests/test_crash.py can SIGKILL it at exactly that
moment. Unset (always, in real use), `pause_point` returns at once. Everything else a test wants to
record (tests/test_multiprocess.py: the files each process writes) is recorded from tests/.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

PAUSE_AT = "DIFFLAB_TEST_PAUSE_AT"
PAUSED_FILE = "DIFFLAB_TEST_PAUSED_FILE"
PAUSE_SECONDS = 120  # the test kills the process long before this; if it does not, give up loudly


def pause_point(name: str) -> None:
    """Wait here to be killed if a test asked for this point (see the module docstring)."""
    if os.environ.get(PAUSE_AT) != name:
        return
    Path(os.environ[PAUSED_FILE]).touch()
    time.sleep(PAUSE_SECONDS)
    raise SystemExit(f"difflab test hook: nobody killed the process at {name}")
