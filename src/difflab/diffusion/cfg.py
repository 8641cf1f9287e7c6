"""Classifier-free guidance as one value: the scale, the interval of noise levels where it acts, and
the rescale that keeps the guided prediction's spread.

    pred = pred(x, ∅) + scale · (pred(x, c) − pred(x, ∅))          where σ_low < σ ≤ σ_high
    pred = pred(x, c)                                               elsewhere (scale 1: one pass)
    pred ← φ · pred · std(pred(x, c)) / std(pred) + (1 − φ) · pred   (rescale φ, per image)

The interval is Kynkäänniemi et al. (2024), "Applying guidance in a limited interval improves sample
and distribution quality in diffusion models": strong guidance at high noise levels collapses the
images of one prompt onto one layout, at low ones it does little; guiding only the middle keeps the
variety and the prompt. It is given in the noise level σ = √((1 − ᾱ_t) / ᾱ_t) of the model's training
schedule, as in the paper, so it means the same for every sampler, step count and schedule.
The rescale is Lin et al. (2023), "Common diffusion noise schedules and sample steps are flawed" §3.4,
exactly as diffusers' `guidance_rescale` computes it (on the network's prediction, whatever it is).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from difflab.diffusion.predictions import alpha_bar
from difflab.errors import InputError
from difflab.models.conditioning import Conditioning

EVERYWHERE = (0.0, math.inf)  # plain CFG: every noise level
# What a text model difflab trains records as its default guidance (difflab.json's `guidance`); empty: the
# kind's plain scale. Only a setting that meets issue 29's target on `shapes` goes here (docs/benchmarks.md).
TRAINED_TEXT_GUIDANCE: dict = {}


@dataclass(frozen=True)
class ClassifierFreeGuidance:
    scale: float
    interval: tuple[float, float] = EVERYWHERE  # (σ_low, σ_high]: the noise levels where it guides
    rescale: float = 0.0  # φ in [0, 1]: 0 plain, 1 the guided prediction takes the conditional one's spread

    def __post_init__(self):
        scale, (low, high), rescale = self.scale, self.interval, self.rescale
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale >= 0):
            raise InputError(f"the classifier-free guidance scale must be a finite number, 0 or more (got {scale})")
        if not (math.isfinite(low) and 0 <= low < high and not math.isnan(high)):
            raise InputError(f"the guidance interval {interval_text(self.interval)} must be two noise levels "
                             "LOW-HIGH with 0 <= LOW < HIGH (sigma units; HIGH may be inf), e.g. 0.3-5")
        if not (math.isfinite(rescale) and 0 <= rescale <= 1):
            raise InputError(f"the guidance rescale must be a number from 0 (none) to 1 (full), got {rescale:g} "
                             "(0.7 is the paper's)")
        object.__setattr__(self, "interval", (float(low), float(high)))

    @property
    def plain(self) -> bool:
        """Every noise level guided, no rescale: the textbook formula."""
        return self.interval == EVERYWHERE and self.rescale == 0

    def acts_at(self, sigma: float) -> bool:
        low, high = self.interval
        return low < sigma <= high

    def combine(self, unconditioned: torch.Tensor, conditioned: torch.Tensor) -> torch.Tensor:
        """The guided prediction from the two, rescaled (as diffusers' `rescale_noise_cfg`) when asked."""
        guided = unconditioned + self.scale * (conditioned - unconditioned)
        if self.rescale == 0:
            return guided
        dims = list(range(1, guided.ndim))
        rescaled = guided * (conditioned.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
        return self.rescale * rescaled + (1 - self.rescale) * guided

    def wrap(self, denoiser, conditioning: Conditioning, unconditional: Conditioning, noise_schedule=None):
        """The guided model function (x_t, t) -> prediction: both halves from one batched forward pass (the
        unconditional half first, as diffusers batches it) where it guides, the conditional one alone
        elsewhere. `noise_schedule` (the model's training schedule) turns t into σ for the interval."""
        if self.scale == 1.0:
            return lambda x, t: denoiser(x, t, conditioning)
        both = Conditioning.cat([unconditional, conditioning])
        sigma_of = noise_levels(noise_schedule) if self.interval != EVERYWHERE else None

        def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if sigma_of is not None and not self.acts_at(sigma_of(t)):
                return denoiser(x, t, conditioning)
            unconditioned, conditioned = denoiser(torch.cat([x, x]), t, both).chunk(2)
            return self.combine(unconditioned, conditioned)

        return guided

    def settings(self, include_scale: bool = False) -> dict:
        """What a PNG's settings (and an evaluation's figures) record: the interval and rescale where they
        are not plain, after the scale if asked."""
        out = {"cfg_scale": self.scale} if include_scale else {}
        if self.interval != EVERYWHERE:
            out["cfg_interval"] = interval_text(self.interval)
        if self.rescale:
            out["cfg_rescale"] = self.rescale
        return out


def noise_levels(noise_schedule):
    """t -> σ_t = √((1 − ᾱ_t) / ᾱ_t) of the schedule (fractional t interpolated; one σ per step)."""
    if noise_schedule is None:
        raise ValueError("a guidance interval needs the model's noise schedule to tell the noise level of a step")
    alphas_cumprod = noise_schedule.alphas_cumprod

    def sigma(t: torch.Tensor) -> float:
        abar = float(alpha_bar(alphas_cumprod, torch.as_tensor(t).detach().cpu().reshape(-1)[:1])[0])
        return math.sqrt((1 - abar) / abar)

    return sigma


def interval_text(interval) -> str:
    low, high = interval
    return f"{low:g}-{high:g}"


def parse_interval(text) -> tuple[float, float]:
    """'0.3-5', '0.3-inf' (sigma units) -> (0.3, 5.0); a tuple or list passes through. A one-line
    InputError for anything else."""
    if isinstance(text, (tuple, list)):
        if len(text) != 2:
            raise InputError(f"the guidance interval is two noise levels (LOW, HIGH), got {list(text)}")
        return number(text[0], "LOW"), number(text[1], "HIGH")
    text = str(text).strip()
    for i, char in enumerate(text):  # the dash between two numbers (not one of an exponent: 1e-3-5)
        if char == "-" and 0 < i < len(text) - 1 and text[i - 1].lower() != "e":
            try:
                return float(text[:i]), float(text[i + 1:])
            except ValueError:
                continue
    raise InputError(f"--cfg-interval {text!r} is not LOW-HIGH: two noise levels (sigma) such as 0.3-5 or 1-inf")


def number(value, what: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InputError(f"the guidance interval's {what} must be a number, got {value!r}") from None


def check_options(interval=None, rescale=None) -> None:
    """An interval and a rescale as given (None: not given), before any model is loaded."""
    ClassifierFreeGuidance(1.0, EVERYWHERE if interval is None else parse_interval(interval),
                           0.0 if rescale is None else rescale)


def guidance_of(model, scale=None, interval=None, rescale=None) -> ClassifierFreeGuidance:
    """The request's guidance: what is given, the rest from the model's defaults (its folder's, for text
    models difflab trained; 7.5 plain for Stable Diffusion folders)."""
    defaults = model.default_guidance
    scale = model.default_cfg_scale if scale is None else scale
    interval = defaults.get("cfg_interval", EVERYWHERE) if interval is None else interval
    rescale = defaults.get("cfg_rescale", 0.0) if rescale is None else rescale
    try:
        scale, rescale = float(scale), float(rescale)
    except (TypeError, ValueError):
        raise InputError(f"the guidance scale and rescale must be numbers (got {scale!r}, {rescale!r})") from None
    return ClassifierFreeGuidance(scale, parse_interval(interval), rescale)
