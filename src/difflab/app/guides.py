"""Colour and CLIP guidance for the demo, as terms of `difflab.diffusion.guidance`.

Colour guidance is always offered (grey models are pulled towards the colour's brightness); CLIP
guidance only when the demo was started with a CLIP model.
"""

from __future__ import annotations

from difflab.errors import ConfigError

MAX_PROMPT_CHARS = 300


def hex_color(text) -> str:
    """'#rrggbb' from what a colour picker or an API client sends ('#rrggbb', '#rgb', 'rgb(a)(r, g, b[, a])'
    or a basic colour name)."""
    from difflab.diffusion import guidance  # torch comes with it: not at import time (difflab --help)

    return "#" + "".join(f"{round(c * 255):02x}" for c in guidance.parse_color(str(text or "").strip() or "?"))


class Guides:
    def __init__(self, clip_model: str | None = None, device=None):
        from difflab.diffusion import guidance

        self.clip = guidance.load_clip(str(clip_model), device=device) if clip_model else None
        self.default_color_scale = guidance.DEFAULT_COLOR_SCALE
        self.default_clip_scale = guidance.DEFAULT_CLIP_SCALE
        self.max_color_scale = 5 * self.default_color_scale
        self.max_clip_scale = 5 * self.default_clip_scale if self.clip is not None else 0.0

    def check_prompt(self, prompt: str) -> None:
        if not prompt:
            raise ConfigError("CLIP guidance needs a prompt: describe what the images should look like")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ConfigError(f"the prompt is {len(prompt)} characters long; keep it under {MAX_PROMPT_CHARS}")

    def terms(self, request) -> list:
        """The guidance terms a checked request asks for."""
        from difflab.diffusion import guidance

        terms = []
        if request.color_scale > 0:
            terms.append(guidance.color_guidance(guidance.parse_color(request.color), scale=request.color_scale))
        if request.clip_scale > 0:
            terms.append(guidance.clip_guidance(request.prompt, self.clip, scale=request.clip_scale))
        return terms
