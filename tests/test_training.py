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

    interrupted = Trainer(config, tmp_path / "resumed")
    step = interrupted.train_step

    def stop_at_17():
        if interrupted.state.step == 17:
            raise KeyboardInterrupt
        return step()

    interrupted.train_step = stop_at_17
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    resumed = Trainer(config, tmp_path / "resumed", resume=True)
    assert resumed.state.step == 17  # the interrupt saved a checkpoint
    resumed.fit()
    resumed_weights = weights(tmp_path / "resumed" / "model")
    assert all(torch.equal(x, y) for x, y in zip(weights(straight).values(), resumed_weights.values()))
    assert [r["step"] for r in rows(tmp_path / "resumed")] == [r["step"] for r in rows(tmp_path / "straight")]


def test_gradient_accumulation_of_k_batches_of_b_matches_one_batch_of_k_times_b(tmp_path):
    """accelerate leaves the division by the number of micro-batches to us: accumulating 3 batches of 8
    must give the gradient of one batch of 24 (same images, noise and timesteps), not 3 times it."""
    big = {}

    def gradient(accum, batch_size):
        config = tiny_config(steps=1)
        config.optim.grad_accum, config.optim.batch_size = accum, batch_size
        config.optim.clip_grad = 0.0
        trainer = Trainer(config, tmp_path / f"accum{accum}")
        if not big:
            trainer.stream.batch_size = 24
            big["x0"] = next(trainer.stream)["images"]
            big["noise"], big["t"] = trainer.draw_noise(big["x0"])
        chunks = iter(range(0, 24, batch_size))
        parts = []

        class Slices:
            epochs_done = 0.0

            def __next__(self):
                parts.append(slice(i := next(chunks), i + batch_size))
                return {"images": big["x0"][parts[-1]]}

        trainer.stream = Slices()
        trainer.draw_noise = lambda x0: (big["noise"][parts[-1]], big["t"][parts[-1]])
        grads = {}
        named = trainer.model.denoiser.named_parameters
        trainer.optimizer.step = lambda: grads.update({n: p.grad.clone() for n, p in named()})
        trainer.train_step()
        return grads

    one, three = gradient(1, 24), gradient(3, 8)
    assert all(torch.allclose(one[n], three[n], rtol=1e-4, atol=1e-6) for n in one)


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


def test_budgets_in_epochs_and_minutes(tmp_path):
    config = tiny_config(steps=None, epochs=2.0)
    config.data.split = "test"  # 179 images, 16 per step
    train(config, tmp_path / "epochs")
    assert rows(tmp_path / "epochs")[-1]["step"] == "23"  # ceil(2 * 179 / 16)
    config = tiny_config(steps=None, minutes=0.04)
    train(config, tmp_path / "minutes")
    last = rows(tmp_path / "minutes")[-1]
    assert 2.4 <= float(last["seconds"]) < 4.0 and int(last["step"]) > 5


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
