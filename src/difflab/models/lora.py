"""LoRA adapters on a text-to-image model's attention projections, through peft.

LoRA is a choice of trainable parameters: `add_lora` puts peft adapters (`LoraConfig`) on the UNet's
attention projections (`to_q`, `to_k`, `to_v`, `to_out.0`) and, when it trains, the text encoder's
(`q_proj`, `k_proj`, `v_proj`, `out_proj`), freezes everything else, and returns what the optimizer
should train. Several adapters combine as peft combines them (one weight each: the output of a
projection is W·x + Σ weightᵢ·(αᵢ/rᵢ)·Bᵢ·Aᵢ·x); `adapter_weights` reads those weights back.
Reading and writing LoRA files is `difflab.storage.lora`'s.
"""

from __future__ import annotations

from difflab.errors import ConfigError, ModelError
from difflab.models.model import DiffusionModel

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
DEFAULT_ADAPTER = "default"


def add_lora(model: DiffusionModel, rank: int = 4, alpha: float | None = None, *, text_encoder: bool = False,
             name: str = DEFAULT_ADAPTER, dropout: float = 0.0) -> list:
    """Add a LoRA adapter of `rank` (scaled by alpha/rank; alpha defaults to rank) to the UNet's
    attention projections, and to the text encoder's when `text_encoder`; freeze every other weight of
    the model. Returns the trainable parameters (`lora_parameters(model)`)."""
    from peft import LoraConfig

    check_attention(model)
    check_rank(model, rank, text_encoder=text_encoder)
    alpha = float(rank if alpha is None else alpha)
    if not alpha > 0:
        raise ConfigError(f"the LoRA alpha must be more than 0 (got {alpha})")
    for network in model.modules():
        network.requires_grad_(False)
    # diffusers' DreamBooth LoRA script: gaussian A, zero B, so that training starts from the base model
    model.unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
                                      target_modules=list(UNET_TARGETS)), adapter_name=name)
    if text_encoder:
        if model.prompts is None:
            raise ModelError("this model has no text encoder to put LoRA adapters on")
        model.prompts.text_encoder.add_adapter(
            LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
                       target_modules=list(TEXT_ENCODER_TARGETS)), adapter_name=name)
    return lora_parameters(model)


def check_rank(model: DiffusionModel, rank, *, text_encoder: bool = False) -> None:
    """A rank of at least 1 and at most the width of the narrowest layer it adapts: an adapter's update
    B·A has rank min(rank, in, out), so a larger rank adds weights and time (it made a tiny run take
    40 s a step and 1.7 GB), never capacity."""
    if not (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1):
        raise ConfigError(f"--lora-rank must be a whole number of at least 1 (got {rank})")
    networks = {"unet": (model.unet, UNET_TARGETS)}
    if text_encoder and model.prompts is not None:
        networks["text_encoder"] = (model.prompts.text_encoder, TEXT_ENCODER_TARGETS)
    widths = [(min(layer_width(module, "A"), layer_width(module, "B")), f"{part}.{name}")
              for part, (network, targets) in networks.items()
              for name, module in network.named_modules()
              if name.endswith(targets) and layer_width(module, "A") is not None]
    if widths:
        narrowest, where = min(widths)
        if rank > narrowest:
            raise ConfigError(f"--lora-rank {rank} is more than the width of the layers it adapts (the narrowest, "
                              f"{where}, is {narrowest} wide): a larger rank adds time and size, not capacity; use "
                              f"--lora-rank {narrowest} or less (4 to 64 is typical)")


def lora_parameters(model: DiffusionModel, name: str | None = None) -> list:
    """The adapters' parameters (of adapter `name`, or of all), made trainable: what LoRA training
    optimizes while the base model stays frozen."""
    found = []
    for network in adapted_networks(model).values():
        for key, parameter in network.named_parameters():
            if ".lora_" in key and (name is None or key.endswith(f".{name}.weight") or key.endswith(f".{name}.bias")):
                parameter.requires_grad_(True)
                found.append(parameter)
    return found


def adapted_networks(model: DiffusionModel) -> dict:
    """{"unet": ..., "text_encoder": ...}: the networks of the model that hold LoRA adapters."""
    networks = {"unet": model.unet}
    if model.prompts is not None:
        networks["text_encoder"] = model.prompts.text_encoder
    return {part: network for part, network in networks.items() if getattr(network, "peft_config", None)}


def lora_state_dicts(model: DiffusionModel, name: str = DEFAULT_ADAPTER) -> dict[str, dict]:
    """The adapter's weights per network, keyed as the diffusers LoRA format keys them (before the
    "unet."/"text_encoder." prefix): what `save_lora` writes."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = {}
    for part, network in adapted_networks(model).items():
        if name in network.peft_config:
            layers[part] = convert_state_dict_to_diffusers(get_peft_model_state_dict(network, adapter_name=name))
            if part == "text_encoder" and not hasattr(network, "text_model"):
                # CLIPTextModel is flat in transformers 5; LoRA files (diffusers', kohya's, A1111's) name its
                # layers text_model.encoder...: written so, they load everywhere (diffusers strips it here)
                layers[part] = {f"text_model.{k}": v for k, v in layers[part].items()}
    return layers


def lora_summary(model: DiffusionModel, name: str = DEFAULT_ADAPTER) -> dict:
    """Rank, alpha, target modules and size of adapter `name`: what a LoRA's model card states."""
    summary = {"targets": {}, "parameters": 0}
    for part, network in adapted_networks(model).items():
        config = network.peft_config.get(name)
        if config is None:
            continue
        summary["targets"][part] = sorted(config.target_modules)
        summary.update(rank=config.r, alpha=config.lora_alpha)
        summary["parameters"] += sum(p.numel() for k, p in network.named_parameters()
                                     if ".lora_" in k and f".{name}." in k)
    return summary


def adapter_weights(model: DiffusionModel) -> dict[str, float]:
    """{adapter name: weight} of the adapters on the model, as peft holds them: a LoRA layer's scaling
    is weight·alpha/rank (alpha/√rank with rsLoRA)."""
    import math

    from peft.tuners.lora import LoraLayer

    weights: dict[str, float] = {}
    for network in adapted_networks(model).values():
        for name in network.peft_config:
            if name in weights:
                continue
            for module in network.modules():
                if isinstance(module, LoraLayer) and name in module.scaling:
                    rank = module.r[name]
                    base = module.lora_alpha[name] / (math.sqrt(rank) if module.use_rslora.get(name) else rank)
                    active = name in module.active_adapters
                    weights[name] = float(f"{module.scaling[name] / base:.12g}") if active else 0.0  # 0.7, not 0.69…98
                    break
    return weights


def check_scale(scale) -> float:
    import math

    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise ConfigError(f"a LoRA weight must be a number (got {scale!r})") from None
    if not math.isfinite(scale):
        raise ConfigError(f"a LoRA weight must be a finite number (got {scale})")
    return scale


def check_attention(model: DiffusionModel) -> None:
    """LoRA adapts the attention projections of a text-to-image model's UNet (and text encoder)."""
    attention = any(n.endswith(UNET_TARGETS) for n, _ in model.unet.named_modules())
    if model.codec is None or model.prompts is None:
        what = "a pixel model" + ("" if attention else " with no attention layers for a LoRA to adapt")
        raise ModelError(f"this is {what}; LoRA files adapt text-to-image models (the Stable Diffusion family), and "
                         "difflab applies them to those")
    if not attention:
        raise ModelError("this model's UNet has no attention layers for a LoRA to adapt")


def layer_width(module, side: str) -> int | None:
    """A layer's input (LoRA's A side) or output (B side) width; None for a layer LoRA cannot name."""
    import torch

    if isinstance(module, torch.nn.Linear):
        return module.in_features if side == "A" else module.out_features
    if isinstance(module, torch.nn.Conv2d):
        return module.in_channels if side == "A" else module.out_channels
    base = getattr(module, "base_layer", None)  # already wrapped by another adapter
    return layer_width(base, side) if base is not None else None
