"""Damaged model weights, named as such.

A weights file whose bytes were damaged (a bad disk, an interrupted copy, a bit flip) may still load:
safetensors checks the header and the file's length, not the values. Damaged float bytes read as NaN,
infinities or absurd magnitudes, and such a model samples black images or makes fine-tuning diverge,
with nothing to say why. Loading checks the values and names the file.
"""

from __future__ import annotations

from pathlib import Path

import torch

from difflab.errors import ModelError

# No trained network holds a weight anywhere near this (UNets' largest are in the tens); random bytes
# read as float32 exceed it about four times in ten.
ABSURD_MAGNITUDE = 1e8


def check_weights(weights, path: str | Path):
    """`weights` (a module or a state dict) as they are; ModelError naming `path` (the file they came
    from) if any floating-point value is NaN, infinite or of an absurd magnitude."""
    tensors = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
    for name, tensor in tensors.items():
        if not torch.is_tensor(tensor) or not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        values = tensor.detach()
        bad = ~torch.isfinite(values) | (values.abs() > ABSURD_MAGNITUDE)
        if bad.any():
            raise ModelError(
                f"{path} is damaged: {int(bad.sum()):,} of the {values.numel():,} values of {name} are "
                f"{_what(values[bad])}; save, copy or download the model again"
            )
    return weights


def check_safetensors_files(folder: Path) -> None:
    """Every .safetensors file in `folder` passes safetensors' own validation (a header that parses,
    tensors that fit in the file): a truncated or overwritten file is named, not a library's error."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError, ValueError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ModelError(f"{path} is damaged: it is not a complete safetensors file ({reason}); "
                             "save, copy or download the model again") from None


def weights_file(unet_dir: Path) -> Path:
    """The file a UNet folder's weights are read from, for messages."""
    files = sorted(unet_dir.glob("*.safetensors")) or sorted(p for p in unet_dir.iterdir() if p.is_file()
                                                             and p.suffix in {".bin", ".ckpt", ".pt", ".pth"})
    return files[0] if files else unet_dir


def _what(values: torch.Tensor) -> str:
    kinds = []
    if torch.isnan(values).any():
        kinds.append("NaN")
    if torch.isinf(values).any():
        kinds.append("infinite")
    if (torch.isfinite(values) & (values.abs() > ABSURD_MAGNITUDE)).any():
        kinds.append(f"beyond ±{ABSURD_MAGNITUDE:g}")
    return " or ".join(kinds)
