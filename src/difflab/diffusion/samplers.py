"""Samplers by name. Each is a diffusers scheduler built from the model's training noise schedule,
so that `difflab sample --sampler X` and plain diffusers with the same scheduler agree exactly."""

from __future__ import annotations

from typing import Any

from difflab.errors import ConfigError
from difflab.models.schedules import check_choice

# Heun, LMS and PNDM combine predictions across steps in ways that amplify errors by up to
# sqrt(1/ᾱ) at the first step, which is ~10^4 when the schedule ends at ᾱ ≈ 0 (cosine does): they
# start one step below pure noise ("leading" spacing) instead of at the last timestep.
_LEADING = {"timestep_spacing": "leading", "steps_offset": 1}

# name -> (diffusers scheduler class, settings on top of the model's noise-schedule config)
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", _LEADING),
    "unipc": ("UniPCMultistepScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True, **_LEADING}),
    "lms": ("LMSDiscreteScheduler", _LEADING),
}
# Samplers with no x̂₀ clipping of their own: difflab clips for them (see sampling.clip_x0).
UNCLIPPED = {"euler", "euler-a", "heun", "lms", "pndm"}
DEFAULT_SAMPLER = "dpm++2m"
DEFAULT_STEPS = 20
# Loss guidance takes its gradient through x̂₀ only (fast) or through the network too (full); see guidance.py.
GUIDANCE_MODES = ("fast", "full")


def scheduler_for(name: str, noise_schedule_config):
    """A fresh scheduler for sampler `name` (schedulers keep per-run state, so never share one)."""
    import diffusers

    check_choice("sampler", name, SAMPLERS)
    class_name, settings = SAMPLERS[name]
    return getattr(diffusers, class_name).from_config(noise_schedule_config, **settings)


def check_sampler_steps(steps: int, timesteps: int, sampler: str | None = None, flag: str = "--steps") -> None:
    """A sampler walks down the training timesteps: at least 1 step, at most one per timestep (one
    fewer for the samplers that start one step below pure noise, whose timesteps are offset by 1)."""
    most = timesteps - SAMPLERS.get(sampler, ("", {}))[1].get("steps_offset", 0)
    if steps < 1:
        raise ConfigError(f"{flag} must be at least 1 (got {steps})")
    if steps > most:
        raise ConfigError(f"{flag} {steps} is more than {sampler or 'a sampler'} can take from the model's noise "
                          f"schedule of {timesteps} timesteps; use at most {most} (20-50 is usual)")
