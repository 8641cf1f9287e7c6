"""Generate images from a difflab model: one request's checks, seeds, batching, conditioning,
progress, and the one sampling loop — for pixel and latent models, unconditional, class- or
text-conditioned, from noise or from an image (img2img, inpainting, depth-to-image, upscaling)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from difflab.diffusion.cfg import ClassifierFreeGuidance
from difflab.diffusion.guidance import GuidanceTerm, loss_guidance
from difflab.diffusion.modes import Prepared, start
from difflab.diffusion.request import prepare
from difflab.diffusion.samplers import DEFAULT_SAMPLER, DEFAULT_STEPS, UNCLIPPED, make_sampler
from difflab.diffusion.sampling import ModelFn, clip_x0, denoise, run_timesteps, to_unit_range
from difflab.errors import InputError
from difflab.models.conditioning import Conditioning
from difflab.models.model import DiffusionModel
from difflab.progress import progress_bar
from difflab.seeds import image_generators


def row_labels(num_classes: int, per_row: int) -> torch.Tensor:
    """Labels for a grid with one row per class: 0,0,...,1,1,...."""
    return torch.arange(num_classes).repeat_interleave(per_row)


def model_function(model: DiffusionModel, conditioning: Conditioning | None, unconditional: Conditioning | None,
                   cfg: ClassifierFreeGuidance | float) -> ModelFn:
    """The model as a function of (x_t, t), conditioned, with classifier-free guidance (a scale, or the
    scale with its interval and rescale) when it has an unconditional twin."""
    if unconditional is None:
        return lambda x, t: model.denoiser(x, t, conditioning)
    cfg = cfg if isinstance(cfg, ClassifierFreeGuidance) else ClassifierFreeGuidance(cfg)
    return cfg.wrap(model.denoiser, conditioning, unconditional, model.noise_schedule)


def counted(model_fn: ModelFn, bar) -> ModelFn:
    """`model_fn`, ticking the progress bar at each call."""
    def fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        bar.update()
        return model_fn(x_t, t)

    return fn


@torch.no_grad()
def generate(model: DiffusionModel, count: int, *, sampler: str = DEFAULT_SAMPLER, steps: int = DEFAULT_STEPS,
             seed: int = 0, eta: float | None = None, class_labels: torch.Tensor | None = None,
             prompts: str | Sequence[str] | None = None, negative_prompt: str | Sequence[str] | None = None,
             cfg_scale: float | None = None, cfg_interval=None, cfg_rescale: float | None = None,
             image=None, mask=None, depth=None, strength: float | None = None,
             noise_level: int | None = None, width: int | None = None, height: int | None = None,
             guidance: Sequence[GuidanceTerm] = (), guidance_mode: str = "fast", batch_size: int = 64,
             progress: bool = False, safety_check: bool = True, precision: str = "no",
             blend: Sequence[tuple[str, float] | str] = (), prompt_embeds: torch.Tensor | None = None,
             negative_prompt_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """`count` images as a float tensor [count, C, H, W] in [0, 1] on the CPU.

    Image i depends only on seed + i and its own inputs, not on `batch_size`. Conditioning:
    `class_labels` (one per image) for class-conditional models; `prompts` (one, or one per image,
    in A1111's syntax: docs/prompts.md) and `negative_prompt` for text models, `blend` mixing other
    prompts into each (("a leopard", 0.5) or "a leopard:0.5"), or the embeddings themselves
    (`prompt_embeds` [1 or count, tokens, width], `negative_prompt_embeds`, as diffusers' pipelines
    take them); classifier-free guidance at `cfg_scale`, only at noise levels σ in `cfg_interval` ((low, high)
    or "low-high"), rescaled by `cfg_rescale` in [0, 1] (diffusion/cfg.py; defaults: the model's). Where sampling
    starts: `image` (a path, PIL image or [C, H, W] tensor in [0, 1]) with `strength` (img2img;
    depth-to-image with `depth` or the model's depth estimator), `image` + `mask` (inpainting, white =
    repaint), `image` + `noise_level` (the ×4 upscaler's low-res input).
    `guidance` terms steer every image through x̂₀ (decoded, for latent models), with the gradient
    through x̂₀ only (`guidance_mode="fast"`) or through the network too ("full"). A safety checker
    in the model's folder blacks out flagged images unless `safety_check=False`. `precision` "bf16" or
    "fp16" runs fp32 networks under autocast (the samplers' arithmetic stays fp32); "auto" picks what
    runs fast on the model's device (devices.auto_precision); "no" is exact fp32. A model loaded in
    half precision (load_model(dtype=...)) runs in its own type, without autocast's copies."""
    job = prepare(model, count, class_labels=class_labels, prompts=prompts, negative_prompt=negative_prompt,
                  cfg_scale=cfg_scale, cfg_interval=cfg_interval, cfg_rescale=cfg_rescale,
                  image=image, mask=mask, depth=depth, strength=strength,
                  noise_level=noise_level, width=width, height=height, blend=blend, prompt_embeds=prompt_embeds,
                  negative_prompt_embeds=negative_prompt_embeds, seed=seed)
    for part in model.modules():
        part.eval()
    scheduler = make_sampler(sampler, model.sampler_config)
    run_length = len(run_timesteps(scheduler, steps, job.inputs.strength))
    if run_length == 0:
        raise InputError(f"strength {job.inputs.strength} of {steps} steps is no step at all: raise --strength or "
                         f"--steps (at least {math.ceil(1 / job.inputs.strength)} steps at this strength)")
    bar = progress_bar(total=-(-count // batch_size) * run_length, desc=f"sampling ({sampler})",
                       enabled=progress, leave=False)
    out = []
    with autocast(precision if model.dtype == torch.float32 else "no", model.device):
        for first in range(0, count, batch_size):
            out.append(generate_batch(model, job, scheduler, first, min(batch_size, count - first), bar, steps=steps,
                                      seed=seed, eta=eta, sampler=sampler, guidance=guidance,
                                      guidance_mode=guidance_mode, safety_check=safety_check))
    bar.close()
    return torch.cat(out)


def autocast(precision: str, device: torch.device):
    """Mixed precision for the networks, or nothing for "no"."""
    from contextlib import nullcontext

    from difflab.devices import auto_precision

    if precision == "auto":
        precision = auto_precision(device)
    if precision not in ("no", "bf16", "fp16"):
        raise InputError(f"unknown precision {precision!r}; choose auto, no, bf16 or fp16")
    if precision == "no":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def generate_batch(model: DiffusionModel, job, scheduler, first: int, n: int, bar, *, steps: int, seed: int,
                   eta: float | None, sampler: str, guidance: Sequence[GuidanceTerm], guidance_mode: str,
                   safety_check: bool) -> torch.Tensor:
    """Images first … first+n-1 of a request, in [0, 1] on the CPU."""
    generators = image_generators(seed, n, first)
    timesteps = run_timesteps(scheduler, steps, job.inputs.strength, model.device)
    begin = start(model, job.inputs, generators, scheduler, timesteps)
    # Only the guided model function keeps the conditioning (batched for guidance), not a second copy.
    model_fn = counted(model_function(model, *job.conditioning(first, n, begin), job.guidance), bar)
    decode = model.codec.decode if model.codec is not None else None
    model_fn = loss_guidance(model_fn, guidance, model.noise_schedule, timesteps, guidance_mode, decode=decode)
    if sampler in UNCLIPPED and not model.latent:
        model_fn = clip_x0(model_fn, model.noise_schedule)
    x = denoise(model_fn, scheduler, begin.sample, timesteps, generators=generators, eta=eta,
                after_step=begin.after_step)
    images = decode(x) if decode is not None else x
    if safety_check and model.safety_checker is not None:
        from difflab.models.safety import black_out_flagged

        images = black_out_flagged(model, images)
    return to_unit_range(images).float().cpu()


__all__ = ["generate", "row_labels", "model_function", "Prepared"]
