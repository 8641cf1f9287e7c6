"""The kinds of UNet in the Stable Diffusion family, told apart by what their extra input channels
hold (the first conditioning door), declared once: loading a folder decides which one it is."""

from __future__ import annotations

from dataclasses import dataclass

from difflab.errors import ModelError


@dataclass(frozen=True)
class Variant:
    name: str
    pipeline: str  # the diffusers pipeline class that runs it
    needs: tuple[str, ...]  # inputs a request must give besides a prompt
    about: str
    scheduler_fixes: tuple[str, ...] = ()  # config rewrites the diffusers pipeline makes (storage/stable_diffusion.py)

    def extra_channels(self, latent_channels: int) -> int:
        return {"inpaint": latent_channels + 1, "depth": 1, "upscale": 3}.get(self.name, 0)


VARIANTS: dict[str | None, Variant] = {
    None: Variant("text-to-image", "StableDiffusionPipeline", (), "the latents only (txt2img, img2img, and "
                  "inpainting by re-imposing the known region)", ("steps_offset", "clip_sample")),
    "inpaint": Variant("inpaint", "StableDiffusionInpaintPipeline", ("image", "mask"),
                       "latents + mask + masked-image latents", ("steps_offset",)),
    "depth": Variant("depth", "StableDiffusionDepth2ImgPipeline", ("image",), "latents + a depth map"),
    "upscale": Variant("upscale", "StableDiffusionUpscalePipeline", ("image",),
                       "latents + the low-resolution image (and its noise level as the class embedding)"),
}
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
