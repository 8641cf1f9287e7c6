"""Which device to run on, and which precision runs fast on it."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path

import torch

from difflab.errors import ConfigError

# x86 instruction sets that do bf16 matrix arithmetic natively: with either, bf16 autocast measured
# about twice fp32's training speed (AMX: 168.8 against 84.4 images/s; AVX-512 BF16 on an AMD EPYC:
# 153.8 against 88.4; docs/benchmarks.md). Without them bf16 is emulated and slower.
FAST_BF16_FLAGS = {"amx_bf16", "avx512_bf16"}
X86_FLAG = "sse2"  # every x86-64 CPU lists it: the flags are x86's, so the absence of the above is meaningful
BF16_SPEEDUP_NEEDED = 1.3  # what a measured speed-up must reach to choose bf16 where the flags cannot tell
DEVICE_TYPES = ("cpu", "cuda", "mps")
FAST_BF16_CUDA_MAJOR = 8  # compute capability from which CUDA GPUs compute in bf16 natively (Ampere)


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


def auto_precision(device: str | torch.device = "auto") -> str:
    """The mixed precision that runs fast on `device`, in accelerate's names: bf16 on GPUs that have it,
    fp16 on older GPUs, none on Apple's GPUs; on the CPU, bf16 where it has AMX or AVX-512 BF16, else
    "no" (full precision)."""
    name = str(device)
    if name != "cpu" and torch.cuda.is_available() and not name.startswith("mps"):
        return cuda_precision(torch.device("cuda") if name == "auto" else torch.device(name))
    if name.startswith("mps") or (name == "auto" and pick_device("auto").type == "mps"):
        return "no"
    return cpu_precision(cpu_flags(), bf16_speedup)


def cuda_precision(device: torch.device) -> str:
    """bf16 from compute capability 8.0 (Ampere) on, fp16 below it. A T4 (7.5) answers
    torch.cuda.is_bf16_supported() with True, but emulates bf16 without its fast convolutions."""
    major, _ = torch.cuda.get_device_capability(device)
    return "bf16" if major >= FAST_BF16_CUDA_MAJOR and torch.cuda.is_bf16_supported() else "fp16"


def cpu_precision(flags: set[str] | None, measure_speedup: Callable[[], float]) -> str:
    """bf16 if the CPU's feature flags promise fast bf16; "no" if they are x86 flags without it; where
    they cannot tell (no flags, another architecture), bf16 only if a quick measurement finds it faster."""
    if flags is not None and flags & FAST_BF16_FLAGS:
        return "bf16"
    if flags is not None and X86_FLAG in flags:
        return "no"
    return "bf16" if measure_speedup() >= BF16_SPEEDUP_NEEDED else "no"


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """The CPU's feature flags (Linux's /proc/cpuinfo), or None where they cannot be read."""
    flags = cpuinfo_field(("flags", "Features"), cpuinfo)  # x86, ARM
    return None if flags is None else set(flags.split())


def cpu_model_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The CPU's model name as the system reports it (for benchmark rows), or None."""
    return cpuinfo_field(("model name",), cpuinfo)


def cpuinfo_field(keys: tuple[str, ...], cpuinfo: Path) -> str | None:
    """The first value of one of `keys` in /proc/cpuinfo, or None where it cannot be read."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in keys:
            return value.strip()
    return None


@functools.cache
def bf16_speedup(repeats: int = 7) -> float:
    """fp32 time over bf16-autocast time of a small convolution's forward and backward pass (what
    training does), about 0.3 s once per process, on one thread. The two alternate and the fastest run of each counts,
    so that other work on the machine hurts neither."""
    conv = torch.nn.Conv2d(32, 32, 3, padding=1)
    x = torch.randn(32, 32, 16, 16)

    def seconds(bf16: bool) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = conv(x)
        y.float().square().mean().backward()
        return time.perf_counter() - start

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ratio per core is what counts, and threads waiting on a busy core blur it
    try:
        seconds(False), seconds(True)  # warm-up: kernels chosen, weights packed
        fp32, bf16 = zip(*[(seconds(False), seconds(True)) for _ in range(repeats)])
    finally:
        torch.set_num_threads(threads)
    return min(fp32) / max(min(bf16), 1e-9)
def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
