"""The sampling loop: every sampler, seeds, batching, and agreement with plain diffusers."""

from __future__ import annotations

import pytest
import torch

from difflab.diffusion.generate import generate
from difflab.diffusion.request import GenerationRequest
from difflab.diffusion.samplers import SAMPLERS, scheduler_for
from difflab.errors import ConfigError
from difflab.storage.folder import load_model


@pytest.fixture(scope="module")
def model(trained_model):
    return load_model(trained_model)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_makes_finite_images_and_is_deterministic(model, sampler):
    a = generate(model, GenerationRequest(3, sampler=sampler, steps=5, seed=7))
    assert a.shape == (3, 1, 8, 8) and torch.isfinite(a).all() and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, generate(model, GenerationRequest(3, sampler=sampler, steps=5, seed=7)))


def test_seeds_give_different_images_and_batching_does_not_matter(model):
    one_batch = generate(model, GenerationRequest(6, sampler="euler-a", steps=6, seed=0), batch_size=6)
    three_batches = generate(model, GenerationRequest(6, sampler="euler-a", steps=6, seed=0), batch_size=2)
    assert torch.allclose(one_batch, three_batches, atol=1e-5)
    shifted = generate(model, GenerationRequest(3, sampler="euler-a", steps=6, seed=3))
    assert torch.allclose(shifted, one_batch[3:], atol=1e-5)  # image i uses seed + i
    assert not torch.allclose(one_batch[0], one_batch[1])


def test_ddim_eta_adds_noise(model):
    plain = generate(model, GenerationRequest(2, sampler="ddim", steps=8, seed=1))
    assert torch.equal(plain, generate(model, GenerationRequest(2, sampler="ddim", steps=8, seed=1, eta=0.0)))
    assert not torch.allclose(plain, generate(model, GenerationRequest(2, sampler="ddim", steps=8, seed=1, eta=1.0)))


@pytest.mark.parametrize("pipeline", ["DDPMPipeline", "DDIMPipeline"])
def test_plain_diffusers_pipeline_gives_the_same_images(trained_model, model, pipeline):
    import diffusers

    pipe = getattr(diffusers, pipeline).from_pretrained(trained_model)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(5 + i) for i in range(3)]
    if pipeline == "DDIMPipeline":  # what difflab's DDIM does (see sampling.denoise)
        pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
        theirs = pipe(batch_size=3, generator=generators, num_inference_steps=25, output_type="np",
                      use_clipped_model_output=True).images
    else:
        theirs = pipe(batch_size=3, generator=generators, num_inference_steps=25, output_type="np").images
    ours = generate(model, GenerationRequest(3, sampler="ddpm" if pipeline == "DDPMPipeline" else "ddim", steps=25,
                                             seed=5))
    assert torch.allclose(torch.from_numpy(theirs).permute(0, 3, 1, 2), ours, atol=1e-6)


def test_ddim_derives_its_noise_from_the_clipped_prediction(model):
    """DDIM's ε must agree with the x̂₀ it clipped: with diffusers' default (the unclipped ε), a step
    from pure noise moves x_t along a direction that no clipped x̂₀ explains."""
    from diffusers import DDIMScheduler

    scheduler = scheduler_for("ddim", model.noise_schedule.config)
    scheduler.set_timesteps(10)
    t, t_prev = scheduler.timesteps[:2]
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 3  # far outside [-1, 1]
    prediction = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 3
    step = scheduler.step(prediction, t, x, use_clipped_model_output=True)
    abar, abar_prev = scheduler.alphas_cumprod[int(t)], scheduler.alphas_cumprod[int(t_prev)]
    x0 = step.pred_original_sample
    eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
    assert torch.allclose(step.prev_sample, abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * eps, atol=1e-5)
    # and difflab's loop takes that step
    calls = []
    ours = scheduler_step_args(model, calls)
    assert calls and all(c.get("use_clipped_model_output") for c in calls) and isinstance(ours, DDIMScheduler)


def scheduler_step_args(model, calls: list):
    """Run difflab's loop with DDIM for 2 steps, recording the keyword arguments of each step."""
    import functools

    from difflab.diffusion.sampling import denoise, run_timesteps

    scheduler = scheduler_for("ddim", model.noise_schedule.config)
    original = scheduler.step

    @functools.wraps(original)  # the loop reads the step's signature
    def recording(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    scheduler.step = recording
    denoise(lambda x, t: torch.zeros_like(x), scheduler, torch.randn(1, 1, 8, 8), run_timesteps(scheduler, 2))
    return scheduler


def test_samplers_start_from_the_noisiest_timestep(model):
    for name in ("ddim", "ddpm", "dpm++2m", "unipc", "euler"):
        scheduler = scheduler_for(name, model.noise_schedule.config)
        scheduler.set_timesteps(10)
        assert scheduler.timesteps[0] == 999


def test_unknown_sampler():
    with pytest.raises(ConfigError, match="unknown sampler 'dpm3'; choose one of: ddpm, ddim, dpm"):
        scheduler_for("dpm3", {})


def test_bf16_sampling_runs_the_network_in_bf16_and_draws_nearly_the_same_images(model):
    dtypes = []
    hook = model.unet.conv_in.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    try:
        exact = generate(model, GenerationRequest(4, sampler="dpm++2m", steps=6, seed=2))
        fast = generate(model, GenerationRequest(4, sampler="dpm++2m", steps=6, seed=2, precision="bf16"))
    finally:
        hook.remove()
    assert dtypes[0] == torch.float32 and dtypes[-1] == torch.bfloat16
    assert fast.dtype == torch.float32 and not torch.equal(exact, fast)
    assert (exact - fast).abs().mean() < 0.02


def test_pixel_models_take_img2img_and_inpainting_through_the_same_loop(model):
    """A pixel model starts from a noised image (img2img) or keeps the unmasked region (inpainting)."""
    size = model.info.image_size
    image = torch.rand(1, size, size)
    near = generate(model, GenerationRequest(4, sampler="ddim", steps=10, seed=0, image=image, strength=0.3))
    far = generate(model, GenerationRequest(4, sampler="ddim", steps=10, seed=0, image=image, strength=0.9))
    assert (near - image).abs().mean() < (far - image).abs().mean()
    mask = torch.zeros(1, size, size)
    mask[:, :, size // 2:] = 1.0  # repaint the right half
    inpainted = generate(model, GenerationRequest(2, sampler="euler-a", steps=6, seed=1, image=image, mask=mask))
    kept = (image * 255).round() / 255
    assert torch.allclose(inpainted[..., : size // 2], kept[..., : size // 2].expand(2, -1, -1, -1), atol=1 / 255)
    assert (inpainted[..., size // 2:] - kept[..., size // 2:]).abs().mean() > 0.05
