"""Noise schedules by name: the forward process every model is trained with.

A difflab model's noise schedule *is* a diffusers `DDPMScheduler`; it is saved in the model folder
and every sampler is built from its config.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from difflab.errors import ConfigError

if TYPE_CHECKING:
    from diffusers import DDPMScheduler

# Our name -> diffusers' `beta_schedule` name.
SCHEDULES = {
    "linear": "linear",
    "scaled_linear": "scaled_linear",
    "cosine": "squaredcos_cap_v2",
    "sigmoid": "sigmoid",
}

# Our name -> diffusers' `prediction_type`: what the network is trained to output.
PREDICTIONS = {"epsilon": "epsilon", "v": "v_prediction", "x0": "sample"}


def check_choice(kind: str, value: str, choices) -> str:
    if value not in choices:
        raise ConfigError(f"unknown {kind} {value!r}; choose one of: {', '.join(choices)}")
    return value


def noise_scheduler(schedule: str = "linear", prediction: str = "epsilon", timesteps: int = 1000,
                    latent: bool = False) -> DDPMScheduler:
    """The training noise schedule. Its config also sets how samplers built from it behave, here and
    in plain diffusers: `timestep_spacing="trailing"` makes few-step samplers start from the last
    timestep, and thresholding at 1.0 clips the clean-image estimate x̂₀ to the image range [-1, 1]
    (without it, schedules whose last ᾱ is near zero, like cosine, blow up in the first step). Latents
    have no such range (`latent`): nothing is clipped, as in Stable Diffusion's own config, whose
    `steps_offset` it also takes so that diffusers' pipelines use the config as it is."""
    from diffusers import DDPMScheduler

    check_choice("noise schedule", schedule, SCHEDULES)
    check_choice("prediction type", prediction, PREDICTIONS)
    return DDPMScheduler(
        num_train_timesteps=timesteps,
        beta_schedule=SCHEDULES[schedule],
        prediction_type=PREDICTIONS[prediction],
        timestep_spacing="trailing",
        clip_sample=not latent,
        thresholding=not latent,
        sample_max_value=1.0,
        steps_offset=1 if latent else 0,
    )
