"""What lets a large model train in a small GPU, as diffusers' training scripts do it: gradient
checkpointing, a smaller optimizer state (8-bit AdamW, Adafactor), the frozen networks held in the half
type of mixed precision, and checkpoints of only what trains.
"""

from __future__ import annotations

import torch

from difflab.errors import ConfigError
from difflab.models.model import DiffusionModel

HALF_TYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


# ---- gradient checkpointing --------------------------------------------------------------------------

def enable_gradient_checkpointing(model: DiffusionModel, text_encoder: bool) -> None:
    """Recompute activations in the backward pass instead of keeping them: the UNet's blocks (diffusers'
    own switch) and, when it trains, the text encoder's layers (transformers' switch; non-reentrant, so
    that gradients reach the weights though the token ids need none)."""
    unet = model.unet
    if not getattr(unet, "_supports_gradient_checkpointing", False):
        raise ConfigError(f"--gradient-checkpointing: this model's {type(unet).__name__} does not support it")
    unet.enable_gradient_checkpointing()
    if text_encoder and model.prompts is not None:
        encoder = model.prompts.text_encoder
        non_reentrant = {"use_reentrant": False}
        if hasattr(encoder, "activation_checkpointing_enable"):  # transformers 5's name
            encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=non_reentrant)
        else:
            encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=non_reentrant)


# ---- the optimizer -----------------------------------------------------------------------------------

def make_optimizer(name: str, params: list[torch.nn.Parameter], lr: float, weight_decay: float
                   ) -> torch.optim.Optimizer:
    """AdamW; bitsandbytes' 8-bit AdamW (its two moments quantised to a byte each, for tensors of 4,096
    values or more); or transformers' Adafactor at a fixed learning rate (the loop sets it every step)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw8bit":
        return adamw_8bit(params, lr, weight_decay)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, weight_decay=weight_decay, scale_parameter=False, relative_step=False,
                         warmup_init=False)
    raise ConfigError(f"--optimizer {name!r} is not an option; choose one of: adamw, adamw8bit, adafactor")


def adamw_8bit(params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError("--optimizer adamw8bit needs bitsandbytes, which is not installed: "
                          "pip install 'difflab[gpu]' (or use --optimizer adamw or adafactor)") from None
    except Exception as e:  # a build without a backend for this machine fails as it loads
        raise ConfigError(f"--optimizer adamw8bit: bitsandbytes cannot run here ({_first_line(e)}); "
                          "use --optimizer adamw or adafactor") from None
    try:
        return bitsandbytes.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    except Exception as e:
        raise ConfigError(f"--optimizer adamw8bit: bitsandbytes cannot run here ({_first_line(e)}); "
                          "use --optimizer adamw or adafactor") from None


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


# ---- frozen networks in the half type ---------------------------------------------------------------

def hold_frozen_in_half(model: DiffusionModel, precision: str, *, keep_full: bool, device: torch.device
                        ) -> dict[str, dict[str, torch.Tensor]]:
    """Under fp16/bf16 mixed precision, the weights that do not train (the VAE, a text encoder that does
    not train, a LoRA run's base UNet) held in that half type, as diffusers' scripts do with their
    `weight_dtype`: the autocast copies they would otherwise get each step are not needed, and they take
    half the memory. The trained weights stay fp32 (the optimizer and fp16 loss scaling need them so).
    Returns, when `keep_full`, the full-precision state of each frozen network that was cast (in CPU memory),
    so that a saved model holds the frozen networks as they were (`restore_full`). Training on the CPU
    (`device`), that copy would cost more than the half type saves, so wholly frozen networks stay as they are
    there when `keep_full`; a LoRA run's frozen parts (nothing of them is saved) are cast on every device."""
    dtype = HALF_TYPES.get(precision)
    kept: dict[str, dict[str, torch.Tensor]] = {}
    if dtype is None:
        return kept
    for name, network in frozen_networks(model).items():
        if keep_full and torch.device(device).type == "cpu":
            continue
        if keep_full:
            kept[name] = {k: v.detach().to("cpu", copy=v.device.type != "cpu") for k, v in network.state_dict().items()}
        for p in network.parameters():
            if not p.requires_grad and p.dtype.is_floating_point:
                p.data = p.data.to(dtype)
        for b in network.buffers():
            if b.dtype.is_floating_point:
                b.data = b.data.to(dtype)
    return kept


def networks_by_name(model: DiffusionModel) -> dict[str, torch.nn.Module]:
    networks = {"denoiser": model.denoiser}
    if model.codec is not None:
        networks["vae"] = model.codec.vae
    if model.prompts is not None:
        networks["text_encoder"] = model.prompts.text_encoder
    return networks


def frozen_networks(model: DiffusionModel) -> dict[str, torch.nn.Module]:
    """The networks with weights that do not train, by name: wholly frozen ones (the VAE), and those with a
    frozen base under trained adapters (LoRA)."""
    return {name: n for name, n in networks_by_name(model).items() if any(not p.requires_grad for p in n.parameters())}


def restore_full(model: DiffusionModel, kept: dict[str, dict[str, torch.Tensor]]) -> None:
    """The frozen networks back in their full precision (before the model is saved)."""
    for name, state in kept.items():
        network = networks_by_name(model)[name]
        device = next(network.parameters()).device
        for key, tensor in network.state_dict(keep_vars=True).items():
            tensor.data = state[key].to(device)


# ---- checkpoints of what trains ------------------------------------------------------------------------

def trained_state(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights of `network` that train (a LoRA run's adapters), by state-dict name."""
    return {name: p for name, p in network.named_parameters() if p.requires_grad}


def load_trained_state(network: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load a checkpoint's trained weights into `network`; the frozen rest comes from the base model. A
    checkpoint that names a weight the network lacks, or lacks one that trains, is refused."""
    from difflab.errors import TrainingError

    result = network.load_state_dict(state, strict=False)
    trained = set(trained_state(network))
    missing = trained & set(result.missing_keys)
    if result.unexpected_keys or missing:
        example = (result.unexpected_keys or sorted(missing))[0]
        raise TrainingError(f"the checkpoint's {what} does not fit this run (for one, {example}); resume it with "
                            "the settings it was made with")
