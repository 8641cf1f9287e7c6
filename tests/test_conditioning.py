"""Class conditioning through both doors, classifier-free guidance, and their bad inputs."""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import conditional_config, tiny_config
from difflab.cli import main
from difflab.diffusion.generate import generate, model_function
from difflab.diffusion.guidance import classifier_free_guidance
from difflab.diffusion.request import GenerationRequest
from difflab.diffusion.samplers import scheduler_for
from difflab.diffusion.sampling import denoise, initial_noise, run_timesteps, to_unit_range
from difflab.errors import DataError, ModelError
from difflab.models.conditioning import Conditioning
from difflab.seeds import image_generators
from difflab.storage.folder import load_model
from difflab.training.trainer import Trainer, train


@pytest.mark.parametrize("method", ["embedding", "channels"])
def test_both_class_methods_train_save_and_load(tmp_path, method):
    model_dir = train(conditional_config(method, steps=12), tmp_path / "run")
    info = json.loads((model_dir / "difflab.json").read_text())
    assert info["class_names"] == [str(d) for d in range(10)] and info["class_method"] == method
    model = load_model(model_dir)
    assert model.class_names == info["class_names"]
    unet = model.unet.config
    if method == "channels":
        assert unet.in_channels == 1 + 4 and unet.out_channels == 1
        assert (model_dir / "conditioning.safetensors").is_file()
    else:
        assert unet.num_class_embeds == 11 and unet.in_channels == 1  # ten classes and the null class
    labels = torch.tensor([0, 1, 2, 3])
    images = generate(model, GenerationRequest(4, steps=4, class_labels=labels))
    assert images.shape == (4, 1, 8, 8)
    assert not torch.equal(images, generate(model, GenerationRequest(4, steps=4, class_labels=torch.tensor([7, 7, 7,
                                                                                                            7]))))


def test_labels_change_the_prediction_and_the_null_class_is_unconditional(conditional_model):
    model = load_model(conditional_model)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor(500)
    with torch.no_grad():
        one, seven = model.denoiser(x, t, torch.tensor([1, 1])), model.denoiser(x, t, torch.tensor([7, 7]))
        null = model.denoiser(x, t, torch.tensor([10, 10]))
        assert not torch.allclose(one, seven)
        assert torch.equal(null, model.denoiser(x, t))  # no labels means the null class


def test_cfg_scale_one_is_plain_conditional_sampling(conditional_model):
    model = load_model(conditional_model)
    labels = torch.tensor([3, 5, 8])
    ours = generate(model, GenerationRequest(3, sampler="ddim", steps=6, seed=2, class_labels=labels, cfg_scale=1.0))
    generators = image_generators(2, 3)
    noise = initial_noise((3, 1, 8, 8), generators, "cpu")
    with torch.no_grad():
        scheduler = scheduler_for("ddim", model.noise_schedule.config)
        plain = denoise(lambda x, t: model.denoiser(x, t, labels), scheduler,
                        noise, run_timesteps(scheduler, 6), generators=generators)
    assert torch.allclose(ours, to_unit_range(plain), atol=1e-6)


def test_guidance_batches_both_predictions_into_one_pass_correctly(conditional_model):
    denoiser = load_model(conditional_model).denoiser
    calls = []
    denoiser.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    labels, x, t = torch.tensor([2, 4]), torch.randn(2, 1, 8, 8), torch.tensor(300)
    with torch.no_grad():
        null = Conditioning(torch.tensor([10, 10]))
        guided = classifier_free_guidance(denoiser, Conditioning(labels), null, 3.0)(x, t)
        assert calls == [4]  # one forward pass of both halves
        conditional, unconditional = denoiser(x, t, labels), denoiser(x, t, torch.tensor([10, 10]))
    assert torch.allclose(guided, unconditional + 3.0 * (conditional - unconditional), atol=1e-5)


def test_label_dropout_rate(tmp_path):
    config = conditional_config(steps=1)
    config.model.cond_dropout = 0.25
    trainer = Trainer(config, tmp_path / "run")
    labels = trainer.batches.training_labels({"labels": torch.zeros(4000, dtype=torch.long)})
    assert 0.22 < (labels == 10).float().mean().item() < 0.28
    config.model.cond_dropout = 0.0
    never = Trainer(config, tmp_path / "run", overwrite=True)
    assert (never.batches.training_labels({"labels": torch.zeros(100, dtype=torch.long)}) == 0).all()


def test_the_model_card_code_reproduces_difflab_sampling(conditional_model, tmp_path):
    """The plain-diffusers snippet in the card must give difflab's images from the same noise."""
    from diffusers import DPMSolverMultistepScheduler

    for method, model_dir in (("embedding", conditional_model),
                              ("channels", train(conditional_config("channels", steps=6), tmp_path / "ch"))):
        card = (model_dir / "README.md").read_text()
        code = re.findall(r"```python\n(.*?)```", card, re.S)[0]
        torch.manual_seed(0)
        noise = torch.randn(4, 1, 8, 8)
        torch.manual_seed(0)
        scope: dict = {}
        exec(code, scope)  # noqa: S102 - our own generated snippet
        model = load_model(model_dir)
        with torch.no_grad():
            labels = torch.tensor([0, 0, 1, 1])
            null = Conditioning(torch.full_like(labels, model.denoiser.null_class))
            guided = model_function(model, Conditioning(labels), null, 2.0)
            scheduler = DPMSolverMultistepScheduler.from_config(model.noise_schedule.config)
            ours = denoise(guided, scheduler, noise, run_timesteps(scheduler, 20))
        assert torch.allclose(scope["images"], to_unit_range(ours), atol=1e-5), method


def test_class_all_grid_has_a_labelled_row_per_class(capsys, conditional_model, tmp_path):
    from PIL import Image

    code = main(["sample", "--model", str(conditional_model), "--class", "all", "-n", "3", "--steps", "3",
                 "--out", str(tmp_path / "g.png"), "--out-dir", str(tmp_path / "each")])
    assert code == 0
    width, height = Image.open(tmp_path / "g.png").size
    assert height > 9 * 64 and width > 3 * 64  # ten rows of three 64-px cells
    from difflab.images import png_settings

    assert png_settings(tmp_path / "each" / "000029.png")["class"] == "9"
    code = main(["sample", "--model", str(conditional_model), "--class", "3,7", "-n", "2", "--steps", "3",
                 "--out-dir", str(tmp_path / "two"), "--out", str(tmp_path / "two.png")])
    assert code == 0
    assert [png_settings(p)["class"] for p in sorted((tmp_path / "two").iterdir())] == ["3", "3", "7", "7"]


# ---- bad input ------------------------------------------------------------------------------------

def test_unknown_class_and_classes_on_an_unconditional_model(conditional_model, trained_model):
    with pytest.raises(ModelError, match=r"class '12' does not exist: this model has 10 classes, 0-9 \(0, 1, 2"):
        load_model(conditional_model).class_indices("12")
    with pytest.raises(ModelError, match="this model is unconditional; classes need a class-conditional model"):
        load_model(trained_model).class_indices("3")


def test_conditioning_on_unlabelled_data(tmp_path):
    from PIL import Image

    for i in range(3):
        Image.new("L", (8, 8), i * 50).save(tmp_path / f"{i}.png")
    config = conditional_config(steps=1)
    config.data.spec = str(tmp_path)
    with pytest.raises(DataError, match="--conditioning class needs labelled data, and .* has no labels"):
        train(config, tmp_path / "run")


@pytest.mark.parametrize("args,message", [
    (["--class", "12"], "class '12' does not exist: this model has 10 classes"),
    (["--cfg-scale", "-1"], "--cfg-scale must be 0 or more"),
])
def test_cli_class_errors(capsys, conditional_model, tmp_path, args, message):
    code = main(["sample", "--model", str(conditional_model), "--out", str(tmp_path / "x.png"), *args])
    assert code == 2 and message in capsys.readouterr().err


def test_cli_class_on_unconditional_model(capsys, trained_model, tmp_path):
    code = main(["sample", "--model", str(trained_model), "--class", "3", "--out", str(tmp_path / "x.png")])
    assert code == 2 and "this model is unconditional" in capsys.readouterr().err


def test_negative_guidance_in_training_config(capsys, tmp_path):
    code = main(["train", "--sample-cfg-scale", "-2", "--out", str(tmp_path / "r")])
    assert code == 2 and "--sample-cfg-scale must be 0 or more" in capsys.readouterr().err
    config = tiny_config()
    config.model.cond_dropout = 1.0
    with pytest.raises(Exception, match="--cond-dropout must be in"):
        config.validate()
