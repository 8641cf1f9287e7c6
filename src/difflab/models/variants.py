"""The kinds of UNet in the Stable Diffusion family, told apart by what their extra input channels
hold (the first conditioning door), declared once: loading a folder decides which one it is.

Each variant is one object that owns what differs between them outside the sampling loop: its extra
channels, the extra parts its diffusers pipeline holds, the modes it runs, and how cards and the demo
name it. (Where sampling starts and which inputs a request needs are diffusion/modes.py's and
diffusion/request.py's, keyed by `Variant.key`.)"""

from __future__ import annotations

from dataclasses import dataclass

from difflab.errors import ModelError


@dataclass(frozen=True)
class Variant:
    key: str | None  # DiffusionModel.variant: None for a plain text-to-image UNet
    name: str
    pipeline: str  # the diffusers pipeline class that runs it
    about: str  # what the UNet takes
    label: str  # how the demo names a model of this kind ("An inpainting")
    task: str = "image-to-image"  # the Hub's pipeline_tag for it
    cli_inputs: str = ""  # what `difflab sample` is given besides a prompt, for the card's example
    call_inputs: str = ""  # the same for the diffusers pipeline's call

    def extra_channels(self, latent_channels: int) -> int:
        """Input channels the UNet takes besides the latents."""
        return 0

    @property
    def modes(self) -> tuple[str, ...]:
        """The generation modes a model of this kind runs: its own only."""
        return (self.key,)

    def pipeline_parts(self, model) -> dict:
        """The parts its diffusers pipeline holds besides VAE, text encoder, tokenizer, UNet and scheduler."""
        checker, processor = model.safety_checker or (None, None)
        return dict(safety_checker=checker, feature_extractor=processor, requires_safety_checker=checker is not None)

    def conditioning_parts(self, batch: int, latent_channels: int, size, device) -> dict:
        """Zero inputs of the right shapes for its own doors, at latent `size` (a memory trial; workload.py)."""
        import torch

        channels = self.extra_channels(latent_channels)
        return {"channels": torch.zeros(batch, channels, *size, device=device)} if channels else {}


@dataclass(frozen=True)
class TextToImage(Variant):
    task: str = "text-to-image"

    @property
    def modes(self) -> tuple[str, ...]:
        return ("txt2img", "img2img", "inpaint")  # inpainting by re-imposing the known region


@dataclass(frozen=True)
class Inpaint(Variant):
    def extra_channels(self, latent_channels: int) -> int:
        return latent_channels + 1  # the mask and the masked image's latents


@dataclass(frozen=True)
class Depth(Variant):
    def extra_channels(self, latent_channels: int) -> int:
        return 1  # the depth map

    def pipeline_parts(self, model) -> dict:
        estimator, processor = model.depth_estimator or (None, None)
        return dict(depth_estimator=estimator, feature_extractor=processor)


@dataclass(frozen=True)
class Upscale(Variant):
    def extra_channels(self, latent_channels: int) -> int:
        return 3  # the low-resolution image

    def pipeline_parts(self, model) -> dict:
        checker, processor = model.safety_checker or (None, None)
        return dict(low_res_scheduler=model.low_res_scheduler, max_noise_level=model.max_noise_level,
                    safety_checker=checker, feature_extractor=processor)

    def conditioning_parts(self, batch: int, latent_channels: int, size, device) -> dict:
        import torch

        return {**super().conditioning_parts(batch, latent_channels, size, device),
                "noise_level": torch.zeros(batch, dtype=torch.long, device=device)}


VARIANTS: dict[str | None, Variant] = {v.key: v for v in (
    TextToImage(None, "text-to-image", "StableDiffusionPipeline", "the latents only (txt2img, img2img, and "
                "inpainting by re-imposing the known region)", "A text-to-image"),
    Inpaint("inpaint", "inpaint", "StableDiffusionInpaintPipeline", "latents + mask + masked-image latents",
            "An inpainting", cli_inputs=" --image photo.png --mask mask.png",
            call_inputs=", image=photo, mask_image=mask"),
    Depth("depth", "depth", "StableDiffusionDepth2ImgPipeline", "latents + a depth map", "A depth-to-image",
          cli_inputs=" --image photo.png --depth depth.png", call_inputs=", image=photo, depth_map=depth"),
    Upscale("upscale", "upscale", "StableDiffusionUpscalePipeline",
            "latents + the low-resolution image (and its noise level as the class embedding)", "A ×4 upscaling",
            cli_inputs=" --image small.png --noise-level 20", call_inputs=", image=small, noise_level=20"),
)}
PIPELINE_VARIANTS = {v.pipeline: key for key, v in VARIANTS.items()}
PIPELINE_VARIANTS["StableDiffusionImg2ImgPipeline"] = None


def variant_for(unet_in_channels: int, latent_channels: int, pipeline: str | None, where: str) -> str | None:
    """The variant whose channel layout the UNet has (the folder's pipeline class breaks ties)."""
    fits = [key for key, v in VARIANTS.items()
            if latent_channels + v.extra_channels(latent_channels) == unet_in_channels]
    hinted = PIPELINE_VARIANTS.get(pipeline or "", "none")
    if hinted in fits:
        return hinted
    if fits:
        return fits[0]
    layouts = "; ".join(f"{v.name}: {latent_channels + v.extra_channels(latent_channels)} ({v.about})"
                        for v in VARIANTS.values())
    raise ModelError(f"{where}: its UNet takes {unet_in_channels} input channels, which match no known layout "
                     f"for {latent_channels}-channel latents ({layouts})")
