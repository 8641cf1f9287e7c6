"""Weights in a pickle (.bin, .ckpt, .pt, .pth, .pkl), read without running code: only when the user
opted in, and only through torch's weights-only unpickler."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from difflab.errors import ModelError


def load_pickled_weights(path: Path) -> dict:
    """A state dict from a pickle, read with torch.load(weights_only=True): that unpickler builds only
    tensors and plain containers, and refuses anything else without running it."""
    import pickle

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # about pickle protocols; the outcome is what counts
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        what = f"it calls {found[1]}" if found else "it holds more than tensors"
        raise ModelError(
            f"{path} was refused: {what}, which could run code when unpickled; load only weights you trust, "
            "converted to safetensors"
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"cannot read {path} ({reason}); the file may be damaged") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint that wraps the weights
    if not (isinstance(state, dict) and state and all(torch.is_tensor(v) for v in state.values())):
        raise ModelError(f"{path} does not hold model weights (a mapping of names to tensors)")
    return state
