"""Stable Diffusion folders (and Hub ids): loading them into difflab's model container, and saving
difflab's latent text models as folders plain diffusers loads.

Loading goes through the diffusers pipeline class the folder names, so components, their classes,
weights formats and the scheduler-config rewrites the pipeline makes (`steps_offset`, `clip_sample`)
are exactly diffusers'; difflab then keeps the parts and runs them through its own sampler.
"""

from __future__ import annotations

import logging
from pathlib import Path

from difflab.errors import ModelError
from difflab.models.codec import LatentCodec
from difflab.models.denoiser import Denoiser
from difflab.models.model import DiffusionModel, ModelInfo
from difflab.models.text import PromptEncoder
from difflab.models.variants import PIPELINE_VARIANTS, variant_for
from difflab.models.weights import check_safetensors_files, check_weights

log = logging.getLogger("difflab")
STABLE_DIFFUSION_PIPELINES = set(PIPELINE_VARIANTS)


def is_stable_diffusion(pipeline_class: str) -> bool:
    return pipeline_class in STABLE_DIFFUSION_PIPELINES


def load_pipeline(source: str | Path, pipeline_class: str, *, allow_pickle: bool = False,
                  safety_checker: bool = True, dtype=None, variant: str | None = None):
    """The diffusers pipeline of a folder or Hub id, with the errors said in one line."""
    import diffusers
    import torch
    import transformers
    from diffusers.utils import logging as diffusers_logging

    extra = {}
    if not safety_checker and pipeline_class != "StableDiffusionDepth2ImgPipeline":  # that one has none
        extra["safety_checker"] = None
        if pipeline_class != "StableDiffusionUpscalePipeline":
            extra["requires_safety_checker"] = False
    if variant:
        extra["variant"] = variant
    if Path(source).is_dir():
        check_components(Path(source), pipeline_class)
        check_layout(Path(source), pipeline_class)
        for name in NETWORKS:
            if (Path(source) / name).is_dir():
                check_safetensors_files(Path(source) / name)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its notes on disabled safety checkers and configs are not for users
    diffusers_logging.disable_progress_bar()  # loading takes seconds; sampling has its own bar
    transformers.utils.logging.disable_progress_bar()
    try:
        pipe = getattr(diffusers, pipeline_class).from_pretrained(
            source, use_safetensors=None if allow_pickle else True, dtype=dtype or torch.float32, **extra)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "safetensors" in reason and not allow_pickle:
            reason += "; weights stored as pickles load only with --allow-pickle"
        from difflab.storage.damage import damaged_part

        part = damaged_part(Path(source)) if Path(source).is_dir() else None
        if part:  # the libraries' message does not say which part failed: name it
            raise ModelError(f"cannot load the {pipeline_class} in {source}: {part}; the model folder is damaged: "
                             "save or download it again") from None
        raise ModelError(f"cannot load the {pipeline_class} in {source} ({reason})") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
        diffusers_logging.enable_progress_bar()
        transformers.utils.logging.enable_progress_bar()
    for name in NETWORKS:  # black images from a damaged file are named as such, not blamed on the prompt
        if getattr(pipe, name, None) is not None:
            check_weights(getattr(pipe, name), Path(str(source)) / name)
    return pipe


NETWORKS = ("unet", "vae", "text_encoder")


def check_layout(folder: Path, pipeline_class: str) -> None:
    """Before loading weights: the UNet's input channels must match a known layout (see models/variants)."""
    from difflab.files import read_json_object

    unet = read_json_object(folder / "unet" / "config.json", ModelError, "; the model folder is damaged")
    vae = read_json_object(folder / "vae" / "config.json", ModelError, "; the model folder is damaged")
    variant_for(unet.get("in_channels", 4), vae.get("latent_channels", 4), pipeline_class, str(folder))


REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def check_components(folder: Path, pipeline_class: str) -> None:
    """A local folder names its components in model_index.json and holds a sub-folder for each."""
    import json

    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    wanted = [name for name, value in index.items() if not name.startswith("_") and isinstance(value, list)
              and value[0] is not None]
    missing = [name for name in dict.fromkeys([*REQUIRED_COMPONENTS, *wanted]) if not (folder / name).is_dir()]
    if missing:
        raise ModelError(f"{folder} is a {pipeline_class} folder without its {', '.join(missing)} "
                         f"sub-folder{'s' if len(missing) > 1 else ''}; the model folder is incomplete: save or "
                         "download it again")


def from_pipeline(pipe, source: str, info: ModelInfo | None = None) -> DiffusionModel:
    """difflab's model container around a Stable Diffusion pipeline's components."""
    from diffusers import DDPMScheduler

    codec = LatentCodec(pipe.vae)
    unet = pipe.unet
    variant = variant_for(unet.config.in_channels, codec.channels, type(pipe).__name__, str(source))
    scheduler_config = dict(pipe.scheduler.config)
    sample_size = unet.config.sample_size
    sample_size = sample_size if isinstance(sample_size, int) else sample_size[0]
    if info is None:
        info = ModelInfo(image_size=sample_size * codec.factor, channels=3, data="(unknown)", base_model=str(source))
    safety = getattr(pipe, "safety_checker", None)
    depth = getattr(pipe, "depth_estimator", None)
    return DiffusionModel(
        denoiser=Denoiser(unet).eval(),
        noise_schedule=DDPMScheduler.from_config(scheduler_config),
        info=info,
        codec=codec,
        prompts=PromptEncoder(pipe.tokenizer, pipe.text_encoder),
        variant=variant,
        scheduler_config=scheduler_config,
        low_res_scheduler=getattr(pipe, "low_res_scheduler", None),
        max_noise_level=pipe.config.get("max_noise_level"),
        safety_checker=(safety, pipe.feature_extractor) if safety is not None else None,
        depth_estimator=(depth, pipe.feature_extractor) if depth is not None else None,
    )


def to_pipeline(model: DiffusionModel):
    """The diffusers pipeline that holds the same components (sharing their weights)."""
    import diffusers

    kind = model.kind
    scheduler = getattr(diffusers, model.sampler_config.get("_class_name", "DDPMScheduler")).from_config(
        model.sampler_config)
    parts = dict(vae=model.codec.vae, text_encoder=model.prompts.text_encoder, tokenizer=model.prompts.tokenizer,
                 unet=model.denoiser.unet, scheduler=scheduler)
    return getattr(diffusers, kind.pipeline)(**parts, **kind.pipeline_parts(model))


def save_pipeline(model: DiffusionModel, folder: Path) -> None:
    to_pipeline(model).save_pretrained(folder, safe_serialization=True)


def describe(model: DiffusionModel) -> str:
    """One line on what a latent model is, for logs."""
    kind = model.kind
    return f"{kind.pipeline} ({kind.about}), latents ×{model.codec.factor}, {model.info.image_size} px"
