"""The from-scratch teaching implementation: the course's numbers, DDPM checked against diffusers,
training that learns, and the `difflab scratch` commands."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from difflab import scratch
from difflab.cli import main
from difflab.data import BatchStream, open_dataset
from difflab.images import png_settings

DIFFUSERS_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def ddpm_scheduler(schedule: str, timesteps: int = 1000):
    """diffusers' DDPM set up as the textbook step: no clipping or thresholding of x̂₀, predicted
    noise, fixed small variance β̃_t (its defaults, except clip_sample, which is on by default)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=timesteps, beta_schedule=DIFFUSERS_SCHEDULES[schedule],
                         clip_sample=False, thresholding=False, prediction_type="epsilon",
                         variance_type="fixed_small")


# ---- the course's toy model ----------------------------------------------------------------------------

def test_basic_unet_has_the_course_parameter_count_and_keeps_the_image_shape():
    net = scratch.BasicUNet()
    assert sum(p.numel() for p in net.parameters()) == 309_057
    assert net(torch.rand(2, 1, 28, 28)).shape == (2, 1, 28, 28)
    assert scratch.BasicUNet(3, 3)(torch.rand(1, 3, 16, 16)).shape == (1, 3, 16, 16)


def test_corrupt_keeps_the_image_at_amount_0_and_gives_uniform_noise_at_1():
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(scratch.corrupt(x, 0.0), x)
    noise = scratch.corrupt(x, 1.0, torch.Generator().manual_seed(2))
    assert torch.equal(noise, torch.rand(x.shape, generator=torch.Generator().manual_seed(2)))
    assert 0 <= noise.min() and noise.max() < 1 and abs(noise.mean().item() - 0.5) < 0.1
    mixed = scratch.corrupt(x, torch.tensor([0.0, 1.0, 0.0, 0.25]), torch.Generator().manual_seed(2))
    assert torch.equal(mixed[0], x[0]) and torch.equal(mixed[1], noise[1])  # one amount per image
    assert torch.allclose(mixed[3], 0.75 * x[3] + 0.25 * noise[3])


def test_the_naive_sampler_moves_1_over_n_minus_i_of_the_way_to_the_prediction():
    seen = []
    target = torch.full((1, 1, 4, 4), 0.5)

    def net(x):
        seen.append(x.clone())
        return target

    x = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    out = scratch.sample(net, x, steps=4)
    assert len(seen) == 4
    assert torch.allclose(seen[1], x + (target - x) / 4)  # step 0: a quarter of the way
    assert torch.allclose(seen[2], seen[1] + (target - seen[1]) / 3)  # step 1: a third of what is left
    assert torch.allclose(out, target)  # the last step lands on the prediction


def test_training_the_basic_unet_on_digits_lowers_the_loss():
    data = open_dataset("digits", 8)
    stream = BatchStream(data, 8, seed=0)
    torch.manual_seed(0)
    net = scratch.BasicUNet()
    batches = ((next(stream)["images"] + 1) / 2 for _ in range(300))  # images in [0, 1], as in the course
    losses = scratch.train(net, batches, generator=torch.Generator().manual_seed(0))
    assert len(losses) == 300 and all(np.isfinite(losses))
    first, last = np.mean(losses[:10]), np.mean(losses[-50:])
    assert last < 0.6 * first, (first, last)


# ---- DDPM against diffusers --------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_the_forward_process_matches_diffusers_add_noise(schedule):
    reference = ddpm_scheduler(schedule)
    betas = scratch.beta_schedule(schedule)
    alpha_bar = scratch.alphas_cumprod(betas)
    torch.testing.assert_close(betas, reference.betas, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(alpha_bar, reference.alphas_cumprod, rtol=1e-6, atol=1e-9)

    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(8, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 1, 10, 250, 500, 750, 998, 999])
    ours = scratch.add_noise(x0, noise, t, alpha_bar)
    theirs = reference.add_noise(x0, noise, t)
    assert (ours - theirs).abs().max().item() <= 1e-6
    assert not torch.allclose(ours[0], ours[-1])  # the timesteps really differ


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("t", [999, 998, 500, 1, 0])
def test_one_ddpm_step_matches_diffusers_step_given_the_same_noise(schedule, t):
    reference = ddpm_scheduler(schedule)
    alpha_bar = scratch.alphas_cumprod(scratch.beta_schedule(schedule))
    g = torch.Generator().manual_seed(t)
    x_t, eps = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    theirs = reference.step(eps, t, x_t, generator=torch.Generator().manual_seed(7)).prev_sample
    noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(7))  # what diffusers drew
    ours = scratch.ddpm_step(eps, t, x_t, alpha_bar, noise)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    if t > 0:  # the noise matters: a different draw gives a different step
        other = scratch.ddpm_step(eps, t, x_t, alpha_bar, torch.randn(x_t.shape, generator=g))
        assert (other - theirs).abs().max() > 1e-3


def test_diffusers_default_clipping_is_what_the_textbook_step_leaves_out():
    """Why the comparison turns clip_sample off: at high noise x̂₀ leaves [-1, 1] and diffusers' default clips it."""
    from diffusers import DDPMScheduler

    alpha_bar = scratch.alphas_cumprod(scratch.beta_schedule("linear"))
    g = torch.Generator().manual_seed(0)
    x_t, eps = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    clipped = DDPMScheduler().step(eps, 900, x_t, generator=torch.Generator().manual_seed(7)).prev_sample
    noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(7))
    ours = scratch.ddpm_step(eps, 900, x_t, alpha_bar, noise)
    assert (ours - clipped).abs().max() > 1e-2


def test_the_ddpm_sampling_loop_matches_a_diffusers_loop():
    timesteps, shape = 50, (2, 1, 4, 4)

    def eps_model(x, t):  # any fixed function of (x_t, t) will do
        return 0.3 * x + 0.01 * t.float().view(-1, 1, 1, 1)

    ours = scratch.ddpm_sample(eps_model, shape, scratch.beta_schedule("linear", timesteps),
                               torch.Generator().manual_seed(3))
    reference = ddpm_scheduler("linear", timesteps)
    reference.set_timesteps(timesteps)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g)
    for t in reference.timesteps:
        x = reference.step(eps_model(x, t.repeat(shape[0])), t, x, generator=g).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


def test_unknown_schedule_is_refused():
    from difflab.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown noise schedule 'quadratic'; choose linear or cosine"):
        scratch.beta_schedule("quadratic")


def test_difflab_scratch_is_the_teaching_module():
    from difflab.models import scratch as module

    assert scratch.BasicUNet is module.BasicUNet and scratch.ddpm_step is module.ddpm_step
    assert set(scratch.__all__) <= set(vars(module))


# ---- the commands ------------------------------------------------------------------------------------

def test_help_lists_the_scratch_commands_and_their_settings(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "scratch" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["scratch", "train", "--help"])
    out = capsys.readouterr().out
    assert "[optim] settings" in out and "--sample-steps" in out and "--resume" not in out
    with pytest.raises(SystemExit):
        main(["scratch", "sample", "--help"])
    assert "naive sampler steps" in capsys.readouterr().out


def scratch_train(capsys, out, *extra):
    return run_cli(capsys, "scratch", "train", "--data", "digits", "--image-size", "8", "--steps", "20",
                   "--batch-size", "8", "--sample-every", "10", "--sample-count", "4", "--sample-steps", "3",
                   "--log-every", "5", "--out", out, *extra)


@pytest.fixture(scope="module")
def scratch_run(tmp_path_factory):
    """A teaching model trained for 20 steps by `difflab scratch train`; its run folder."""
    run = tmp_path_factory.mktemp("scratch") / "run"
    assert main(["scratch", "train", "--data", "digits", "--image-size", "8", "--steps", "20", "--batch-size", "8",
                 "--sample-every", "10", "--sample-count", "4", "--sample-steps", "3", "--log-every", "5",
                 "--out", str(run)]) == 0
    return run


def test_scratch_train_fills_the_run_folder_like_the_real_trainer(scratch_run):
    run = scratch_run
    assert sorted(p.name for p in run.iterdir()) == ["config.toml", "loss.png", "metrics.csv", "model", "samples"]
    rows = [line.split(",") for line in (run / "metrics.csv").read_text().splitlines()]
    assert rows[0] == ["step", "epoch", "loss", "lr", "images_per_s", "seconds"]
    assert [r[0] for r in rows[1:]] == ["5", "10", "15", "20"]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_000010.png", "step_000020.png"]
    assert png_settings(run / "samples" / "step_000020.png") == {"step": 20, "sampler": "naive", "steps": 3, "seed": 0}
    assert (run / "loss.png").stat().st_size > 1000
    assert sorted(p.name for p in (run / "model").iterdir()) == ["README.md", "basic_unet.safetensors", "scratch.json"]
    weights = load_file(run / "model" / "basic_unet.safetensors")
    assert sum(w.numel() for w in weights.values()) == 309_057
    assert not [p for p in run.rglob("*") if p.suffix in {".bin", ".pt", ".pth", ".ckpt", ".pkl"}]
    config = (run / "config.toml").read_text()
    assert "[optim]" in config and "image_size = 8" in config and "steps = 20" in config


def test_scratch_sample_gives_the_training_grid_and_repeats_itself(capsys, scratch_run, tmp_path):
    code, err = run_cli(capsys, "scratch", "sample", "--model", scratch_run, "-n", "4", "--steps", "3",
                        "--out", tmp_path / "a.png")
    assert code == 0 and "wrote 4 images" in err
    final_grid = np.asarray(Image.open(scratch_run / "samples" / "step_000020.png"))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), final_grid)  # same seeds, same images
    assert png_settings(tmp_path / "a.png") == {"model": str(scratch_run), "sampler": "naive", "steps": 3,
                                                "seed": 0, "count": 4}
    code, _ = run_cli(capsys, "scratch", "sample", "--model", scratch_run / "model", "-n", "4", "--steps", "3",
                      "--seed", "1", "--batch-size", "3", "--out", tmp_path / "b.png")
    assert code == 0
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "b.png")), final_grid)


def test_a_scratch_config_file_reruns_the_run(capsys, scratch_run, tmp_path):
    code, err = run_cli(capsys, "scratch", "train", "--config", scratch_run / "config.toml",
                        "--out", tmp_path / "again")
    assert code == 0 and f"model:    {tmp_path / 'again' / 'model'}  (BasicUNet weights" in err
    assert f"sample more with: difflab scratch sample --model {tmp_path / 'again' / 'model'}" in err
    a = load_file(scratch_run / "model" / "basic_unet.safetensors")
    b = load_file(tmp_path / "again" / "model" / "basic_unet.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_scratch_train_takes_rgb_images(capsys, labelled_folder, tmp_path):
    code, _ = run_cli(capsys, "scratch", "train", "--data", labelled_folder, "--image-size", "8", "--steps", "3",
                      "--batch-size", "4", "--sample-count", "2", "--sample-steps", "2", "--out", tmp_path / "rgb")
    assert code == 0
    weights = load_file(tmp_path / "rgb" / "model" / "basic_unet.safetensors")
    assert weights["down_layers.0.weight"].shape == (32, 3, 5, 5) and weights["up_layers.2.weight"].shape[0] == 3
    code, _ = run_cli(capsys, "scratch", "sample", "--model", tmp_path / "rgb", "-n", "2", "--steps", "2",
                      "--out", tmp_path / "rgb.png")
    grid = np.asarray(Image.open(tmp_path / "rgb.png"))
    assert code == 0 and grid.shape[-1] == 3
    assert np.abs(grid[..., 0].astype(int) - grid[..., 2].astype(int)).max() > 0  # colour, not grey


def test_a_scratch_run_folder_is_never_silently_reused(capsys, scratch_run):
    code, err = scratch_train(capsys, scratch_run)
    assert code == 2 and f"{scratch_run} already holds a run; add --overwrite to start again" in err


@pytest.mark.parametrize("args,message", [
    (["scratch", "train", "--image-size", "30"], "image size 30 does not fit the from-scratch UNet"),
    (["scratch", "train", "--lr", "0"], "--lr must be greater than 0 (got 0.0)"),
    (["scratch", "train", "--channels", "2"], "--channels 2 is not an option; choose one of: 1, 3"),
    (["scratch", "train", "--data", "nowhere-spec"], "unknown data spec 'nowhere-spec'"),
    (["scratch", "train", "--config", "{tmp}/none.toml"], "config file {tmp}/none.toml does not exist"),
    (["scratch", "sample", "--model", "{tmp}/none"], "model folder {tmp}/none does not exist"),
    (["scratch", "sample", "--model", "{tmp}"], "{tmp} is not a from-scratch model (it has no scratch.json)"),
    (["scratch", "sample", "--model", "{run}", "-n", "0"], "--count must be at least 1"),
    (["scratch", "sample", "--model", "{run}", "--steps", "0"], "--steps must be at least 1"),
    (["scratch", "sample", "--model", "{diffusers}"],
     "is a diffusers model, not a from-scratch one; sample it with difflab sample"),
    (["sample", "--model", "{run}"],
     "is a from-scratch teaching model (BasicUNet); sample it with difflab scratch sample"),
])
def test_scratch_errors_are_one_line_with_status_2(capsys, tmp_path, scratch_run, trained_model, args, message):
    def fill(text):
        return text.replace("{tmp}", str(tmp_path)).replace("{run}", str(scratch_run)).replace(
            "{diffusers}", str(trained_model))

    args = [fill(a) for a in args]
    if args[:2] == ["scratch", "train"]:
        args += ["--out", str(tmp_path / "run"), "--steps", "1"]
    code, err = run_cli(capsys, *args)
    assert code == 2
    assert err.startswith("difflab: error: ") and fill(message) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # nothing was written for a refused run


def test_damaged_scratch_weights_are_reported(capsys, scratch_run, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(scratch_run / "model", broken)
    (broken / "basic_unet.safetensors").write_bytes(b"not safetensors")
    code, err = run_cli(capsys, "scratch", "sample", "--model", broken, "--out", tmp_path / "x.png")
    assert code == 2 and f"cannot load the weights in {broken / 'basic_unet.safetensors'}" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x.png").exists()
