"""Named sizes for a text-to-image model built here: its cross-attention UNet
(`UNet2DConditionModel`), its CLIP text encoder (`CLIPTextModel`) and its VAE (`AutoencoderKL`).

`--model` names one of them, as it names a pixel UNet preset for other runs. `small` is sized for a
CPU (the built-in `shapes` at 32×32 become 8×8×4 latents; 8 channels keep colours better in the VAE
but made the whole model no better in the same UNet steps: docs/benchmarks.md), and its text encoder
has no transformer layers — each word reaches the UNet as itself, not mixed with the words before it,
which is what lets a colour-shape pair never seen in training be drawn (docs/text-to-image.md);
`quick` is `small` cut for `difflab quickstart --text` on a slow or busy machine; `pixel` works on the
images themselves (no VAE), its caption reaching every ResNet block as a class label does;
`medium` for GPUs and larger images (a VAE with Stable Diffusion's ×8 factor, a 6-layer text encoder
for captions whose word order matters).
"""

from __future__ import annotations

from dataclasses import dataclass

from difflab.errors import ModelError


@dataclass(frozen=True)
class TextPreset:
    unet_channels: tuple[int, ...]      # feature channels at each latent resolution, highest first
    unet_cross_attention: tuple[bool, ...]  # cross-attention (and self-attention) at that resolution
    heads: int | tuple[int, ...]         # attention heads, for every level or per level (below)
    text_width: int                      # the text encoder's hidden size = the UNet's cross_attention_dim
    text_layers: int
    text_heads: int
    vae_channels: tuple[int, ...] = ()  # the VAE's levels, each but the last halving the image; none: pixel space
    latent_channels: int = 4
    norm_groups: int = 32
    pooled_text: bool = False  # the caption, attention-pooled, also joins the timestep embedding (every ResNet)
    guidance: dict | None = None  # what a model of this preset records as its default guidance (None: the kind's)
    about: str = ""

    def unet_config(self, sample_size: int, in_channels: int) -> dict:
        down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in self.unet_cross_attention]
        up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(self.unet_cross_attention)]
        return {"sample_size": sample_size, "in_channels": in_channels, "out_channels": in_channels,
                "block_out_channels": list(self.unet_channels), "down_block_types": down, "up_block_types": up,
                "layers_per_block": 1 if self.unet_channels[0] < 128 else 2, "cross_attention_dim": self.text_width,
                # UNet2DConditionModel reads `attention_head_dim` as the number of heads (a naming slip
                # diffusers keeps for Stable Diffusion's configs)
                "attention_head_dim": list(self.heads) if isinstance(self.heads, tuple) else self.heads,
                "norm_num_groups": self.norm_groups,
                **({"addition_embed_type": "text", "addition_embed_type_num_heads": self.text_heads}
                   if self.pooled_text else {})}

    def text_config(self, vocab_size: int, max_tokens: int, bos: int, eos: int) -> dict:
        return {"vocab_size": vocab_size, "hidden_size": self.text_width, "intermediate_size": 4 * self.text_width,
                "num_hidden_layers": self.text_layers, "num_attention_heads": self.text_heads,
                "max_position_embeddings": max_tokens, "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos}

    def vae_config(self, image_size: int) -> dict:
        levels = len(self.vae_channels)
        return {"in_channels": 3, "out_channels": 3, "latent_channels": self.latent_channels,
                "block_out_channels": list(self.vae_channels), "down_block_types": ["DownEncoderBlock2D"] * levels,
                "up_block_types": ["UpDecoderBlock2D"] * levels, "layers_per_block": 1,
                "norm_num_groups": min(self.vae_channels[0], 32), "sample_size": image_size}

    @property
    def pixel_space(self) -> bool:
        """A new model of this preset works on the images themselves unless given a --vae."""
        return not self.vae_channels

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)


# Heads: `small` and `quick` have 32 narrow heads (2–4 channels each). Heads of 32 channels made the `quick` UNet's
# step 1.24× faster on a CPU but cost the quickstart seen shape 64% → 47% and position 100% → 57% in its
# 1,000 steps (many heads can each attend to a different word); in pixel space, where attention runs at
# 8×8 or finer, 32-channel heads are 1.3–2.75× faster (`pixel` has them). docs/benchmarks.md.

# A model trained as briefly as the quickstart's follows its prompts better, closer to the data, with gentler
# guidance: on `quick`'s 1,000 steps CFG 3 with rescale 0.7 against plain 7.5 took seen colour / shape / position
# from 77 / 52 / 93% to 85 / 62 / 99% and the Fréchet distance from 593 to 238 (docs/benchmarks.md).
QUICK_GUIDANCE = {"cfg_scale": 3.0, "cfg_rescale": 0.7}

TEXT_PRESETS = {
    "tiny": TextPreset((16, 32), (False, True), 8, text_width=16, text_layers=1, text_heads=2,
                       vae_channels=(8, 8), norm_groups=8, about="for tests"),
    "small": TextPreset((64, 128), (False, True), 32, text_width=128, text_layers=0, text_heads=4,
                        vae_channels=(16, 32, 64),
                        about="for CPU work: 4.0 M UNet parameters, latents ×4 smaller than the image, a text "
                              "encoder without transformer layers"),
    "quick": TextPreset((32, 64), (False, True), 32, text_width=128, text_layers=0, text_heads=4,
                        vae_channels=(8, 16, 32), guidance=QUICK_GUIDANCE,
                        about="`quickstart --text` on a slow or busy CPU: `small` with a quarter of its UNet "
                              "(1.0 M parameters, a step about 2.5× as fast) and a VAE of half its width (a step "
                              "2× as fast); it samples with CFG 3 and rescale 0.7 by default"),
    "pixel": TextPreset((32, 64, 64), (False, False, True), (1, 2, 2), text_width=128, text_layers=0, text_heads=4,
                        pooled_text=True,
                        about="pixel space (no VAE) for photographs up to 32 px: the class-conditional `small` "
                              "UNet with cross-attention at its lowest level and the caption, pooled, beside the "
                              "timestep (1.5 M parameters)"),
    "medium": TextPreset((128, 256, 512), (True, True, True), 64, text_width=512, text_layers=6, text_heads=8,
                         vae_channels=(64, 128, 256, 256),
                         about="for GPU work on 64-256 px images: latents ×8 smaller, as Stable Diffusion's"),
}


def text_preset(name: str) -> TextPreset:
    if name not in TEXT_PRESETS:
        raise ModelError(f"unknown text-to-image preset {name!r}; choose one of: {', '.join(TEXT_PRESETS)}")
    return TEXT_PRESETS[name]
