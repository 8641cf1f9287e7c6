"""A tiny Stable Diffusion folder and two LoRAs for it, with random non-zero weights (as if trained): "a" on the
UNet and the text encoder, in a run folder whose config.toml names its base (as a LoRA DreamBooth run's does);
"b" on the UNet only, in a plain folder."""

from __future__ import annotations

from pathlib import Path

import torch

import tiny_sd


def randomize(parameters, seed: int) -> None:
    """Adapters start as a no-op (B = 0); these get random non-zero weights."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in parameters:
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)


def tiny_loras(root: Path) -> dict[str, Path]:
    from difflab.models import lora as adapters
    from difflab.storage import lora
    from difflab.storage.folder import load_model

    base = tiny_sd.build(root / "tiny-sd", "text")
    model = load_model(base)
    randomize(adapters.add_lora(model, 2, 3.0, text_encoder=True), 1)
    run = root / "lora-run"
    run.mkdir()
    (run / "config.toml").write_text(f'[model]\nbase = "{base}"\n')
    lora.save_lora(model, run / "model")
    model = load_model(base)
    randomize(adapters.add_lora(model, 3, 3.0), 2)
    lora.save_lora(model, root / "lora-b")
    return {"base": base, "a": run, "b": root / "lora-b"}
