"""Colour and CLIP guidance for the demo, as terms from `difflab.diffusion.guidance`.

The demo offers each kind only where the library has it (`color_guidance`, `clip_guidance`) and, for
CLIP, only when a CLIP model was given; the page hides the controls of the others.
"""

from __future__ import annotations

import importlib
import re

from difflab.errors import ConfigError

FALLBACK_COLOR_SCALE = 40.0  # the course's colour guidance scale, used where the library names none
FALLBACK_CLIP_SCALE = 8.0
MAX_PROMPT_CHARS = 300
RGB_FUNCTION = re.compile(r"rgba?\(\s*([\d.]+)\s*,\s*([\d.]+)\s*,\s*([\d.]+)\s*(?:,\s*[\d.]+\s*)?\)")


def guidance_api():
    """`difflab.diffusion.guidance` if it has colour guidance terms, else None."""
    module = importlib.import_module("difflab.diffusion.guidance")
    return module if hasattr(module, "color_guidance") else None


def hex_color(text) -> str:
    """'#rrggbb' from what a colour picker sends: '#rgb', '#rrggbb' or 'rgb(a)(r, g, b[, a])'."""
    value = str(text or "").strip().lower()
    found = RGB_FUNCTION.fullmatch(value)
    if found:
        channels = [round(float(c)) for c in found.groups()]
        if all(0 <= c <= 255 for c in channels):
            return "#" + "".join(f"{c:02x}" for c in channels)
    elif re.fullmatch(r"#[0-9a-f]{3}", value):
        return "#" + "".join(c * 2 for c in value[1:])
    elif re.fullmatch(r"#[0-9a-f]{6}", value):
        return value
    raise ConfigError(f"colour {text!r} is not a colour; give it as #rrggbb, e.g. #55ffaa")


class Guides:
    def __init__(self, clip_model: str | None = None, device=None):
        self.api = guidance_api()
        self.color = self.api is not None
        self.clip = None
        if clip_model:
            if self.api is None or not hasattr(self.api, "clip_guidance"):
                raise ConfigError("--clip-model needs CLIP guidance, which this version of difflab does not have")
            self.clip = self.api.load_clip(str(clip_model), device=device)
        self.default_color_scale = float(getattr(self.api, "DEFAULT_COLOR_SCALE", FALLBACK_COLOR_SCALE))
        self.default_clip_scale = float(getattr(self.api, "DEFAULT_CLIP_SCALE", FALLBACK_CLIP_SCALE))
        self.max_color_scale = 5 * self.default_color_scale if self.color else 0.0
        self.max_clip_scale = 5 * self.default_clip_scale if self.clip is not None else 0.0

    def check_color(self, text) -> str:
        color = hex_color(text)
        self.api.parse_color(color)  # the library's own check
        return color

    def check_prompt(self, prompt: str) -> None:
        if not prompt:
            raise ConfigError("CLIP guidance needs a prompt: describe what the images should look like")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ConfigError(f"the prompt is {len(prompt)} characters long; keep it under {MAX_PROMPT_CHARS}")

    def terms(self, request) -> list:
        """The guidance terms a checked request asks for."""
        terms = []
        if request.color_scale > 0:
            terms.append(self.api.color_guidance(self.api.parse_color(request.color), scale=request.color_scale))
        if request.clip_scale > 0:
            terms.append(self.api.clip_guidance(request.prompt, self.clip, scale=request.clip_scale))
        return terms
