"""The one training loop: learning, resuming, accumulation, EMA, budgets and the run folder."""

from __future__ import annotations

import csv
import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from difflab.config import differences
from difflab.errors import RunFolderError
from difflab.training.budget import DEFAULT_STEPS, Budget
from difflab.training.denoiser_batches import MicroBatch
from difflab.training.trainer import Trainer, train


def weights(model_dir):
    return load_file(model_dir / "unet" / "diffusion_pytorch_model.safetensors")


def rows(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_training_lowers_the_loss_and_fills_the_run_folder(tmp_path):
    config = tiny_config(steps=60, sample_every=30, checkpoint_every=20, keep_checkpoints=2)
    model_dir = train(config, tmp_path / "run")
    run = tmp_path / "run"
    losses = [float(r["loss"]) for r in rows(run)]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < 0.75 * losses[0]
    assert {"step", "loss", "lr", "images_per_s", "seconds"} <= set(rows(run)[0])
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_000030.png", "step_000060.png"]
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000040", "step_00000060"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000060"
    assert (run / "loss.png").stat().st_size > 1000 and model_dir == run / "model"


def test_same_config_same_weights(tmp_path):
    a = train(tiny_config(steps=8), tmp_path / "a")
    b = train(tiny_config(steps=8), tmp_path / "b")
    assert all(torch.equal(x, y) for x, y in zip(weights(a).values(), weights(b).values()))


def test_resuming_an_interrupted_run_gives_the_same_weights_as_running_straight_through(tmp_path):
    config = tiny_config(steps=24, checkpoint_every=10)
    straight = train(config, tmp_path / "straight")

    def stop_at_17(state):
        if state.step == 17:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(config, tmp_path / "resumed").fit(after_step=stop_at_17)
    resumed = Trainer(config, tmp_path / "resumed", resume=True)
    assert resumed.state.step == 17  # the interrupt saved a checkpoint
    resumed.fit()
    resumed_weights = weights(tmp_path / "resumed" / "model")
    assert all(torch.equal(x, y) for x, y in zip(weights(straight).values(), resumed_weights.values()))
    assert [r["step"] for r in rows(tmp_path / "resumed")] == [r["step"] for r in rows(tmp_path / "straight")]


def test_gradient_accumulation_of_k_batches_of_b_matches_one_batch_of_k_times_b(tmp_path):
    """accelerate leaves the division by the number of micro-batches to us: accumulating 3 batches of 8
    must give the gradient of one batch of 24 (same images, noise and timesteps), not 3 times it."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(24, 1, 8, 8, generator=generator) * 2 - 1
    noise = torch.randn(images.shape, generator=generator)
    timesteps = torch.randint(0, 1000, (24,), generator=generator)

    def gradient(batch_size):
        config = tiny_config(steps=1)
        config.optim.clip_grad = 0.0
        trainer = Trainer(config, tmp_path / f"batches_of_{batch_size}")
        grads = {}  # after the last micro-batch's backward pass, each parameter holds the accumulated gradient
        for name, p in trainer.model.denoiser.named_parameters():
            p.register_post_accumulate_grad_hook(lambda p, name=name: grads.__setitem__(name, p.grad.clone()))
        parts = [slice(i, i + batch_size) for i in range(0, 24, batch_size)]
        stats = trainer.train_step([MicroBatch(images[s], None, noise[s], timesteps[s]) for s in parts])
        return grads, stats

    (one, one_stats), (three, three_stats) = gradient(24), gradient(8)
    assert len(one) == len(three) > 10
    assert all(torch.allclose(one[n], three[n], rtol=1e-4, atol=1e-6) for n in one)
    assert torch.allclose(one_stats.loss, three_stats.loss) and torch.allclose(one_stats.grad_norm,
                                                                                three_stats.grad_norm)


def test_the_saved_model_holds_the_moving_average(tmp_path):
    trainer = Trainer(tiny_config(steps=10), tmp_path / "run")
    trainer.fit()
    saved = weights(tmp_path / "run" / "model")
    names = [n for n, _ in trainer.model.denoiser.named_parameters()]
    ema = dict(zip(names, trainer.ema.shadow_params))
    raw = dict(trainer.model.denoiser.named_parameters())
    name = "unet.conv_in.weight"
    assert torch.equal(saved["conv_in.weight"], ema[name]) and not torch.equal(saved["conv_in.weight"], raw[name])


@pytest.mark.parametrize("prediction,gamma,precision", [("v", 5.0, "no"), ("x0", 0.0, "no"), ("epsilon", 0.0, "bf16")])
def test_other_targets_weighting_and_precision_train(tmp_path, prediction, gamma, precision):
    config = tiny_config(steps=40)
    config.model.prediction = prediction
    config.optim.min_snr_gamma = gamma
    config.optim.precision = precision
    train(config, tmp_path / "run")
    losses = [float(r["loss"]) for r in rows(tmp_path / "run")]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_a_timestep_shift_draws_training_timesteps_at_higher_noise(tmp_path):
    from difflab.training.losses import shifted_timesteps

    u = torch.linspace(0, 0.999, 1000)
    assert torch.equal(shifted_timesteps(u, 1.0, 1000), (u * 1000).long())  # 1: the uniform draw itself
    shifted = shifted_timesteps(u, 3.0, 1000)
    assert shifted[500] == 750 and shifted.min() == 0 and shifted.max() == 999  # 3: the median moves to 3/4
    assert torch.all(shifted[1:] >= shifted[:-1])
    config = tiny_config(steps=1)
    config.optim.timestep_shift = 3.0
    trainer = Trainer(config, tmp_path / "run")
    _, t = trainer.batches.draw_noise(torch.zeros(4000, 1, 2, 2))
    assert abs(t.float().median().item() - 0.75 * trainer.model.noise_schedule.config.num_train_timesteps) < 30
    assert trainer.model.info.training.timestep_shift == 3.0  # the model card says how it was trained
    trainer.fit()
    assert "timesteps shifted towards high noise by 3.0" in (tmp_path / "run" / "model" / "README.md").read_text()


def test_budgets_in_epochs_and_minutes(tmp_path):
    config = tiny_config(steps=None, epochs=2.0)
    config.data.split = "test"  # 179 images, 16 per step
    train(config, tmp_path / "epochs")
    assert rows(tmp_path / "epochs")[-1]["step"] == "23"  # ceil(2 * 179 / 16)

    ticks = iter(range(10_000))  # a clock on which every reading is 0.5 s after the one before
    config = tiny_config(steps=None, minutes=0.05)
    train(config, tmp_path / "minutes", clock=lambda: next(ticks) * 0.5)
    last = rows(tmp_path / "minutes")[-1]
    assert last["step"] == "6" and float(last["seconds"]) == 3.0  # 0.05 minutes at 0.5 s per step
    assert float(last["images_per_s"]) == 16 / 0.5


def test_a_budget_is_used_by_whichever_limit_comes_first():
    budget = Budget(steps=100, epochs=2.0, seconds=60.0)
    assert budget.fraction(step=10, epochs=0.5, seconds=30.0) == 0.5  # the minutes are furthest along
    assert budget.fraction(step=90, epochs=0.5, seconds=30.0) == 0.9
    assert budget.fraction(step=10, epochs=2.5, seconds=1.0) == 1.0  # never past the end
    assert Budget(seconds=60.0).fraction(step=10_000, epochs=50.0, seconds=59.0) == 59 / 60
    assert Budget.from_config(tiny_config(steps=None).run) == Budget(steps=DEFAULT_STEPS)
    assert Budget.from_config(tiny_config(steps=None, minutes=2.0).run) == Budget(seconds=120.0)


def test_a_run_folder_is_never_silently_reused(tmp_path):
    config = tiny_config(steps=4)
    train(config, tmp_path / "run")
    with pytest.raises(RunFolderError, match="already holds a run; add --resume .* or --overwrite"):
        train(config, tmp_path / "run")
    changed = dataclasses.replace(config, optim=dataclasses.replace(config.optim, batch_size=5))
    with pytest.raises(RunFolderError, match=r"holds a different run \(\[optim\] batch_size = 16 \(saved\) vs 5"):
        train(changed, tmp_path / "run", resume=True)
    train(changed, tmp_path / "run", overwrite=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("precious")
    with pytest.raises(RunFolderError, match="is not empty and is not a difflab run"):
        train(config, tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "thesis.txt").read_text() == "precious"


def test_resume_may_lengthen_a_run(tmp_path):
    train(tiny_config(steps=6), tmp_path / "run")
    train(tiny_config(steps=10), tmp_path / "run", resume=True)
    assert rows(tmp_path / "run")[-1]["step"] == "10"
    assert differences(tiny_config(steps=6), tiny_config(steps=10)) == []


def test_one_process_trains_runs_of_different_precisions(tmp_path):
    """make_accelerator clears accelerate's per-run state (its private `_reset_state`): accelerate
    otherwise refuses a second Accelerator with another precision in the same process."""
    assert Trainer(tiny_config(steps=1), tmp_path / "a").accelerator.mixed_precision == "no"
    config = tiny_config(steps=1)
    config.optim.precision = "bf16"
    second = Trainer(config, tmp_path / "b")
    assert second.accelerator.mixed_precision == "bf16"
    second.fit()
    assert rows(tmp_path / "b")[-1]["step"] == "1"
