"""Image tensors to files: grids people can look at, PNGs with their generation settings."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw, PngImagePlugin

from difflab.files import atomic_path

MIN_GRID_CELL = 64  # small images are enlarged (nearest neighbour) so a grid is easy to see


def to_pil(image: torch.Tensor) -> Image.Image:
    """[C, H, W] float in [0, 1] -> PIL image (L or RGB)."""
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0))


def make_grid(images: torch.Tensor, columns: int | None = None, row_labels: list[str] | None = None,
              padding: int = 2) -> Image.Image:
    """Tile [N, C, H, W] images in [0, 1] into one picture, optionally with a label left of each row."""
    n, _, h, w = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    scale = max(1, MIN_GRID_CELL // max(h, w))
    cell_w, cell_h = w * scale + padding, h * scale + padding
    label_w = 0 if not row_labels else 8 + 7 * max(len(label) for label in row_labels)
    grid = Image.new("RGB", (label_w + columns * cell_w + padding, rows * cell_h + padding), "white")
    for i in range(n):
        tile = to_pil(images[i]).convert("RGB").resize((w * scale, h * scale), Image.Resampling.NEAREST)
        r, c = divmod(i, columns)
        grid.paste(tile, (label_w + padding + c * cell_w, padding + r * cell_h))
    if row_labels:
        draw = ImageDraw.Draw(grid)
        for r, label in enumerate(row_labels[:rows]):
            draw.text((4, padding + r * cell_h + cell_h // 2 - 6), label, fill="black")
    return grid


def save_png(image: Image.Image, path: str | Path, settings: dict | None = None) -> Path:
    """Write a PNG atomically (a crash never leaves half a file), with `settings` as JSON in its
    'difflab' text chunk so the image says how it was made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    if settings:
        info.add_text("difflab", json.dumps(settings, sort_keys=True))
        if "prompt" in settings:  # what AUTOMATIC1111, ComfyUI and image viewers read
            info.add_text("parameters", a1111_parameters(settings, image.size))
    with atomic_path(path) as partial:
        image.save(partial, format="PNG", pnginfo=info)
    return path


A1111_FIELDS = (("Steps", "steps"), ("Sampler", "sampler"), ("CFG scale", "cfg_scale"), ("Seed", "seed"),
                ("Denoising strength", "strength"), ("Model", "model"))


def a1111_parameters(settings: dict, size: tuple[int, int]) -> str:
    """The settings in AUTOMATIC1111's 'parameters' text: prompt, negative prompt, then key: value pairs."""
    lines = [str(settings["prompt"])]
    if settings.get("negative_prompt"):
        lines.append(f"Negative prompt: {settings['negative_prompt']}")
    pairs = [f"{label}: {settings[key]}" for label, key in A1111_FIELDS if key in settings]
    pairs.insert(4, f"Size: {size[0]}x{size[1]}")
    if settings.get("blend"):  # not an A1111 setting: shown, quoted as A1111 quotes values with commas
        pairs.append(f"Blend: {json.dumps(' | '.join(settings['blend']))}")
    lines.append(", ".join(pairs))
    return "\n".join(lines)


def png_settings(path: str | Path) -> dict | None:
    with Image.open(path) as img:
        text = img.info.get("difflab")
    return json.loads(text) if text else None

