"""The VAE stage of a text-to-image run: an `AutoencoderKL` trained on the run's images before the UNet.

The objective is latent diffusion's: reconstruction plus a small KL term that keeps the latents near
a unit Gaussian. The reconstruction term is a mean squared error that weighs each pixel by how far it
lies from its image's mean colour (`detail_weights`): with plain MSE a small object is a few per cent
of the pixels, and a VAE trained for minutes paints it in the background's tint (green as grey).
When it ends, the latent scaling factor is set from the data, 1 / std of the latents (as latent
diffusion set Stable Diffusion's 0.18215), so the diffusion model works on latents of about unit
variance; the reconstruction PSNR is reported.

It is a stage of the run, not another kind of run: it lives in the run folder's `vae/` sub-folder
with the one loop's progress bar, `metrics.csv` rows, checkpoints and resume, and a finished stage is
simply loaded again (`vae/model/`, a diffusers AutoencoderKL folder).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from difflab.errors import TrainingError
from difflab.images import make_grid
from difflab.training import checkpoints
from difflab.training.budget import Budget, lr_factor
from difflab.training.loop import Cadence, Loop, Task
from difflab.training.run_folder import MetricsLog, RunFolder
from difflab.training.steps import StepStats

log = logging.getLogger("difflab")

SCALE_IMAGES = 1024  # images whose latents set the scaling factor and measure the PSNR
WARMUP_STEPS = 50


def stage_folder(run_root: Path) -> RunFolder:
    return RunFolder(Path(run_root) / "vae")


@dataclass(frozen=True)
class VaeReport:
    """What the stage measured when it finished: the reconstruction PSNR, the steps it made (fewer
    than asked when its minutes ran out first) and its training seconds (they count against --minutes)."""

    psnr: float | None
    steps: int | None
    seconds: float = 0.0


def finished_vae(run_root: Path):
    """The stage's saved VAE and its VaeReport, if the stage has finished (else None)."""
    from diffusers import AutoencoderKL

    folder = stage_folder(run_root)
    if not (folder.model / "config.json").is_file():
        return None
    rows = MetricsLog(folder.metrics).rows
    final = [r for r in rows if r.get("psnr_eval")]
    seconds = next((float(r["seconds"]) for r in reversed(rows) if r.get("seconds")), 0.0)
    report = VaeReport(float(final[-1]["psnr_eval"]), int(final[-1]["step"]), seconds) if final \
        else VaeReport(None, None, seconds)
    return AutoencoderKL.from_pretrained(folder.model).eval(), report


def detail_weights(images: torch.Tensor, strength: float) -> torch.Tensor:
    """Per-pixel weights [N, 1, H, W] of mean 1 per image: 1 + strength · (distance of the pixel's colour
    from the image's mean colour, summed over channels), so that the pixels that make an object count
    beside a large plain background. strength 0: all ones (plain MSE)."""
    distance = (images - images.mean(dim=(2, 3), keepdim=True)).abs().sum(dim=1, keepdim=True)
    weights = 1 + strength * distance
    return weights / weights.mean(dim=(1, 2, 3), keepdim=True)


def psnr(images: torch.Tensor, reconstructions: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (a peak-to-peak range of 2)."""
    mse = (images.float() - reconstructions.float().clamp(-1, 1)).pow(2).mean().item()
    return 10 * math.log10(4 / max(mse, 1e-12))


class Reconstruction(torch.nn.Module):
    """images, noise -> (reconstructions from a posterior sample, each image's KL divergence)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(images).latent_dist
        latents = posterior.mean + posterior.std * noise.to(posterior.mean.dtype)
        return self.vae.decode(latents).sample, posterior.kl()


class VaeStage(Task):
    """The stage as a task of the one loop (training/loop.py): a batch is images, the loss is the
    reconstruction's, and a checkpoint holds the VAE, its optimizer and the posterior noise generator."""

    label = "VAE"

    def __init__(self, config, data, run_root: Path, accelerator, preset, clock=time.perf_counter):
        from diffusers import AutoencoderKL

        from difflab.data import BatchStream

        self.settings, self.run_settings = config.vae, config.run
        self.accelerator = accelerator
        self.folder = stage_folder(run_root)
        self.folder.root.mkdir(parents=True, exist_ok=True)
        self.data = data
        with torch.random.fork_rng():
            torch.manual_seed(config.run.seed)
            self.vae = AutoencoderKL.from_config(preset.vae_config(data.image_size))
        self.vae.to(accelerator.device).train()
        self.optimizer = torch.optim.AdamW(self.vae.parameters(), lr=self.settings.lr)
        self.stream = BatchStream(data, self.settings.batch_size, seed=config.run.seed + 1, flip=config.data.flip,
                                  rank=accelerator.process_index, world_size=accelerator.num_processes)
        self.rng = torch.Generator().manual_seed(config.run.seed * 7919 + 1 + accelerator.process_index)
        seconds = None if self.settings.minutes is None else self.settings.minutes * 60
        r = config.run
        if self.settings.minutes is not None and r.minutes:  # the bar says how --minutes are split
            self.label = f"VAE ({self.settings.minutes:.2g} of --minutes {r.minutes:g})"
        self.loop = Loop(self, self.folder, Budget(self.settings.steps, None, seconds), self.settings.batch_size,
                         Cadence(r.log_every, r.checkpoint_every, keep_checkpoints=r.keep_checkpoints), clock=clock,
                         main=accelerator.is_main_process)
        latest = self.folder.latest_checkpoint()
        if latest is not None:
            self.loop.resume(latest)
        self.factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        # one module for the whole forward pass, so that accelerate (DDP) syncs its gradients
        self.synced_vae, self.optimizer = accelerator.prepare(Reconstruction(self.vae), self.optimizer)

    def run(self):
        """Train until the stage's budget is used, then set the scaling factor and save; returns the VAE
        and its VaeReport."""
        try:
            self.loop.run()
        finally:
            self.stream.close()
        return self.finish()

    def step(self, loop: Loop) -> StepStats:
        return self.train_step(next(self.stream)["images"])

    def train_step(self, images: torch.Tensor) -> StepStats:
        acc, s = self.accelerator, self.settings
        images = images.to(acc.device)
        c, f = self.vae.config.latent_channels, self.factor
        noise = torch.randn((images.shape[0], c, images.shape[2] // f, images.shape[3] // f), generator=self.rng)
        with acc.autocast():
            reconstruction, kl = self.synced_vae(images, noise.to(acc.device))
        squared_error = (reconstruction.float() - images).pow(2)
        mse = squared_error.mean()
        weighted = (squared_error * detail_weights(images, s.detail_weight)).mean() if s.detail_weight else mse
        kl = kl.float().mean() / images[0].numel()  # per pixel, like the reconstruction term
        loss = weighted + s.kl_weight * kl
        acc.backward(loss)
        grad_norm = acc.clip_grad_norm_(self.vae.parameters(), 1.0)
        lr = s.lr * lr_factor(self.loop.state.step, self.loop.fraction_done(), WARMUP_STEPS, "cosine")
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr = lr
        return StepStats(loss=mse.detach(), grad_norm=grad_norm.detach().float() if grad_norm is not None else None)

    def advice(self) -> str:
        return f"lower --vae-lr (now {self.settings.lr}), then run again with --resume"

    def figures(self, row: dict) -> dict:
        return {"psnr": round(10 * math.log10(4 / max(row["loss"], 1e-12)), 3)}

    def checkpoint_state(self) -> tuple[dict, dict] | None:
        if not self.accelerator.is_main_process:
            return None
        optimizer_tensors, optimizer_meta = checkpoints.flatten_optimizer(self.optimizer.state_dict())
        tensors = {"model": self.vae.state_dict(), "optimizer": optimizer_tensors,
                   "rng": {"noise": self.rng.get_state()}}
        return tensors, {"optimizer": optimizer_meta}

    def load_checkpoint_state(self, tensors: dict, state: dict) -> None:
        self.vae.load_state_dict(tensors["model"])
        self.optimizer.load_state_dict(checkpoints.unflatten_optimizer(tensors["optimizer"], state["optimizer"]))
        self.rng.set_state(tensors["rng"]["noise"])

    @torch.no_grad()
    def finish(self):
        """Set the latent scaling factor from the data, measure the PSNR, write a reconstruction grid and
        save the VAE (main process); returns it, in evaluation mode, and its VaeReport."""
        vae = self.vae.eval()
        count = min(len(self.data), SCALE_IMAGES)
        picks = torch.linspace(0, len(self.data) - 1, count).long()
        images = self.data.batch(picks)["images"].to(self.accelerator.device)
        latents, reconstructions = [], []
        for chunk in images.split(256):
            mean = vae.encode(chunk).latent_dist.mean
            latents.append(mean)
            reconstructions.append(vae.decode(mean).sample)
        latents, reconstructions = torch.cat(latents), torch.cat(reconstructions)
        std = latents.float().std().item()
        if not math.isfinite(std) or std <= 0:
            raise TrainingError(f"the VAE stage's latents have no spread (std {std}); {self.loop.advice()}")
        vae.register_to_config(scaling_factor=round(1.0 / std, 5))
        quality = round(psnr(images, reconstructions), 2)
        log.info("VAE: reconstruction PSNR %.2f dB on %d images; latent scaling factor %.5f", quality, count,
                 vae.config.scaling_factor)
        if self.accelerator.is_main_process:
            shown = 8
            grid = make_grid(torch.cat([images[:shown], reconstructions[:shown].clamp(-1, 1)]).add(1).div(2).cpu(),
                             shown, ["images", "reconstructions"])
            self.folder.samples.mkdir(parents=True, exist_ok=True)
            grid.save(self.folder.samples / "reconstructions.png")
            rows = self.loop.metrics.rows
            if not (rows and rows[-1].get("psnr_eval")):  # once: a resumed stage that had finished measures again
                self.loop.metrics.append({"step": self.loop.state.step, "psnr_eval": quality,
                                          "scaling_factor": vae.config.scaling_factor})
            from difflab.files import atomic_folder

            with atomic_folder(self.folder.model) as partial:
                vae.save_pretrained(partial, safe_serialization=True)
        self.accelerator.wait_for_everyone()
        # the seconds as metrics.csv holds them, so that a resumed run reads back the same split of --minutes
        seconds = float(f"{round(self.loop.state.seconds, 2):.6g}")
        return vae, VaeReport(quality, self.loop.state.step, seconds)
