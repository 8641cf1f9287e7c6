"""Model CPU offload, as diffusers' `enable_model_cpu_offload`: the networks rest on the CPU and each
moves to the GPU when it runs (text encoder, then UNet, then VAE), sent back when the next one starts,
through accelerate's hooks. A GPU then holds one network at a time: SD 1.5's UNet (3.4 GB in fp32,
1.7 GB in fp16) and its work, not all three."""

from __future__ import annotations

import torch

from difflab.errors import ConfigError


def check_offload(device) -> None:
    """ConfigError where there is no GPU to offload to."""
    if torch.device(device).type == "cpu":
        raise ConfigError("--offload moves each network to the GPU while it runs; on the CPU there is nothing to "
                          "offload to: leave --offload out, or give --device cuda")


def offload(model, device) -> None:
    """Put `model`'s networks under model CPU offload to `device` (a GPU); sampling then runs there."""
    from accelerate import cpu_offload_with_hook

    check_offload(device)
    attach(model, torch.device(device), cpu_offload_with_hook)


def attach(model, device: torch.device, hook_with) -> None:
    """The hooks of `hook_with` (accelerate's cpu_offload_with_hook) on each network in the order they run."""
    for part in model.modules():
        part.to("cpu")
    order = []
    if model.prompts is not None:
        order.append(model.prompts.text_encoder)
    order.append(model.denoiser)
    if model.codec is not None:
        order.append(model.codec.vae)
    hook = None
    for module in order:
        _, hook = hook_with(module, device, prev_module_hook=hook)
    model.execution_device = device
    if model.codec is not None:
        model.codec.execution_device = device
