"""The README.md model card written into every model folder."""

from __future__ import annotations

from difflab.models.model import DiffusionModel

SCHEDULE_NAMES = {"squaredcos_cap_v2": "cosine"}


def model_card(model: DiffusionModel, name: str, config_toml: str = "") -> str:
    info, schedule = model.info, model.noise_schedule.config
    training = info.training
    parameters = sum(p.numel() for p in model.denoiser.parameters())
    colour = "grey" if info.channels == 1 else "RGB"
    origin = f"fine-tuned from `{info.base_model}`" if info.base_model else "trained from scratch"
    rows = [
        ("data", f"`{info.data}`" + (f" ({training['images']:,} images)" if "images" in training else "")),
        ("network", f"diffusers UNet2DModel, {parameters / 1e6:.2f} M parameters"
                    + (f" (preset `{training['preset']}`)" if "preset" in training else "")),
        ("noise schedule", f"{SCHEDULE_NAMES.get(schedule.beta_schedule, schedule.beta_schedule)}, "
                           f"{schedule.num_train_timesteps} steps, predicts {model.prediction}"),
    ]
    if "steps" in training:
        rows.append(("training", f"{training['steps']:,} optimizer steps, {training.get('images_seen', 0):,} "
                                 f"images seen, {training.get('minutes', 0):.1f} minutes on {training.get('device', '?')}"))
    if training.get("ema_decay"):
        rows.append(("weights", f"exponential moving average (decay {training['ema_decay']})"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    config_block = f"\n## Settings\n\nThe run's full `config.toml`:\n\n```toml\n{config_toml}```\n" if config_toml else ""
    return f"""---
library_name: diffusers
pipeline_tag: unconditional-image-generation
tags:
- difflab
- diffusion-models-class
- pytorch
---

# {name}

A {info.image_size}×{info.image_size} {colour} image diffusion model, {origin} with
difflab on `{info.data}`.

| | |
|---|---|
{table}

## Use

With difflab (image *i* of a batch uses seed `SEED + i`):

```bash
difflab sample --model {name} -n 16 --sampler dpm++2m --steps 20 --seed 0 --out grid.png
```

With plain diffusers (the same images as `difflab sample --sampler ddpm --steps 1000 --seed 0`):

```python
import torch
from diffusers import DDPMPipeline

pipe = DDPMPipeline.from_pretrained("{name}")
generators = [torch.Generator().manual_seed(i) for i in range(16)]
images = pipe(batch_size=16, generator=generators, num_inference_steps=1000).images
```

Any diffusers scheduler can replace the DDPM one, for example
`pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)` for 20-step sampling.
{config_block}"""
