"""`difflab export --single-file OUT.safetensors --model RUN`: what difflab trained, as one file A1111 and
ComfyUI load.

A text-to-image model (a StableDiffusionPipeline or inpainting folder) is written in the original SD
single-file layout (storage/original_layout.py), with its diffusers configs in the file's metadata so
that difflab loads it back with nothing else (storage/single_file.py). A LoRA run is written in the
kohya format (`lora_unet_…`/`lora_te_…` with `.lora_down.weight`, `.lora_up.weight` and `.alpha`),
converted by diffusers' own `convert_state_dict_to_kohya`, with each layer's alpha taken from the
adapter's config (that converter writes alpha = rank, which is right only when they are equal).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from difflab.errors import ModelError, OutputError

log = logging.getLogger("difflab")
EXPORTABLE = {"StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"}


def export_single_file(spec, out, *, overwrite: bool = False, half: bool = False) -> tuple[Path, str]:
    """Write the model or LoRA at `spec` (a run folder, a model folder or a LoRA folder) to `out`, in
    float16 when `half`; returns (out, "model" or "LoRA"). An existing `out` is replaced only with
    `overwrite`, and only once the new file is complete."""
    from difflab.files import check_output_file
    from difflab.layout import LORA_WEIGHTS, local_model_folder

    out = Path(out)
    if out.suffix != ".safetensors":
        raise OutputError(f"--single-file {out} should end in .safetensors (the format A1111 and ComfyUI load)")
    if out.exists() and not out.is_dir() and not overwrite:
        raise OutputError(f"--single-file {out} exists; pass --overwrite to replace it")
    check_output_file(out, "--single-file", "model.safetensors")
    folder = local_model_folder(spec)
    if (folder / "model_index.json").is_file():
        return write_model(folder, spec, out, half), "model"
    if (folder / LORA_WEIGHTS).is_file():
        return write_lora(folder / LORA_WEIGHTS, out, half), "LoRA"
    if (folder / "unet").is_dir() and (folder / "text_encoder").is_dir():
        raise ModelError(f"{spec} is a text model in pixel space (no VAE); the single-file format holds latent "
                         "(Stable Diffusion) models: train with a VAE to export")
    raise ModelError(f"{spec} is neither a text-to-image model folder (model_index.json) nor a LoRA run "
                     f"({LORA_WEIGHTS}); give a run folder of difflab train --conditioning text, finetune, "
                     "dreambooth or a LoRA")


def write_model(folder: Path, spec, out: Path, half: bool = False) -> Path:
    from difflab.storage.folder import load_model, pipeline_kind
    from difflab.storage.original_layout import pipeline_to_original
    from difflab.storage.single_file import CONFIGS_METADATA, pack_configs

    kind = pipeline_kind(folder, spec)
    if kind not in EXPORTABLE:
        what = "a pixel model" if kind in ("DDPMPipeline", "DDIMPipeline") else f"a {kind}"
        raise ModelError(f"{spec} is {what}; the single-file format holds Stable Diffusion text-to-image and "
                         "inpainting models")
    model = load_model(folder, safety_checker=False)  # the checks every model gets: damaged weights named
    if model.denoiser.extra_state():
        raise ModelError(f"{spec} has weights outside its UNet, which the single-file format has no place for")
    state = pipeline_to_original(model.unet, model.codec.vae, model.prompts.text_encoder)
    prediction = model.noise_schedule.config.prediction_type
    metadata = {CONFIGS_METADATA: pack_configs(folder),
                # the model-spec key kohya's and Stability's tools write: SD 2.x files cannot say it otherwise
                "modelspec.prediction_type": "v" if prediction == "v_prediction" else prediction}
    return save(to_half(state, spec) if half else state, out, metadata)


def write_lora(file: Path, out: Path, half: bool = False) -> Path:
    import torch
    from diffusers.utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya
    from safetensors import SafetensorError, safe_open

    from difflab.models.weights import check_weights

    try:
        with safe_open(str(file), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{file} is damaged: it is not a complete safetensors file ({e})") from None
    check_weights(state, file)
    if any(k.startswith(("lora_unet_", "lora_te")) for k in state):
        raise ModelError(f"{file} is already in the kohya format A1111 reads: use it as it is")
    config = adapter_configs(metadata, file)
    try:  # diffusers names the UNet's and the text encoder's layers differently: each part converts alone
        parts = [{k: v for k, v in state.items() if k.startswith(f"{part}.")} for part in ("unet", "text_encoder")]
        kohya = {k: v for part in parts if part for k, v in
                 convert_state_dict_to_kohya(convert_all_state_dict_to_peft(part)).items()}
    except (ValueError, KeyError) as e:
        raise ModelError(f"{file} is not a diffusers LoRA difflab can convert ({e})") from None
    out_state = {}
    for key, tensor in kohya.items():
        key = key.replace("lora_te1_", "lora_te_")  # SD 1.x/2.x have one text encoder: kohya's name for it
        part = "unet" if key.startswith("lora_unet_") else "text_encoder"
        if key.endswith(".alpha"):
            tensor = torch.tensor(float(config.get(part, {}).get("lora_alpha", tensor.item())))
        out_state[key] = tensor.detach().contiguous()
    ranks = {int(v.shape[0]) for k, v in out_state.items() if k.endswith(".lora_down.weight")}
    alphas = {float(v) for k, v in out_state.items() if k.endswith(".alpha")}
    info = {"ss_network_module": "networks.lora", "ss_network_dim": ",".join(map(str, sorted(ranks))),
            "ss_network_alpha": ",".join(f"{a:g}" for a in sorted(alphas))}
    return save(to_half(out_state, file) if half else out_state, out, info)


def to_half(state: dict, source) -> dict:
    """Floating-point weights as float16 (half the file, as most shared SD files are); refused when a
    weight lies beyond float16's range, which would be written as infinite."""
    import torch

    limit = torch.finfo(torch.float16).max
    for name, tensor in state.items():
        if tensor.is_floating_point() and tensor.numel() and tensor.abs().max() > limit:
            raise ModelError(f"{source} has weights beyond float16's range (in {name}); export it without --half")
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def save(state: dict, out: Path, metadata: dict) -> Path:
    """Write the file whole or not at all: an existing one is replaced only once the new one is complete."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from difflab.files import atomic_path, safetensors_os_error

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as partial:
            try:
                save_file(state, str(partial), metadata=metadata)
            except SafetensorError as e:
                raise safetensors_os_error(e, partial) from None
    except OSError as e:
        raise OutputError(f"--single-file {out} cannot be written ({e.strerror or e}); nothing was changed") from None
    return out


def adapter_configs(metadata: dict, file: Path) -> dict:
    """{"unet": LoraConfig as a dict, "text_encoder": ...} from the metadata diffusers' save_lora_weights
    writes; {} when absent (then alpha = rank, as diffusers reads such a file)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    flat = json.loads(raw)
    configs: dict = {}
    for key, value in flat.items():
        part, _, name = key.partition(".")
        configs.setdefault(part, {})[name] = value
    for part, config in configs.items():
        if config.get("alpha_pattern") or config.get("rank_pattern") or config.get("use_rslora") or \
                config.get("use_dora"):
            raise ModelError(f"{file}'s {part} adapter has per-layer ranks or alphas, rsLoRA or DoRA, which the kohya "
                             "format difflab writes does not hold")
    return configs
