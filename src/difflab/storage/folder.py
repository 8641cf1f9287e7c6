"""Model folders in the diffusers format.

A difflab model folder is a diffusers pipeline folder — `DDPMPipeline` (model_index.json, unet/,
scheduler/) for pixel models, a Stable Diffusion pipeline for latent text models — plus difflab.json
(what the model is and was made from) and a README.md model card, so it loads in plain diffusers.
`load_model` also takes any diffusers DDPMPipeline/DDIMPipeline folder or Stable Diffusion family
folder, a run folder (its model/), or a Hub id (through the normal Hugging Face cache).
"""

from __future__ import annotations

from pathlib import Path

from difflab.errors import ConfigError, ModelError
from difflab.files import atomic_folder, read_json_object, safetensors_os_error
from difflab.layout import (
    CONDITIONING_FILE,
    INFO_FILE,
    LORA_WEIGHTS,
    PICKLE_SUFFIXES,
    RUN_CONFIG,
    SCRATCH_INFO_FILE,
    is_hub_id,
    local_model_folder,
    run_of,
)
from difflab.models.model import DiffusionModel, ModelInfo
from difflab.models.weights import check_safetensors_files, check_weights, weights_file
from difflab.storage.pickles import load_pickled_weights

PIXEL_PIPELINES = {"DDPMPipeline", "DDIMPipeline"}
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"


# ---- saving ----------------------------------------------------------------------------------------

def save_model(model: DiffusionModel, folder: str | Path, card: str) -> Path:
    """Write the model folder; an existing one is replaced only once the new one is complete. A failed
    write (disk full, read-only folder) raises OSError and leaves the existing folder as it was."""
    from diffusers import DDPMPipeline
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    folder = Path(folder)
    with atomic_folder(folder) as partial:
        try:
            if model.latent:
                from difflab.storage.stable_diffusion import save_pipeline

                save_pipeline(model, partial)
            elif model.prompts is not None:
                save_pixel_text_model(model, partial)
            else:
                DDPMPipeline(unet=model.unet, scheduler=model.noise_schedule).save_pretrained(
                    partial, safe_serialization=True)
            extra = model.denoiser.extra_state()
            if extra:
                tensors = {k: v.detach().cpu().contiguous() for k, v in extra.items()}
                save_file(tensors, str(partial / CONDITIONING_FILE))
        except SafetensorError as e:
            raise safetensors_os_error(e, partial) from None
        (partial / INFO_FILE).write_text(model.info.dumps(), encoding="utf-8")
        (partial / "README.md").write_text(card, encoding="utf-8")
    return folder


# ---- loading ---------------------------------------------------------------------------------------

def resolve_model_folder(spec: str | Path, allow_pickle: bool = False, variant: str | None = None) -> Path:
    """A local model folder (or a run folder's model/), or a Hub id fetched into the HF cache (its
    `variant` weights, "fp16", instead of the full-precision ones where the repo has them)."""
    if is_hub_id(str(spec)):
        return _download(str(spec), allow_pickle, variant)
    return local_model_folder(spec)


def _download(repo_id: str, allow_pickle: bool, variant: str | None = None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, **download_patterns(repo_id, allow_pickle, variant)))
    except Exception as e:  # offline, unknown repo, gated repo: all mean "not available"
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(
            f"{repo_id} is neither a folder here nor a model that could be fetched from the Hugging Face Hub "
            f"({reason}); check the path, or the Hub id and your connection"
        ) from None


# Stable Diffusion repos also hold half-precision copies and single-file checkpoints of the same
# weights (gigabytes each): a pipeline needs only its components' sub-folders.
PIPELINE_FILES = ["model_index.json", "*.md", "difflab.json", "*/*.json", "*/*.txt", "*/*.safetensors"]
DUPLICATE_WEIGHTS = ["*.fp16.*", "*non_ema*", "*.ema.*", "*.onnx", "*.msgpack", "*.ckpt"]


def download_patterns(repo_id: str, allow_pickle: bool, variant: str | None = None) -> dict:
    """What to fetch of a Hub repo: a pipeline's component folders, or a bare model's files. With
    `variant` ("fp16"), a pipeline's half-precision weights instead of its full-precision ones (half
    the download), where the repo holds them."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    pickles = ["*.bin"] if allow_pickle else []
    try:
        huggingface_hub.hf_hub_download(repo_id, "model_index.json")
    except EntryNotFoundError:
        return {"allow_patterns": ["*.json", "*.safetensors", "*.md", "*.txt", *pickles]}
    if variant and f".{variant}." in " ".join(_repo_files(repo_id)):
        kept = [p for p in PIPELINE_FILES if p != "*/*.safetensors"] + [f"*/*.{variant}.safetensors"]
        return {"allow_patterns": kept, "ignore_patterns": [p for p in DUPLICATE_WEIGHTS if p != "*.fp16.*"]}
    return {"allow_patterns": PIPELINE_FILES + [f"*/{p}" for p in pickles], "ignore_patterns": DUPLICATE_WEIGHTS}


def _repo_files(repo_id: str) -> list[str]:
    import huggingface_hub

    try:
        return huggingface_hub.list_repo_files(repo_id)
    except Exception:  # offline or not allowed: fetch the full-precision weights as without a variant
        return []


def folder_variant(folder: Path, variant: str | None) -> str | None:
    """`variant` if the folder's UNet has weights of that variant (diffusion_pytorch_model.fp16.safetensors),
    else None: a folder without half-precision copies loads its full-precision weights, cast."""
    if variant and any((folder / "unet").glob(f"*.{variant}.safetensors")):
        return variant
    return None


def _read_json(path: Path) -> dict:
    return read_json_object(path, ModelError, "; the model folder is damaged")


def pipeline_kind(folder: Path, spec) -> str | None:
    """The diffusers pipeline class a folder holds (None for a bare UNet folder); refuses the
    pipelines difflab does not run."""
    from difflab.storage.stable_diffusion import is_stable_diffusion

    index_file = folder / "model_index.json"
    if not index_file.is_file():
        return None
    kind = _read_json(index_file).get("_class_name")
    if not isinstance(kind, str) or not kind:
        raise ModelError(f"{index_file} names no pipeline class (_class_name); the model folder {spec} is damaged: "
                         "save or download it again")
    if kind in PIXEL_PIPELINES or is_stable_diffusion(kind):
        return kind
    raise ModelError(f"{spec} holds a {kind}; difflab runs DDPMPipeline/DDIMPipeline folders and the Stable "
                     "Diffusion family (StableDiffusion, Img2Img, Inpaint, Depth2Img and Upscale pipelines)")


def unet_folder(folder: Path, spec) -> Path:
    if (folder / "unet" / "config.json").is_file():
        return folder / "unet"
    if (folder / "config.json").is_file() and "block_out_channels" in _read_json(folder / "config.json"):
        return folder  # a bare UNet folder
    if (folder / SCRATCH_INFO_FILE).is_file():
        raise ModelError(f"{spec} is a from-scratch teaching model (BasicUNet); sample it with difflab scratch sample")
    if (folder / LORA_WEIGHTS).is_file():
        base = lora_run_base(folder)
        raise ModelError(f"{spec} holds a LoRA, which adapts a base model: give the base model and the LoRA, "
                         f"as in --model {base or 'BASE'} --lora {spec} (difflab sample and difflab demo take both)")
    raise ModelError(f"{spec} has no UNet (no unet/config.json); is it a diffusers DDPMPipeline folder?")


def lora_run_base(folder: Path) -> str | None:
    """The base model a LoRA run (whose model/ is `folder`) was trained on, as its config.toml names it."""
    import tomllib

    run = run_of(folder)
    if run is None:
        return None
    try:
        base = tomllib.loads((run / RUN_CONFIG).read_text(encoding="utf-8")).get("model", {}).get("base")
    except (OSError, UnicodeError, tomllib.TOMLDecodeError):
        return None
    return base if isinstance(base, str) and base else None


def pickled_weights(unet_dir: Path, allow_pickle: bool) -> Path | None:
    """None if the weights are safetensors; else the pickle that holds them, refused unless the user
    opted in (it is then read by `load_pickled_weights`, which does not run code)."""
    files = sorted((p for p in unet_dir.iterdir() if p.is_file()), key=lambda p: (p.stem != DIFFUSERS_WEIGHTS, p.name))
    if any(p.suffix == ".safetensors" for p in files):
        return None
    pickles = [p for p in files if p.suffix in PICKLE_SUFFIXES]
    if not pickles:
        raise ModelError(f"{unet_dir} has no weights file (expected {DIFFUSERS_WEIGHTS}.safetensors)")
    if not allow_pickle:
        raise ModelError(
            f"{pickles[0]} is a pickle, and unpickling can run code hidden in it: convert it to safetensors, "
            "or pass --allow-pickle to load it with torch.load(weights_only=True)"
        )
    return pickles[0]


def load_unet(unet_dir: Path, allow_pickle: bool, unet_class: str = "UNet2DModel"):
    import diffusers

    UNet2DModel = getattr(diffusers, unet_class)  # noqa: N806 (a class)
    pickled = pickled_weights(unet_dir, allow_pickle)
    check_safetensors_files(unet_dir)
    try:
        if pickled is None:
            return check_weights(UNet2DModel.from_pretrained(unet_dir, use_safetensors=True), weights_file(unet_dir))
        unet = UNet2DModel.from_config(UNet2DModel.load_config(unet_dir))
        unet.load_state_dict(load_pickled_weights(pickled))
        return check_weights(unet, pickled)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"cannot load the UNet weights in {unet_dir} ({reason}); the file may be damaged: "
                         "save or download it again") from None


def load_model(spec: str | Path, *, allow_pickle: bool = False, device="cpu", safety_checker: bool = True,
               config_folder: str | Path | None = None, dtype=None, variant: str | None = None) -> DiffusionModel:
    """A model folder, a run folder or a Hub id: pixel models (DDPMPipeline folders) and the Stable
    Diffusion family (whose safety checker, when the folder has one, runs unless `safety_checker`
    is False); or a single-file Stable Diffusion checkpoint (`model.safetensors`; see
    storage/single_file.py), whose configs come from `config_folder` when given. `dtype`
    (torch.float16/bfloat16): a Stable Diffusion model's weights held in that type, for sampling in half
    precision (pixel models stay fp32: they are small, and run under autocast); `variant` ("fp16"): a
    folder's or Hub repo's half-precision weight files are fetched and read where it has them."""
    from difflab.storage.single_file import is_single_file

    if is_single_file(spec):
        from difflab.storage.single_file import load_single_file
        from difflab.storage.stable_diffusion import from_pipeline

        pipe, info = load_single_file(spec, allow_pickle=allow_pickle, config_folder=config_folder)
        model = from_pipeline(pipe, str(spec), info)
        for part in model.modules() if dtype is not None else []:
            part.to(dtype)
        return model.to(device)
    if config_folder is not None:
        raise ConfigError(f"--config-folder is for single-file checkpoints (model.safetensors); {spec} is not one")
    folder = resolve_model_folder(spec, allow_pickle, variant)
    kind = pipeline_kind(folder, spec)
    if kind is not None and kind not in PIXEL_PIPELINES:
        from difflab.storage.stable_diffusion import from_pipeline, load_pipeline

        pipe = load_pipeline(folder, kind, allow_pickle=allow_pickle, safety_checker=safety_checker, dtype=dtype,
                             variant=folder_variant(folder, variant))
        info_file = folder / INFO_FILE
        info = ModelInfo.from_json(_read_json(info_file)) if info_file.is_file() else None
        return from_pipeline(pipe, str(spec), info).to(device)
    return load_pixel_model(folder, spec, allow_pickle=allow_pickle, device=device)


def load_pixel_model(folder: Path, spec, *, allow_pickle: bool, device) -> DiffusionModel:
    from diffusers import DDPMScheduler

    from difflab.models.build import denoiser_for

    unet_dir = unet_folder(folder, spec)
    unet_kind = _read_json(unet_dir / "config.json").get("_class_name", "UNet2DModel")
    pixel_text = unet_kind == "UNet2DConditionModel" and (folder / "text_encoder").is_dir()
    if unet_kind != "UNet2DModel" and not pixel_text:
        raise ModelError(f"{spec} has a {unet_kind} but no Stable Diffusion model_index.json; give the pipeline "
                         "folder that holds it")
    unet = load_unet(unet_dir, allow_pickle, unet_kind)

    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    schedule = DDPMScheduler.from_config(_read_json(scheduler_file)) if scheduler_file.is_file() else DDPMScheduler()
    info_file = folder / INFO_FILE
    if info_file.is_file():
        info = ModelInfo.from_json(_read_json(info_file))
    else:
        size = unet.config.sample_size
        info = ModelInfo(image_size=size if isinstance(size, int) else size[0],
                         channels=unet.config.in_channels, data="(unknown)", base_model=str(spec))
    denoiser = denoiser_for(unet, info)
    load_conditioning(denoiser, folder, spec)
    prompts = load_prompt_encoder(folder, spec) if pixel_text else None
    return DiffusionModel(denoiser.eval(), schedule, info, prompts=prompts).to(device)


def save_pixel_text_model(model: DiffusionModel, folder: Path) -> None:
    """A text model in pixel space (`difflab train --conditioning text --vae none`) has no diffusers pipeline:
    its folder holds the parts a Stable Diffusion folder would, but the VAE, and no model_index.json."""
    model.unet.save_pretrained(folder / "unet", safe_serialization=True)
    model.noise_schedule.save_pretrained(folder / "scheduler")
    model.prompts.tokenizer.save_pretrained(str(folder / "tokenizer"))
    model.prompts.text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)


def load_prompt_encoder(folder: Path, spec):
    from difflab.models.text import PromptEncoder
    from difflab.storage.text_encoder import load_text_encoder

    tokenizer, text_encoder = load_text_encoder(folder, what=f"the model folder {spec}")
    return PromptEncoder(tokenizer, check_weights(text_encoder, folder / "text_encoder"))


def load_conditioning(denoiser, folder: Path, spec) -> None:
    expected = {k for k in denoiser.state_dict() if not k.startswith("unet.")}
    if not expected:
        return
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        weights = load_file(str(folder / CONDITIONING_FILE))
    except (OSError, SafetensorError) as e:
        raise ModelError(f"cannot load {folder / CONDITIONING_FILE} ({e}); the model folder {spec} is damaged"
                         ) from None
    if set(weights) != expected:
        raise ModelError(f"{folder / CONDITIONING_FILE} does not match difflab.json; "
                         f"the model folder {spec} is damaged")
    check_weights(weights, folder / CONDITIONING_FILE)
    denoiser.load_state_dict(weights, strict=False)

