"""Which device to run on."""

from __future__ import annotations

import torch

from difflab.errors import ConfigError

DEVICE_TYPES = ("cpu", "cuda", "mps")


def pick_device(name: str = "auto") -> torch.device:
    """The device `name` names (auto: the best one here); one that does not exist or is not available
    here is a ConfigError, never a silent fall-back to the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(f"--device {name}: this machine has {count} CUDA GPU{'s' * (count != 1)} "
                              f"(cuda:0 to cuda:{count - 1})")
    if device.type == "mps" and not _mps_available():
        raise ConfigError(f"--device {name}: Apple's MPS is not available here; use --device cpu")
    return device


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
