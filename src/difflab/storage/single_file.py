"""Single-file Stable Diffusion checkpoints (the A1111/civitai `model.safetensors`), loaded offline.

Loading goes through diffusers' `from_single_file`, which needs each component's config (and a
tokenizer) beside the weights. They come, first found first, from:
1. the folder the user names (`--config-folder`): a diffusers Stable Diffusion folder of the same
   model (its configs and tokenizer; weights are not needed), or a folder holding only `tokenizer/`;
2. the file itself: files difflab exports carry their diffusers configs (and a small tokenizer) in the
   safetensors metadata, so difflab's own models load back with nothing else;
3. difflab's own configs of SD 1.5 and SD 2.1 (sd_configs/, public architecture configs), chosen by
   the layout diffusers recognises (`infer_diffusers_model_type`); the tokenizer's vocabulary is
   not shipped, so it is looked up in the Hugging Face cache, never downloaded.

The file gets the checks every model gets: pickles (`.ckpt`) only with --allow-pickle, read with
torch.load(weights_only=True) (by difflab for the checks and by diffusers for the load); a truncated
file is named before anything loads; NaN, infinite or absurd weights are named after.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from difflab.errors import ConfigError, ModelError
from difflab.files import read_json_object
from difflab.layout import PICKLE_SUFFIXES, Kind, what_is_at
from difflab.models.weights import check_weights

CONFIGS_METADATA = "difflab.diffusers_configs"  # metadata key of the configs difflab's exports carry
# A layout key both SD 1.x and 2.x have, and where the built-in configs come from for each kind.
SD_LAYOUT_KEY = "model.diffusion_model.output_blocks.11.0.skip_connection.weight"
BUILT_IN = {"v1": "sd15", "inpainting": "sd15", "v2": "sd21", "inpainting_v2": "sd21"}  # diffusers' kind: configs
BUILT_IN_NAMES = {"sd15": "SD 1.5", "sd21": "SD 2.1"}
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
# Where a tokenizer may already be in the Hugging Face cache, per family: (repo, subfolder).
CACHED_TOKENIZERS = {
    "sd15": [("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer"),
             ("runwayml/stable-diffusion-v1-5", "tokenizer"), ("openai/clip-vit-large-patch14", None)],
    "sd21": [("stabilityai/stable-diffusion-2-1", "tokenizer"), ("stabilityai/stable-diffusion-2-1-base", "tokenizer"),
             ("stabilityai/stable-diffusion-2-inpainting", "tokenizer")],
}


def is_single_file(spec) -> bool:
    return what_is_at(spec) in (Kind.SINGLE_FILE, Kind.LORA_FILE)


def load_single_file(spec, *, allow_pickle: bool = False, config_folder=None):
    """(the diffusers pipeline, difflab's ModelInfo or None) of a single-file checkpoint."""
    import diffusers
    import torch
    from diffusers.utils import logging as diffusers_logging

    from difflab.storage.quiet import quiet_diffusers
    from difflab.storage.stable_diffusion import NETWORKS, is_stable_diffusion

    path = Path(str(spec)).expanduser()
    shapes, metadata = read_layout(path, allow_pickle)
    with tempfile.TemporaryDirectory(prefix="difflab-configs-") as scratch:
        configs, family, label = config_source(path, shapes, metadata, config_folder, Path(scratch))
        index = read_json_object(configs / "model_index.json", ModelError, f" ({label})")
        pipeline_class = index.get("_class_name", "?")
        if not is_stable_diffusion(pipeline_class):
            raise ModelError(f"{label} describe a {pipeline_class}; difflab loads single files of the Stable "
                             "Diffusion family")
        tokenizer = find_tokenizer(path, configs, config_folder, family)
        extra = {}
        if pipeline_class != "StableDiffusionDepth2ImgPipeline":  # its feature extractor serves the depth model
            extra.update(safety_checker=None, feature_extractor=None)  # a single file holds no safety checker
            if pipeline_class != "StableDiffusionUpscalePipeline":
                extra["requires_safety_checker"] = False
        diffusers_logging.disable_progress_bar()  # loading takes seconds; sampling has its own bar
        try:
            with quiet_diffusers():
                pipe = getattr(diffusers, pipeline_class).from_single_file(
                    str(path), config=str(configs), local_files_only=True, tokenizer=tokenizer,
                    torch_dtype=torch.float32, **extra)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError) as e:
            reason = " ".join(str(e).split())[:300] or type(e).__name__
            raise ModelError(f"cannot load {path} with {label} ({reason}); give --config-folder with a diffusers "
                             "folder of the same model") from None
        finally:
            diffusers_logging.enable_progress_bar()
        info = metadata_info(metadata)
    for name in NETWORKS:  # black images from a damaged file are named as such, not blamed on the prompt
        if getattr(pipe, name, None) is not None:
            check_weights(getattr(pipe, name), path)
    return pipe, info


def read_layout(path: Path, allow_pickle: bool) -> tuple[dict, dict]:
    """The file's tensor names with their shapes (as meta tensors: nothing is read but the header), and
    its metadata. A truncated file, a refused pickle or a file of no tensors is a one-line error."""
    import torch

    if path.suffix.lower() in PICKLE_SUFFIXES:
        from difflab.storage.pickles import load_pickled_weights

        if not allow_pickle:
            raise ModelError(f"{path} is a pickle, and unpickling can run code hidden in it: use the model's "
                             ".safetensors file, or pass --allow-pickle to load it with torch.load(weights_only=True)")
        state = load_pickled_weights(path)
        check_weights(state, path)
        return {k: torch.empty(v.shape, device="meta") for k, v in state.items()}, {}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"{path} is damaged: it is not a complete safetensors file ({reason}); copy or download "
                         "the model again") from None
    if not shapes:
        raise ModelError(f"{path} holds no weights")
    return shapes, metadata


def config_source(path: Path, shapes: dict, metadata: dict, config_folder, scratch: Path
                  ) -> tuple[Path, str | None, str]:
    """The folder of configs to load with, the built-in family ("sd15"/"sd21") if one was chosen, and
    where the configs came from, for messages."""
    if config_folder is not None:
        folder = Path(config_folder).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"--config-folder {config_folder} is not a folder")
        if (folder / "model_index.json").is_file():
            return folder, None, f"the configs in {config_folder}"
        if not (folder / "tokenizer").is_dir():
            raise ConfigError(f"--config-folder {config_folder} holds neither a diffusers Stable Diffusion folder "
                              "(model_index.json) nor a tokenizer/ folder")
    elif CONFIGS_METADATA in metadata:
        return unpack_configs(path, metadata[CONFIGS_METADATA], scratch), None, "the configs the file carries"
    folder, family = built_in_configs(path, shapes, metadata, scratch)
    return folder, family, f"difflab's {BUILT_IN_NAMES[family]} configs"


def built_in_configs(path: Path, shapes: dict, metadata: dict, scratch: Path) -> tuple[Path, str]:
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    if not any(k.startswith("model.diffusion_model.") for k in shapes):
        raise ModelError(f"{path} is not a Stable Diffusion checkpoint (it has no model.diffusion_model.* weights); "
                         "is it a LoRA or an embedding? LoRAs load with --lora")
    kind = infer_diffusers_model_type(shapes) if SD_LAYOUT_KEY in shapes else "unknown"
    if kind not in BUILT_IN:
        raise ModelError(f"{path} does not have the Stable Diffusion 1.x/2.x layout whose configs difflab knows (it "
                         f"reads as {kind}); give --config-folder with a diffusers folder of the same model (its "
                         "configs and tokenizer; the weights are not needed)")
    family = BUILT_IN[kind]
    folder = scratch / family
    shutil.copytree(resources.files("difflab.storage") / "sd_configs" / family, folder)
    unet_file, scheduler_file = folder / "unet" / "config.json", folder / "scheduler" / "scheduler_config.json"
    unet, scheduler = json.loads(unet_file.read_text()), json.loads(scheduler_file.read_text())
    if kind.startswith("inpainting"):
        unet["in_channels"] = 9
        index_file = folder / "model_index.json"
        index_file.write_text(json.dumps({**json.loads(index_file.read_text()),
                                          "_class_name": "StableDiffusionInpaintPipeline"}))
    # SD 2.x comes as 768-px v-prediction models (2.0, 2.1) and 512-px epsilon ones (base, inpainting): the
    # weights cannot tell, so the file's model-spec metadata says it, or the kind's usual choice holds
    epsilon = metadata.get("modelspec.prediction_type", "").lower() == "epsilon" or kind == "inpainting_v2"
    if family == "sd21" and epsilon:
        unet["sample_size"], scheduler["prediction_type"] = 64, "epsilon"
    unet_file.write_text(json.dumps(unet))
    scheduler_file.write_text(json.dumps(scheduler))
    return folder, family


def find_tokenizer(path: Path, configs: Path, config_folder, family: str | None):
    """The CLIP tokenizer: the user's folder's, the configs', or a Stable Diffusion one in the HF cache."""
    from transformers import CLIPTokenizer

    for folder in [Path(config_folder).expanduser() / "tokenizer"] if config_folder is not None else []:
        if folder.is_dir():
            return _tokenizer_from(CLIPTokenizer, folder, path)
    if (configs / "tokenizer").is_dir():
        return _tokenizer_from(CLIPTokenizer, configs / "tokenizer", path)
    from huggingface_hub import try_to_load_from_cache

    for repo, subfolder in CACHED_TOKENIZERS.get(family, []):
        for name in TOKENIZER_FILES:
            cached = try_to_load_from_cache(repo, f"{subfolder}/{name}" if subfolder else name)
            if isinstance(cached, str):  # the cache's folder holds the tokenizer's other files beside it
                return _tokenizer_from(CLIPTokenizer, Path(cached).parent, path)
    repo = CACHED_TOKENIZERS.get(family or "sd15")[0][0]
    raise ModelError(f"{path} needs a CLIP tokenizer, which a single file does not hold and none was found here: "
                     f"give --config-folder with a diffusers Stable Diffusion folder (its tokenizer/ is used; the "
                     f"weights are not needed), or fetch the tokenizer once while online: "
                     f"hf download {repo} --include 'tokenizer/*'")


def _tokenizer_from(cls, folder: Path, path: Path):
    # transformers 5 builds an empty tokenizer from a folder without vocabulary files, and says nothing
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(f"{folder} holds no tokenizer vocabulary ({' or '.join(TOKENIZER_FILES)}) for {path}")
    try:
        return cls.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"cannot read the tokenizer in {folder} for {path} ({reason})") from None


# ---- configs carried in difflab's own exports -------------------------------------------------------

def pack_configs(folder: Path, tokenizer_limit: int = 256 * 1024) -> str:
    """A model folder's configs (model_index.json, each component's config, difflab.json) as one JSON
    string, and its tokenizer's files when small (difflab's own vocabularies; CLIP's 1.5 MB are not)."""
    files = {}
    for file in sorted(folder.glob("*.json")) + sorted(folder.glob("*/*.json")):
        if file.parent.name != "tokenizer":
            files[file.relative_to(folder).as_posix()] = file.read_text(encoding="utf-8")
    tokenizer = sorted(p for p in (folder / "tokenizer").glob("*") if p.is_file())
    if tokenizer and sum(p.stat().st_size for p in tokenizer) <= tokenizer_limit:
        files.update({p.relative_to(folder).as_posix(): p.read_text(encoding="utf-8") for p in tokenizer})
    return json.dumps(files, sort_keys=True)


def unpack_configs(path: Path, packed: str, scratch: Path) -> Path:
    try:
        files = json.loads(packed)
        if not (isinstance(files, dict) and "model_index.json" in files):
            raise ValueError("no model_index.json")
    except ValueError as e:
        raise ModelError(f"{path} carries damaged difflab configs in its metadata ({e}); give --config-folder with "
                         "the model's diffusers folder") from None
    folder = scratch / "configs"
    for name, text in files.items():
        target = (folder / name).resolve()
        if not target.is_relative_to(folder.resolve()):  # the metadata names files inside the folder only
            raise ModelError(f"{path} carries a config outside its folder ({name}); the file is not difflab's")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    return folder


def metadata_info(metadata: dict):
    from difflab.models.model import ModelInfo

    info = _info_json(metadata)
    return ModelInfo.from_json(info) if info else None


def carried_info(spec) -> dict:
    """The difflab.json a single file difflab exported carries ({} for any other file)."""
    from safetensors import safe_open

    try:
        with safe_open(str(Path(str(spec)).expanduser()), framework="pt") as f:
            return _info_json(f.metadata() or {})
    except Exception:  # noqa: BLE001 - a pickle, a damaged file: loading it names the problem
        return {}


def _info_json(metadata: dict) -> dict:
    try:
        info = json.loads(metadata.get(CONFIGS_METADATA) or "{}").get("difflab.json")
        return json.loads(info) if info else {}
    except (ValueError, AttributeError):
        return {}
