"""How many images one call may take, from the memory free on the device.

Work done once over many images (encoding a data set's latents, generating class images, decoding a
sample grid) goes in batches sized here, never the whole set in one call: at Stable Diffusion's 512 px one
image through the VAE's encoder holds about 0.64 GiB of activations and through its decoder about
1.15 GiB (fp32, measured for issue 25), so a batch fitted to a tiny model's 16 px latents would need a
hundred GiB there.
"""

from __future__ import annotations

from pathlib import Path

import torch

GIB = 1 << 30
# Activation memory per pixel of the image, in fp32 (half types: half of it), measured at 512 x 512.
VAE_ENCODE_BYTES_PER_PIXEL = 0.64 * GIB / (512 * 512)
VAE_DECODE_BYTES_PER_PIXEL = 1.15 * GIB / (512 * 512)
MEMORY_SHARE = 0.5  # of the free memory a batch may take: the rest is headroom for what else runs
CPU_FREE_FALLBACK = 4 * GIB  # where the free memory cannot be read


def free_memory(device: torch.device | str) -> int:
    """Bytes free on `device`: the GPU's free memory, or the system's available memory for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return cpu_available_memory()


def cpu_available_memory(meminfo: Path = Path("/proc/meminfo")) -> int:
    try:
        for line in meminfo.read_text(encoding="utf-8").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return CPU_FREE_FALLBACK


def batch_that_fits(bytes_per_item: float, device: torch.device | str, most: int) -> int:
    """The largest batch, at most `most` and at least 1, whose `bytes_per_item` each fit the share of
    the device's free memory that one call may take."""
    fits = int(free_memory(device) * MEMORY_SHARE // max(bytes_per_item, 1.0))
    return max(1, min(most, fits))


def vae_batch(height: int, width: int, dtype: torch.dtype, device: torch.device | str, most: int, *,
              decode: bool) -> int:
    """Images of `height` x `width` pixels that one VAE encode (or decode) call may take on `device`."""
    per_pixel = VAE_DECODE_BYTES_PER_PIXEL if decode else VAE_ENCODE_BYTES_PER_PIXEL
    scale = torch.finfo(dtype).bits / 32 if dtype.is_floating_point else 1.0
    return batch_that_fits(per_pixel * height * width * scale, device, most)
