"""Numbers a user gives, checked before any work is done: each one that cannot work is a one-line
`ConfigError` naming the flag, the value and the limit.

Python's float() takes "inf" and "nan" (and TOML has them too), and many checks such as `x > 0` let
them through; an image size of 100,000 asks for terabytes; a sampler cannot take more steps than the
schedule has timesteps. The CLI and config validation call these instead of finding out later.
"""

from __future__ import annotations

import math
from typing import Any

from difflab.errors import ConfigError

MAX_IMAGE_SIZE = 4096  # a side in pixels; more than any model difflab trains or samples (SD upscalers: 2048)
MIN_TIMESTEPS = 2  # a noise schedule needs a noisy and a clean end
MAX_TIMESTEPS = 100_000  # 1000 is usual; far more only costs memory and time
# Counts with a limit that no sensible run reaches, and past which memory runs out.
MOST = {"batch_size": 65_536, "sample_count": 1024, "eval_count": 100_000}
SIGNED = {"seed"}  # the one number setting that may be negative


def check_finite(values: dict[str, Any]) -> None:
    """{flag: value}: every float given is a finite number."""
    for flag, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{flag} must be a finite number (got {value})")


def check_at_least(values: dict[str, Any], minimum: float) -> None:
    """{flag: value}: every value given (not None) is at least `minimum`."""
    for flag, value in values.items():
        if value is not None and not value >= minimum:
            raise ConfigError(f"{flag} must be at least {minimum} (got {value})")


def check_image_size(size: int | None, flag: str = "--image-size") -> None:
    """A side in pixels: positive and at most MAX_IMAGE_SIZE (memory grows with its square)."""
    if size is None:
        return
    if size < 1:
        raise ConfigError(f"{flag} must be greater than 0 (got {size})")
    if size > MAX_IMAGE_SIZE:
        raise ConfigError(f"{flag} {size} is too large: one {size}×{size} image takes {size * size * 3 / 2**30:.0f} GB "
                          f"as RGB bytes; the limit is {MAX_IMAGE_SIZE}")


def check_timesteps(timesteps: int, flag: str = "--timesteps") -> None:
    if not MIN_TIMESTEPS <= timesteps <= MAX_TIMESTEPS:
        raise ConfigError(f"{flag} must be from {MIN_TIMESTEPS} to {MAX_TIMESTEPS:,} (got {timesteps}): a noise "
                          "schedule goes from clean to noisy images in that many steps; 1000 is usual")


def check_columns(columns: int | None, count: int, flag: str = "--columns") -> None:
    """Images per grid row: at least 1, and no more than there are images."""
    if columns is not None and not 1 <= columns <= count:
        raise ConfigError(f"{flag} must be from 1 to the number of images ({count}), not {columns}")
