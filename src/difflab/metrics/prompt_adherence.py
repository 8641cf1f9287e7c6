"""How closely a text-to-image model follows its prompts, measured on the built-in `shapes` data:
the share of generated images whose colour, shape, position, size and background (read by the
attribute reader difflab trains on drawn shapes, its own accuracy reported beside it) match their
prompts, apart for attribute combinations seen in training and held out of it; and the Fréchet
distance to real drawn images in the reader's feature space, with its real-data floor."""

from __future__ import annotations

import torch

from difflab.data import shapes
from difflab.diffusion.generate import generate
from difflab.diffusion.request import GenerationRequest
from difflab.metrics.attributes import AttributeClassifier, adherence, load_or_train_attributes
from difflab.metrics.frechet import frechet_distance
from difflab.models.codec import round_trip
from difflab.models.model import DiffusionModel

REFERENCE_SEED = 1_000_003  # the real images the distance is measured against, apart from any prompt seed


def is_shapes(spec: str) -> bool:
    return spec.split(":", 1)[0] == "shapes"


def evaluation_prompts(n: int, seed: int) -> list[shapes.Scene]:
    """`n` prompts: the first half from combinations seen in training, the rest from held-out ones."""
    seen = shapes.draw_scenes(n - n // 2, 8, seed=seed, held_out="exclude")[1]
    held_out = shapes.draw_scenes(n // 2, 8, seed=seed + 1, held_out="only")[1]
    return seen + held_out


def evaluate_prompts(model: DiffusionModel, n: int, *, sampler: str, steps: int, cfg_scale: float | None,
                     cfg_interval=None, cfg_rescale: float | None = None, seed: int = 0, batch_size: int = 64,
                     progress: bool = False,
                     reader: AttributeClassifier | None = None, clip=None, features=None) -> dict:
    """Prompt adherence and Fréchet distance of `n` images, half of seen and half of held-out combinations;
    with `clip` (a ClipScorer), their CLIP score too. `features`: the feature space of the distance (an
    object with `name` and a call from images in [-1, 1] to vectors, such as ClipFeatures); default: the
    attribute reader's."""
    size = model.info.image_size
    reader = reader or load_or_train_attributes(size)
    embed, space = (features, features.name) if features is not None else (reader.features, "attribute reader")
    prompts = evaluation_prompts(n, seed)
    request = GenerationRequest(n, prompts=[p.caption for p in prompts], sampler=sampler, steps=steps, seed=seed,
                                cfg_scale=cfg_scale, cfg_interval=cfg_interval, cfg_rescale=cfg_rescale)
    images = generate(model, request, batch_size=batch_size, progress=progress) * 2 - 1
    reference = embed(real_images(n, size, REFERENCE_SEED)).numpy()
    result = {
        "n": n,
        "adherence": adherence(images, prompts, reader),
        "frechet_distance": round(frechet_distance(embed(images).numpy(), reference), 4),
        "frechet_floor": round(frechet_distance(embed(real_images(n, size, seed)).numpy(), reference), 4),
        "feature_space": space,
        "sampler": sampler, "steps": steps, "seed": seed,
        **request.run_guidance(model).settings(include_scale=True),
    }
    if model.latent:
        result["vae_ceiling"] = reconstruction_adherence(model, n, seed, reader)
    if clip is not None:
        from difflab.metrics.clip_score import clip_score

        result["clip_score"] = clip_score(clip, images, [p.caption for p in prompts])
    return result


@torch.no_grad()
def reconstruction_adherence(model: DiffusionModel, n: int, seed: int, reader: AttributeClassifier) -> dict:
    """What the VAE lets through: the reader's shares on the VAE's reconstructions of `n` drawn images
    (every combination). The model cannot draw what its VAE cannot: a ceiling for its adherence."""
    images, scenes = drawn_images(n, model.info.image_size, seed)
    shares = adherence(round_trip(model.codec, images, seed), scenes, reader)
    return {name: shares[name] for name in ("colour", "shape", "position", "all")}


def drawn_images(n: int, size: int, seed: int) -> tuple[torch.Tensor, list[shapes.Scene]]:
    """`n` drawn shapes images in [-1, 1], every combination included (what a perfect model draws), and
    their scenes."""
    images, scenes = shapes.draw_scenes(n, size, seed=seed)
    return images.float().div_(127.5).sub_(1.0), scenes


def real_images(n: int, size: int, seed: int) -> torch.Tensor:
    return drawn_images(n, size, seed)[0]


PARTS = (("seen", "seen"), ("held_out", "held-out"))


def shares_text(shares: dict) -> str:
    """'colour 97.0%, shape 91.0%, position 88.0%'."""
    return ", ".join(f"{name} {100 * shares[name]:.1f}%" for name in ("colour", "shape", "position") if name in shares)


def adherence_line(result: dict) -> str:
    """'colour 97.0% · shape 91.0% · position 88.0% (seen) · … (held out)' for a printed summary."""
    return " · ".join(f"{shares_text(shares)} ({label.replace('-', ' ')} combinations, n={shares['n']})"
                      for part, label in PARTS if (shares := result["adherence"].get(part)))


def evaluation_rows(result: dict) -> dict[str, str]:
    """The measured figures as model-card rows."""
    how = f"{result['sampler']}, {result['steps']} steps, CFG scale {result['cfg_scale']}"
    how += "".join(f", CFG {key[4:]} {result[key]}" for key in ("cfg_interval", "cfg_rescale") if key in result)
    rows = {f"prompt adherence, {label} combinations": f"{shares_text(shares)} (n={shares['n']}; {how})"
            for part, label in PARTS if (shares := result["adherence"].get(part))}
    if "vae_ceiling" in result:
        rows["the VAE's reconstructions of real images (a ceiling)"] = (
            f"{shares_text(result['vae_ceiling'])} (n={result['n']})")
    rows["Fréchet distance (attribute-reader features)"] = (
        f"{result['frechet_distance']:.3f} (real-data floor {result['frechet_floor']:.3f}, n={result['n']})")
    return rows


def record_evaluation(model_dir, result: dict) -> None:
    """Write the figures into a local model folder: difflab.json's `evaluation` and the card's table."""
    import json
    from pathlib import Path

    from difflab.files import write_text_atomic
    from difflab.layout import CARD, INFO_FILE
    from difflab.models.model import ModelInfo
    from difflab.storage.card import set_card_rows

    folder = Path(model_dir)
    rows = evaluation_rows(result)
    info_file = folder / INFO_FILE
    if info_file.is_file():
        info = ModelInfo.from_json(json.loads(info_file.read_text(encoding="utf-8")))
        info.evaluation.update(rows)
        write_text_atomic(info_file, info.dumps())
    card = folder / CARD
    if card.is_file():
        write_text_atomic(card, set_card_rows(card.read_text(encoding="utf-8"), rows))
