"""Tiny random Stable Diffusion components, built with diffusers and transformers classes and saved
as pipeline folders (text-to-image, inpainting, depth-to-image, ×4 upscaler): nothing downloads."""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import torch

PROMPT_TOKENS = 24  # the tokenizer's length (letters are tokens here, so prompts are short)
TEXT_WIDTH = 16


def tokenizer(folder: Path, max_length: int = PROMPT_TOKENS):
    """A CLIPTokenizer whose vocabulary is single letters (enough for any lower-case prompt)."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)


def text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(hidden_size=TEXT_WIDTH, intermediate_size=32, num_attention_heads=2,
                                        num_hidden_layers=2, vocab_size=60, max_position_embeddings=PROMPT_TOKENS,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))


def unet(in_channels: int, **extra):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=2, norm_num_groups=4, **extra)


def vae(levels: int = 2):
    """levels=2: 2× smaller latents; the upscaler's has 3 levels (4×)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8] * levels,
                         down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
                         norm_num_groups=4, sample_size=16)


def scheduler(prediction: str = "epsilon"):
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, prediction_type=prediction)


def depth_estimator():
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    config = DPTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                       intermediate_size=32, backbone_out_indices=(0, 1, 2, 3), is_hybrid=False,
                       neck_hidden_sizes=[8, 8, 8, 8], fusion_hidden_size=8, reassemble_factors=[4, 2, 1, 0.5])
    return DPTForDepthEstimation(config), DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False)


def safety_checker():
    """A tiny safety checker and its image processor. Its thresholds flag nothing until a test lowers them."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    config = CLIPConfig(text_config={"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
                                     "num_hidden_layers": 1, "vocab_size": 60},
                        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
                                       "num_hidden_layers": 1, "image_size": 32, "patch_size": 8},
                        projection_dim=8)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return StableDiffusionSafetyChecker(config).eval(), processor


def build(folder: Path, kind: str = "text", seed: int = 0, safety: bool = False) -> Path:
    """Save a tiny pipeline folder of `kind`: text, inpaint (9-channel UNet), depth or upscale."""
    import diffusers

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as vocabulary:
        parts = dict(tokenizer=tokenizer(Path(vocabulary)), text_encoder=text_encoder(), scheduler=scheduler())
    if kind == "text":
        cls, parts["unet"], parts["vae"] = "StableDiffusionPipeline", unet(4), vae()
    elif kind == "inpaint":
        cls, parts["unet"], parts["vae"] = "StableDiffusionInpaintPipeline", unet(9), vae()
    elif kind == "depth":
        cls, parts["unet"], parts["vae"] = "StableDiffusionDepth2ImgPipeline", unet(5), vae()
        parts["depth_estimator"], parts["feature_extractor"] = depth_estimator()
    elif kind == "upscale":
        cls = "StableDiffusionUpscalePipeline"
        parts.update(unet=unet(7, num_class_embeds=101), vae=vae(3), scheduler=scheduler("v_prediction"),
                     low_res_scheduler=diffusers.DDPMScheduler(), max_noise_level=100)
    else:
        raise ValueError(kind)
    if kind != "depth":
        checker, processor = safety_checker() if safety else (None, None)
        parts.update(safety_checker=checker, feature_extractor=processor)
        if kind != "upscale":
            parts["requires_safety_checker"] = safety
    pipe = getattr(diffusers, cls)(**parts)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
