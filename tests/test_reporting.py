"""What both training loops report: the stop on a non-finite loss, and what an interrupt keeps."""

from __future__ import annotations

import json

import pytest
import torch

from difflab.config import ScratchConfig
from difflab.errors import TrainingError
from difflab.training.budget import Budget
from difflab.training.reporting import finite_losses
from difflab.training.scratch_trainer import ScratchTrainer
from difflab.training.steps import StepLog, StepStats, TrainState


def test_finite_losses_names_the_first_bad_step_and_statistic():
    losses = [StepStats(torch.tensor(v)) for v in (0.5, float("inf"), float("nan"))]
    with pytest.raises(TrainingError, match=r"^the loss became inf at step 9 and training stopped; do this$"):
        finite_losses(losses, 10, lambda: "do this")
    assert finite_losses(losses[:1], 10, lambda: "unused").tolist() == [0.5]
    norms = [StepStats(torch.tensor(0.5), torch.tensor(1.0)), StepStats(torch.tensor(0.4), torch.tensor(float("nan")))]
    with pytest.raises(TrainingError, match=r"^the gradients' norm became nan at step 4 and"):
        finite_losses(norms, 4, lambda: "do this")


def test_a_metrics_row_covers_the_steps_since_the_last_one():
    readings = iter([0.0, 2.0, 2.0, 3.0, 10.0, 14.0])  # steps of 2 s, 1 s and 4 s
    log = StepLog(Budget(steps=10), images_per_step=8, clock=lambda: next(readings))
    for loss in (0.3, 0.5):
        log.start_step()
        log.end_step(StepStats(torch.tensor(loss)))
    row = log.row(epochs_done=0.123456, lr=0.01, advice=lambda: "unused")
    assert row == {"step": 2, "epoch": 0.1235, "loss": pytest.approx(0.4), "lr": 0.01, "images_per_s": 16 / 3,
                   "seconds": 3.0}
    log.start_step()
    log.end_step(StepStats(torch.tensor(0.1)))
    row = log.row(epochs_done=0.2, lr=0.01, advice=lambda: "unused")
    assert row["step"] == 3 and row["loss"] == pytest.approx(0.1) and row["images_per_s"] == 2.0
    assert log.state == TrainState(step=3, images_seen=24, seconds=7.0) and log.fraction_done(0.2) == 0.3


def scratch_config(steps: int = 10) -> ScratchConfig:
    config = ScratchConfig()
    config.data.spec, config.data.image_size = "digits", 8
    config.optim.batch_size = 8
    config.run.steps, config.run.sample_every, config.run.log_every = steps, 0, 5
    config.run.sample_count, config.run.sample_steps = 2, 2
    return config


def test_the_scratch_trainer_stops_on_a_non_finite_loss(tmp_path):
    trainer = ScratchTrainer(scratch_config(), tmp_path / "run")
    trainer.model.net.register_forward_hook(  # the third step's prediction, hence its loss, is NaN
        lambda module, args, out: out * float("nan") if trainer.state.step == 2 else out)
    with pytest.raises(TrainingError, match=r"the loss became nan at step 3 and training stopped; "
                                            r"lower --lr \(now 0.001\) and run again with --overwrite"):
        trainer.fit()


def test_an_interrupted_scratch_run_keeps_its_model(tmp_path):
    trainer = ScratchTrainer(scratch_config(), tmp_path / "run")

    def stop_at_4(state):
        if state.step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trainer.fit(after_step=stop_at_4)
    info = json.loads((tmp_path / "run" / "model" / "scratch.json").read_text())
    assert info["training"]["steps"] == 4 and (tmp_path / "run" / "model" / "basic_unet.safetensors").is_file()
