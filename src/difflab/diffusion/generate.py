"""Generate images from a difflab model: one request (request.py), its seeds, batching, conditioning,
progress, and the one sampling loop — for pixel and latent models, unconditional, class- or
text-conditioned, from noise or from an image (img2img, inpainting, depth-to-image, upscaling)."""

from __future__ import annotations

import torch

from difflab.diffusion.cfg import ClassifierFreeGuidance
from difflab.diffusion.guidance import loss_guidance
from difflab.diffusion.modes import Prepared, start
from difflab.diffusion.planning import Job, prepare
from difflab.diffusion.request import GenerationRequest
from difflab.diffusion.samplers import UNCLIPPED, scheduler_for
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
def generate(model: DiffusionModel, request: GenerationRequest, *, batch_size: int = 64,
             progress: bool = False) -> torch.Tensor:
    """The `request.count` images of `request` (a `GenerationRequest`: what to make and how) as a float
    tensor [count, C, H, W] in [0, 1] on the CPU. The request is checked against the model first
    (`request.check`). `batch_size` images are sampled at a time (it never changes an image); `progress`
    shows a bar. A model loaded in half precision (load_model(dtype=...)) runs in its own type, without
    autocast's copies."""
    if not isinstance(request, GenerationRequest):
        raise InputError(f"generate(model, request) takes a GenerationRequest, not {type(request).__name__}: "
                         "generate(model, GenerationRequest(4, prompts=\"a fox\"))")
    job = prepare(model, request)
    for part in model.modules():
        part.eval()
    count, steps = request.count, request.steps
    scheduler = scheduler_for(request.sampler, model.sampler_config)
    run_length = len(run_timesteps(scheduler, steps, job.inputs.strength))
    bar = progress_bar(total=-(-count // batch_size) * run_length, desc=f"sampling ({request.sampler})",
                       enabled=progress, leave=False)
    out = []
    with autocast(request.precision if model.dtype == torch.float32 else "no", model.device):
        for first in range(0, count, batch_size):
            out.append(generate_batch(model, request, job, scheduler, first, min(batch_size, count - first), bar))
    bar.close()
    return torch.cat(out)


def autocast(precision: str, device: torch.device):
    """Mixed precision for the networks, or nothing for "no"."""
    from contextlib import nullcontext

    from difflab.devices import auto_precision

    if precision == "auto":
        precision = auto_precision(device)
    if precision == "no":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def generate_batch(model: DiffusionModel, request: GenerationRequest, job: Job, scheduler, first: int, n: int,
                   bar) -> torch.Tensor:
    """Images first … first+n-1 of a request, in [0, 1] on the CPU."""
    generators = image_generators(request.seed, n, first)
    timesteps = run_timesteps(scheduler, request.steps, job.inputs.strength, model.device)
    begin = start(model, job.inputs, generators, scheduler, timesteps)
    # Only the guided model function keeps the conditioning (batched for guidance), not a second copy.
    model_fn = counted(model_function(model, *job.conditioning(first, n, begin), job.guidance), bar)
    decode = model.codec.decode if model.codec is not None else None
    model_fn = loss_guidance(model_fn, request.guidance, model.noise_schedule, timesteps, request.guidance_mode,
                             decode=decode)
    if request.sampler in UNCLIPPED and not model.latent:
        model_fn = clip_x0(model_fn, model.noise_schedule)
    x = denoise(model_fn, scheduler, begin.sample, timesteps, generators=generators, eta=request.eta,
                after_step=begin.after_step)
    images = decode(x) if decode is not None else x
    if request.safety_check and model.safety_checker is not None:
        from difflab.models.safety import black_out_flagged

        images = black_out_flagged(model, images)
    return to_unit_range(images).float().cpu()


__all__ = ["generate", "GenerationRequest", "row_labels", "model_function", "Prepared"]
