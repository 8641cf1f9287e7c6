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


# What --out may name: the suffix names the format. PNG keeps the settings in text chunks; JPEG and WebP
# in EXIF (A1111's `parameters` text in UserComment, as A1111 writes them; difflab's JSON in ImageDescription).
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
EXIF_IFD, USER_COMMENT, IMAGE_DESCRIPTION = 0x8769, 0x9286, 0x010E


def image_format(path: str | Path, flag: str = "--out") -> str:
    """The format `path`'s suffix names; OutputError for a suffix difflab does not write."""
    from difflab.errors import OutputError

    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_FORMATS:
        raise OutputError(f"{flag} {path}: difflab writes images as .png, .jpg (or .jpeg) and .webp, the format its "
                          f"suffix names, not {suffix or 'a name with no suffix'}; give, for example, "
                          f"{Path(path).with_suffix('.png')}")
    return IMAGE_FORMATS[suffix]


def save_png(image: Image.Image, path: str | Path, settings: dict | None = None) -> Path:
    """Write an image atomically (a crash never leaves half a file) in the format its suffix names (PNG,
    JPEG or WebP; see `image_format`), with `settings` in it so the image says how it was made: PNG's
    'difflab' text chunk holds them as JSON (and 'parameters' AUTOMATIC1111's text, for a prompt); JPEG
    and WebP hold the same in EXIF. AUTOMATIC1111's `Size:` is one image's: `settings["width"]` and
    `["height"]` where given (a grid's picture is larger), else the picture's."""
    path = Path(path)
    fmt = image_format(path, "the image file")
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(settings, sort_keys=True) if settings else None
    size = (settings["width"], settings["height"]) if settings and "width" in settings else image.size
    parameters = a1111_parameters(settings, size) if settings and "prompt" in settings else None
    options: dict = {}
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        if text:
            info.add_text("difflab", text)
        if parameters:  # what AUTOMATIC1111, ComfyUI and image viewers read
            info.add_text("parameters", parameters)
        options["pnginfo"] = info
    else:
        options["quality"] = 95
        exif = Image.Exif()
        if text:
            exif[IMAGE_DESCRIPTION] = text  # ASCII: json.dumps escapes the rest
        if parameters:  # A1111's own encoding of UserComment
            exif.get_ifd(EXIF_IFD)[USER_COMMENT] = b"UNICODE\x00" + parameters.encode("utf-16-be")
        options["exif"] = exif
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
    with atomic_path(path) as partial:
        image.save(partial, format=fmt, **options)
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
    """The settings `save_png` wrote into an image (PNG, JPEG or WebP), or None."""
    with Image.open(path) as img:
        text = img.info.get("difflab")
        if text is None and img.format in ("JPEG", "WEBP"):
            text = img.getexif().get(IMAGE_DESCRIPTION)
    return json.loads(text) if text else None


def a1111_text(path: str | Path) -> str | None:
    """AUTOMATIC1111's 'parameters' text of an image `save_png` wrote (PNG chunk, or EXIF UserComment)."""
    with Image.open(path) as img:
        if img.format == "PNG":
            return img.info.get("parameters")
        comment = img.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    if not comment:
        return None
    return comment[8:].decode("utf-16-be") if comment.startswith(b"UNICODE\x00") else comment[8:].decode("ascii")
