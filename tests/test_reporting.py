"""What both training loops report: the stop on a non-finite loss, and what an interrupt keeps."""

from __future__ import annotations

import json

import pytest
import torch

from difflab.config import ScratchConfig
from difflab.errors import TrainingError
from difflab.training.reporting import finite_losses
from difflab.training.scratch_trainer import ScratchTrainer


def test_finite_losses_names_the_first_bad_step():
    losses = [torch.tensor(0.5), torch.tensor(float("inf")), torch.tensor(float("nan"))]
    with pytest.raises(TrainingError, match=r"^the loss became inf at step 9 and training stopped; do this$"):
        finite_losses(losses, 10, lambda: "do this")
    assert finite_losses(losses[:1], 10, lambda: "unused").tolist() == [0.5]


def scratch_config(steps: int = 10) -> ScratchConfig:
    config = ScratchConfig()
    config.data.spec, config.data.image_size = "digits", 8
    config.optim.batch_size = 8
    config.run.steps, config.run.sample_every, config.run.log_every = steps, 0, 5
    config.run.sample_count, config.run.sample_steps = 2, 2
    return config


def test_the_scratch_trainer_stops_on_a_non_finite_loss(tmp_path):
    trainer = ScratchTrainer(scratch_config(), tmp_path / "run")
    on_step = trainer.on_step
    trainer.on_step = lambda step, loss: on_step(step, torch.tensor(float("nan")) if step == 3 else loss)
    with pytest.raises(TrainingError, match=r"the loss became nan at step 3 and training stopped; "
                                            r"lower --lr \(now 0.001\) and run again with --overwrite"):
        trainer.fit()


def test_an_interrupted_scratch_run_keeps_its_model(tmp_path):
    trainer = ScratchTrainer(scratch_config(), tmp_path / "run")
    on_step = trainer.on_step

    def stop_at_4(step, loss):
        on_step(step, loss)
        if step == 4:
            raise KeyboardInterrupt

    trainer.on_step = stop_at_4
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    info = json.loads((tmp_path / "run" / "model" / "scratch.json").read_text())
    assert info["training"]["steps"] == 4 and (tmp_path / "run" / "model" / "basic_unet.safetensors").is_file()
