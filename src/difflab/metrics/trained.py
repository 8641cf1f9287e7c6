"""What the networks difflab trains for measuring share: their training loop and their cache.

The class-accuracy yardstick (`classifier.py`) and the attribute reader (`attributes.py`) are small
CNNs trained once — AdamW with a one-cycle learning rate — and kept as a safetensors file with a
JSON file of what they measured about themselves, next to the data when its folder is writable,
otherwise in `DIFFLAB_CACHE` (default ~/.cache/difflab). A damaged entry is trained again; an
unwritable cache only costs the training next time.

The ones the quickstarts need (the built-in digits' yardstick, the 32-px `shapes` reader) also ship with
difflab, in `readers/` under the same names, so that a fresh machine does not spend minutes training its
instruments first (2.3 of the 8.8 minutes of `quickstart --text` on a busy core: docs/benchmarks.md).
A name is a digest of everything the network depends on (architecture version, data, settings), so a
shipped file whose network has since changed is never found: it is trained and cached as before.
`python bench/ship_readers.py` writes them again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from difflab.progress import progress_bar

log = logging.getLogger("difflab")


def fit(network: nn.Module, steps: int, loss_at: Callable[[int], torch.Tensor], desc: str,
        lr: float = 3e-3, weight_decay: float = 1e-4) -> nn.Module:
    """`steps` optimizer steps on `loss_at(step)` (AdamW, one-cycle learning rate); returns the network
    in eval mode."""
    optimizer = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    network.train()
    for step in progress_bar(range(steps), desc=desc, leave=False):
        loss = loss_at(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return network.eval()


def cache_dir(data_spec: str) -> Path:
    """Next to the data when its folder is writable; otherwise the user's cache. A folder without its
    owner's write bit counts as read-only even for root, whom `os.access` lets write anywhere."""
    folder = Path(data_spec.split(":", 1)[-1]).expanduser()
    if folder.is_dir() and os.access(folder, os.W_OK) and folder.stat().st_mode & stat.S_IWUSR:
        return folder / ".difflab-cache"
    return Path(os.environ.get("DIFFLAB_CACHE", Path.home() / ".cache" / "difflab"))


def cache_stem(data_spec: str, name: str, key: list) -> Path:
    """Where the network `name` trained on `data_spec` with settings `key` is kept (without suffix)."""
    digest = hashlib.sha1(json.dumps(key).encode()).hexdigest()[:16]
    return cache_dir(data_spec) / f"{name}-{digest}"


SHIPPED = Path(__file__).parent / "readers"


def stored_stem(stem: Path) -> Path | None:
    """Where the network of `stem` is kept: the cache, else what ships with difflab; None: nowhere."""
    for candidate in (stem, SHIPPED / stem.name):
        if candidate.with_suffix(".safetensors").is_file() and candidate.with_suffix(".json").is_file():
            return candidate
    return None


def load_cached(stem: Path, build: Callable[[dict], nn.Module], what: str) -> tuple[nn.Module, dict] | None:
    """The cached (or shipped) network, made by `build(meta)`, in eval mode, and its meta data; or None
    when there is none or it is damaged (then it is trained again)."""
    from safetensors.torch import load_file

    stored = stored_stem(stem)
    if stored is None:
        return None
    weights, meta = stored.with_suffix(".safetensors"), stored.with_suffix(".json")
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
        network = build(info)
        network.load_state_dict(load_file(str(weights)))
        return network.eval(), info
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        log.warning("the cached %s %s is damaged (%s); training it again", what, weights, e)
        return None


def save_cached(stem: Path, network: nn.Module, meta: dict, what: str) -> None:
    from safetensors.torch import save_file

    try:
        stem.parent.mkdir(parents=True, exist_ok=True)
        save_file(network.state_dict(), str(stem.with_suffix(".safetensors")))
        stem.with_suffix(".json").write_text(json.dumps(meta), encoding="utf-8")
    except OSError as e:
        log.warning("could not cache the %s in %s (%s); it will be trained again next time", what, stem.parent, e)
