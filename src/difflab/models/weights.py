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
from difflab.layout import PICKLE_SUFFIXES

# No trained network holds a weight anywhere near this (UNets' largest are in the tens); random bytes
# read as float32 exceed it about four times in ten.
ABSURD_MAGNITUDE = 1e8


# Scanning every value of a large model reads all its bytes: for SD 1.5's 4 GB, which safetensors maps
# without reading, that is 13 s of a 15 s load (diffusers' own load: 1 s). Above this size each module's
# tensors are scanned instead when the module first runs (sampling reads those bytes then anyway).
LAZY_ABOVE_BYTES = 256 * 2**20


def check_weights(weights, path: str | Path):
    """`weights` (a module or a state dict) as they are; ModelError naming `path` (the file they came
    from) and the tensor if any floating-point value is NaN, infinite or of an absurd magnitude. A
    module larger than LAZY_ABOVE_BYTES is checked lazily: each sub-module's own tensors when it first
    runs (see check_on_first_use)."""
    if isinstance(weights, torch.nn.Module):
        size = sum(t.numel() * t.element_size() for t in [*weights.parameters(), *weights.buffers()])
        if size > LAZY_ABOVE_BYTES:
            check_on_first_use(weights, path)
            return weights
        tensors = weights.state_dict()
    else:
        tensors = weights
    for name, tensor in tensors.items():
        check_tensor(name, tensor, path)
    return weights


def check_tensor(name: str, tensor, path: str | Path) -> None:
    """ModelError if `tensor` holds a NaN, an infinity or an absurd magnitude. One pass over the values
    (aminmax propagates NaN), and the counting for the message only when something is wrong."""
    if not torch.is_tensor(tensor) or not tensor.is_floating_point() or tensor.numel() == 0:
        return
    values = tensor.detach()
    low, high = values.aminmax()
    if bool(low >= -ABSURD_MAGNITUDE) and bool(high <= ABSURD_MAGNITUDE):
        return
    bad = ~torch.isfinite(values) | (values.abs() > ABSURD_MAGNITUDE)
    raise ModelError(
        f"{path} is damaged: {int(bad.sum()):,} of the {values.numel():,} values of {name} are "
        f"{_what(values[bad])}; save, copy or download the model again"
    )


def check_on_first_use(module: torch.nn.Module, path: str | Path) -> None:
    """A forward pre-hook on every sub-module that holds tensors of its own: the first time it runs, its
    tensors are checked (as check_tensor) and the hook removes itself."""
    for prefix, sub in module.named_modules():
        own = [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]
        if not own:
            continue

        def check(sub, _inputs, prefix=prefix):
            for name, tensor in [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]:
                check_tensor(f"{prefix}.{name}" if prefix else name, tensor, path)
            sub._difflab_weight_check.remove()
            del sub._difflab_weight_check

        sub._difflab_weight_check = sub.register_forward_pre_hook(check)


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
                                                             and p.suffix in PICKLE_SUFFIXES)
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
