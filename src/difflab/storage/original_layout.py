"""The original Stable Diffusion single-file layout (CompVis/LDM names, as A1111 and ComfyUI read them),
written from diffusers components.

diffusers reads this layout (`from_single_file`, through `convert_ldm_unet_checkpoint` and its siblings)
but only writes it in a script (scripts/convert_diffusers_to_original_stable_diffusion.py) whose loops
assume SD's four levels of two blocks. Here the same renaming follows the UNet's and the VAE's own
configs (any number of levels and blocks per level), the top-level names come from diffusers'
`DIFFUSERS_TO_LDM_MAPPING`, and `check_round_trip` runs diffusers' own readers over the result: a
layout this file cannot express (or gets wrong) is refused, never written.

UNet under `model.diffusion_model.`, VAE under `first_stage_model.`; the text encoder under
`cond_stage_model.transformer.` (SD 1.x's OpenAI CLIP layout), or for SD 2.x's text encoder (OpenCLIP
ViT-H: 1024 wide, gelu) under `cond_stage_model.model.` in OpenCLIP's layout (q, k and v in one
`in_proj_weight`), which is how A1111 tells an SD 2.x file from an SD 1.x one. Like diffusers' script,
an SD 2.x file has no `text_projection` and no 24th layer: SD 2.x uses neither, and diffusers' text
encoder does not hold them.
"""

from __future__ import annotations

import re

import torch

from difflab.errors import ModelError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."
QKV = re.compile(r"(resblocks\.\d+)\.attn\.([qkv])_proj\.(weight|bias)$")

# inside a UNet resnet block: diffusers name -> LDM name (diffusers' update_unet_resnet_ldm_to_diffusers, reversed)
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
# inside the VAE's mid-block attention (diffusers' update_vae_attentions_ldm_to_diffusers, reversed)
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_blocks(config) -> list[tuple[str, str, dict]]:
    """(diffusers prefix, LDM prefix, inner renames) for each block of a UNet2DConditionModel's config."""
    levels, per_level = len(config["block_out_channels"]), config["layers_per_block"]
    blocks = []
    for i in range(levels):
        for j in range(per_level):  # LDM counts input blocks across levels, each level ending in a downsampler
            n = (per_level + 1) * i + j + 1
            blocks += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{n}.0.", UNET_RESNET),
                       (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{n}.1.", {})]
        if i < levels - 1:
            blocks.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(per_level + 1) * (i + 1)}.0.op.",
                           {}))
        attention = config["up_block_types"][i].startswith("CrossAttn")
        for j in range(per_level + 1):
            n = (per_level + 1) * i + j
            blocks += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{n}.0.", UNET_RESNET),
                       (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{n}.1.", {})]
        if i < levels - 1:  # the upsampler follows the level's last block: after its attention, if it has one
            n = (per_level + 1) * i + per_level
            blocks.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{n}.{2 if attention else 1}.", {}))
    blocks.append(("mid_block.attentions.0.", "middle_block.1.", {}))
    blocks += [(f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.", UNET_RESNET) for j in range(2)]
    return blocks


def vae_blocks(config) -> list[tuple[str, str, dict]]:
    levels, per_level = len(config["block_out_channels"]), config["layers_per_block"]
    blocks = []
    for i in range(levels):
        blocks += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", VAE_RESNET)
                   for j in range(per_level)]
        if i < levels - 1:
            blocks.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.", {}))
        level = levels - 1 - i  # LDM numbers the decoder's levels from the bottom
        blocks += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{level}.block.{j}.", VAE_RESNET)
                   for j in range(per_level + 1)]
        if i < levels - 1:
            blocks.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{level}.upsample.", {}))
    for part in ("encoder", "decoder"):
        blocks += [(f"{part}.mid_block.resnets.{j}.", f"{part}.mid.block_{j + 1}.", VAE_RESNET) for j in range(2)]
        blocks.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", VAE_ATTENTION))
    return blocks


def _rename(state: dict, layers: dict, blocks: list, prefix: str, what: str) -> dict:
    out = {}
    for key, tensor in state.items():
        if key in layers:
            out[prefix + layers[key]] = tensor
            continue
        for old, new, inner in blocks:
            if key.startswith(old):
                rest = key[len(old):]
                for name, ldm_name in inner.items():
                    if rest.startswith(name + "."):
                        rest = ldm_name + rest[len(name):]
                        break
                out[prefix + new + rest] = tensor
                break
        else:
            raise ModelError(f"the {what} has a layer ({key}) that the original Stable Diffusion single-file layout "
                             "has no place for; export it as a diffusers folder instead")
    return out


def unet_to_original(unet) -> dict:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    config = unet.config
    if type(unet).__name__ != "UNet2DConditionModel":
        raise ModelError(f"a {type(unet).__name__} has no original Stable Diffusion single-file layout")
    layers = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    return _rename(unet.state_dict(), layers, unet_blocks(config), UNET_PREFIX, "UNet")


def vae_to_original(vae) -> dict:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    out = _rename(vae.state_dict(), DIFFUSERS_TO_LDM_MAPPING["vae"], vae_blocks(vae.config), VAE_PREFIX, "VAE")
    # the original VAE's attention projections are 1×1 convolutions
    return {k: v[:, :, None, None] if ".attn_1." in k and k.endswith(".weight") and v.ndim == 2 else v
            for k, v in out.items()}


def is_openclip(text_encoder) -> bool:
    """SD 2.x's text encoder (OpenCLIP ViT-H/14's text tower) rather than SD 1.x's OpenAI CLIP ViT-L/14."""
    config = text_encoder.config
    return config.hidden_size == 1024 and config.hidden_act == "gelu"


def _text_state(text_encoder) -> dict:
    if type(text_encoder).__name__ != "CLIPTextModel":
        raise ModelError(f"a {type(text_encoder).__name__} text encoder has no place in the original Stable Diffusion "
                         "single-file layout (it holds a CLIPTextModel)")
    # transformers 5's CLIPTextModel is flat; the layout (and older transformers) name its layers text_model.*
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in text_encoder.state_dict().items()}


def text_encoder_to_original(text_encoder) -> dict:
    return {TEXT_PREFIX + k: v for k, v in _text_state(text_encoder).items()}


def text_encoder_to_openclip(text_encoder) -> dict:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    layers = DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"]
    renames = DIFFUSERS_TO_LDM_MAPPING["openclip"]["transformer"]
    out, projections = {}, {}
    for key, tensor in _text_state(text_encoder).items():
        if key in layers:
            out[OPENCLIP_PREFIX + layers[key]] = tensor
            continue
        if not key.startswith("text_model.encoder.layers."):
            raise ModelError(f"the text encoder has a layer ({key}) that the OpenCLIP layout has no place for")
        for name, ldm_name in renames.items():
            key = key.replace(name, ldm_name)
        found = QKV.match(key)
        if found:  # OpenCLIP keeps q, k and v in one matrix (and one bias), in that order
            projections.setdefault((found[1], found[3]), {})[found[2]] = tensor
        else:
            out[OPENCLIP_PREFIX + "transformer." + key] = tensor
    for (block, kind), parts in projections.items():
        out[f"{OPENCLIP_PREFIX}transformer.{block}.attn.in_proj_{kind}"] = torch.cat([parts[p] for p in "qkv"])
    return out


def pipeline_to_original(unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    """One state dict in the original layout, contiguous tensors on the CPU, checked by diffusers' readers."""
    text = text_encoder_to_openclip(text_encoder) if is_openclip(text_encoder) else text_encoder_to_original(
        text_encoder)
    state = {**unet_to_original(unet), **vae_to_original(vae), **text}
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    check_round_trip(state, unet, vae, text_encoder)
    return state


def check_round_trip(state: dict, unet, vae, text_encoder) -> None:
    """diffusers' own single-file readers give back every weight of each component, unchanged."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    openclip = OPENCLIP_PREFIX + "token_embedding.weight" in state
    read_text = convert_open_clip_checkpoint(text_encoder, state) if openclip else convert_ldm_clip_checkpoint(state)
    text = {k.removeprefix("text_model."): v for k, v in read_text.items()}
    text_own = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    for what, read, own in (("UNet", convert_ldm_unet_checkpoint(dict(state), dict(unet.config)), unet.state_dict()),
                            ("VAE", convert_ldm_vae_checkpoint(dict(state), dict(vae.config)), vae.state_dict()),
                            ("text encoder", text, text_own)):
        lost = sorted(set(own) - set(read))
        if lost:
            raise ModelError(f"the {what}'s layout does not survive the original Stable Diffusion single-file format "
                             f"({len(lost)} weights lost, such as {lost[0]}); export it as a diffusers folder instead")
        changed = [k for k in own if read[k].shape != own[k].shape or not torch.equal(read[k].cpu(), own[k].cpu())]
        if changed:
            raise ModelError(f"the {what}'s weights change on the way through the original single-file format (such "
                             f"as {changed[0]}); export it as a diffusers folder instead")
