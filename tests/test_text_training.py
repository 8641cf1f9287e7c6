"""Training a text-to-image latent model from scratch: the VAE stage, the tokenizer and text encoder,
the cross-attention UNet, through the one trainer; what it saves; its bad inputs."""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import tiny_sd
from difflab.config import TrainConfig
from difflab.diffusion.generate import generate
from difflab.diffusion.request import GenerationRequest
from difflab.errors import ConfigError, DataError, ModelError, RunFolderError
from difflab.storage.folder import load_model
from difflab.training.text_batches import CachedLatents, CaptionTokens
from difflab.training.trainer import train


def text_config(steps: int = 4, vae_steps: int = 6, data: str = "shapes:n=96") -> TrainConfig:
    config = TrainConfig()
    config.data.spec = data
    config.data.image_size = 16
    config.model.conditioning = "text"
    config.model.preset = "tiny"
    config.optim.batch_size = 8
    config.optim.precision = "no"
    config.vae.steps = vae_steps
    config.vae.batch_size = 8
    config.run.steps = steps
    config.run.sample_every = 0
    config.run.checkpoint_every = 0
    config.run.sample_count = 4
    config.run.sample_steps = 2
    config.run.log_every = 2
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("text") / "run"
    train(text_config(), out)
    return out


def test_a_text_run_trains_each_component_and_saves_a_stable_diffusion_folder(trained):
    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer

    model_dir = trained / "model"
    index = json.loads((model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    tokenizer = CLIPTokenizer.from_pretrained(str(trained / "tokenizer"))  # plain transformers
    assert tokenizer("a red circle").input_ids[1:-1] == CLIPTokenizer.from_pretrained(
        str(model_dir / "tokenizer"))("a red circle").input_ids[1:-1]
    vae_rows = (trained / "vae" / "metrics.csv").read_text().splitlines()
    assert vae_rows[0].startswith("step,") and "psnr" in vae_rows[0]
    assert (trained / "vae" / "samples" / "reconstructions.png").is_file()
    vae = AutoencoderKL.from_pretrained(trained / "vae" / "model")
    assert vae.config.scaling_factor != 1.0  # set from the data
    info = json.loads((model_dir / "difflab.json").read_text())
    assert info["training"]["text_encoder_trained"] is True
    assert info["training"]["vae_psnr"] > 0 and info["training"]["vae"] == "trained here (6 steps)"
    card = (model_dir / "README.md").read_text()
    assert "reconstruction PSNR" in card and "StableDiffusionPipeline.from_pretrained" in card


def test_the_card_gives_the_steps_the_vae_stage_made_not_those_asked():
    """--vae-minutes can end the stage before --vae-steps: the card says what was trained."""
    from difflab.data import open_dataset
    from difflab.training.autoencoder import VaeReport
    from difflab.training.text_model import TextModelParts

    config = text_config(vae_steps=2000)
    parts = TextModelParts(model=None, train_text_encoder=True, vae_report=VaeReport(psnr=21.8, steps=1721))
    rows = parts.training_rows(config, open_dataset("shapes:n=20"))
    assert rows["vae"] == "trained here (1721 steps)" and rows["vae_psnr"] == 21.8


def test_the_scaling_factor_gives_latents_of_unit_spread(trained):
    from difflab.data import open_dataset

    model = load_model(trained)
    data = open_dataset("shapes:n=96", 16, 3)
    images = data.batch(torch.arange(len(data)))["images"]
    with torch.no_grad():
        latents = model.codec.vae.encode(images).latent_dist.mean * model.codec.scaling_factor
    assert latents.std().item() == pytest.approx(1.0, abs=0.05)


def test_plain_diffusers_gives_the_trained_models_images(trained):
    from diffusers import StableDiffusionPipeline

    from difflab.diffusion.samplers import scheduler_for

    prompts = ["a small red circle at the top left on a white background", "a large blue square in the centre"]
    pipe = StableDiffusionPipeline.from_pretrained(trained / "model")
    pipe.scheduler = scheduler_for("ddim", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    theirs = pipe(prompts, negative_prompt=["", ""], guidance_scale=3.0, num_inference_steps=3, generator=generators,
                  output_type="np").images
    ours = generate(load_model(trained), GenerationRequest(2, sampler="ddim", steps=3, seed=0, prompts=prompts,
                                                           cfg_scale=3.0))
    ours = ours.permute(0, 2, 3, 1).numpy()
    assert np.abs(theirs - ours).max() < 1e-5
    assert ours.std() > 0.01


def test_captions_are_dropped_to_the_empty_prompt_at_the_set_chance(trained):
    model = load_model(trained)
    captions = ["a red circle"] * 400
    empty = model.prompts.tokenizer([""], padding="max_length", max_length=model.prompts.max_tokens,
                                    return_tensors="pt").input_ids[0]
    for chance, low, high in ((0.0, 0, 0), (0.25, 70, 130), (1.0, 400, 400)):
        ids = CaptionTokens(model.prompts, chance)(captions, torch.Generator().manual_seed(0))
        dropped = int((ids == empty).all(dim=1).sum())
        assert low <= dropped <= high


def test_cached_latents_are_the_vaes_posterior_of_each_image_and_its_mirror(trained):
    from difflab.data import open_dataset

    model = load_model(trained)
    data = open_dataset("shapes:n=12", 16, 3)
    cache = CachedLatents(data, model.codec, flip=True, device="cpu")
    index = torch.tensor([3, 7])
    flips = torch.tensor([False, True])
    batch = cache.batch(index, flips)
    images = data.batch(index, flips)["images"]
    with torch.no_grad():
        posterior = model.codec.vae.encode(images).latent_dist
    torch.testing.assert_close(batch["latent_mean"], posterior.mean, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batch["latent_std"], posterior.std, atol=1e-5, rtol=1e-4)
    assert batch["captions"] == data.batch(index, flips)["captions"]  # mirrored captions say right for left


def test_a_dataset_that_repeats_its_images_is_encoded_once_per_image(trained):
    """Textual inversion pairs each image with every caption template: the cache encodes each image once
    (at 512 px on a CPU each repeat is minutes) and gives every copy its latents."""
    from difflab.data import open_dataset
    from difflab.data.dataset import ImageDataset

    model = load_model(trained)
    four = open_dataset("shapes:n=4", 16, 3)
    repeated = ImageDataset(four.images.repeat_interleave(5, dim=0), source="repeated",
                            captions=[f"caption {i}" for i in range(20)])
    encoded = []
    encode = model.codec.vae.encode
    model.codec.vae.encode = lambda images: encoded.append(len(images)) or encode(images)
    cache = CachedLatents(repeated, model.codec, flip=True, device="cpu")
    assert sum(encoded) == 2 * 4  # four images and their mirrors, not twenty and twenty
    alone = CachedLatents(four, model.codec, flip=True, device="cpu")
    assert torch.equal(cache.mean, alone.mean.repeat_interleave(5, dim=0))
    assert torch.equal(cache.flipped[1], alone.flipped[1].repeat_interleave(5, dim=0))
    assert cache.batch(torch.tensor([7]))["captions"] == ["caption 7"]


def test_training_without_the_cache_sees_the_same_latents(tmp_path):
    cached, fresh = text_config(steps=4), text_config(steps=4)
    fresh.data.cache_latents = False
    train(cached, tmp_path / "a")
    train(fresh, tmp_path / "b")

    def losses(run):
        return [float(r.split(",")[2]) for r in (run / "metrics.csv").read_text().splitlines()[1:]]

    # equal up to float rounding: the cache encodes 256 images a pass, training 8
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), rel=2e-3)


def test_a_finished_vae_stage_is_reused_when_the_run_resumes(trained, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = (run / "vae" / "model" / "diffusion_pytorch_model.safetensors").read_bytes()
    config = text_config(steps=6)
    train(config, run, resume=True)
    assert (run / "vae" / "model" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    steps = [int(r.split(",")[0]) for r in (run / "metrics.csv").read_text().splitlines()[1:]]
    assert steps[-1] == 6


def test_a_run_stopped_in_its_vae_stage_resumes_there(tmp_path):
    config = text_config(steps=2, vae_steps=4)
    config.run.checkpoint_every = 2
    from difflab.training import autoencoder

    calls = {"n": 0}
    original = autoencoder.VaeStage.train_step

    def interrupted(self, images):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, images)

    autoencoder.VaeStage.train_step = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            train(config, tmp_path / "run")
    finally:
        autoencoder.VaeStage.train_step = original
    assert (tmp_path / "run" / "vae" / "checkpoints").is_dir()
    train(config, tmp_path / "run", resume=True)
    import csv

    rows = list(csv.DictReader((tmp_path / "run" / "vae" / "metrics.csv").open()))
    steps = [int(r["step"]) for r in rows if r["loss"]]
    assert steps == [2, 4]  # logged once each: the rows after the checkpoint were dropped
    assert rows[-1]["psnr_eval"]  # the stage finished


def one_second_steps():
    """A clock that advances one second per reading: each training step takes one second exactly."""
    ticks = itertools.count()
    return lambda: float(next(ticks))


def test_minutes_bound_a_text_run_with_its_vae_stage_taking_its_share(tmp_path):
    from difflab.config import VAE_SHARE, VAE_STEPS, load_config

    config = text_config(data="shapes:n=48")
    config.vae.steps, config.run.steps, config.run.minutes = None, None, 0.5  # 30 one-second steps in all
    train(config, tmp_path / "run", clock=one_second_steps())
    saved = load_config(tmp_path / "run" / "config.toml", TrainConfig)
    # the share, written into the re-runnable config
    assert saved.vae.minutes == pytest.approx(VAE_SHARE * 0.5) and saved.vae.steps == VAE_STEPS
    vae_steps = math.ceil(VAE_SHARE * 30)
    training = json.loads((tmp_path / "run" / "model" / "difflab.json").read_text())["training"]
    assert training["vae_steps"] == vae_steps and training["steps"] == 30 - vae_steps  # the UNet had the rest
    assert training["vae_minutes"] == round(vae_steps / 60, 2)
    assert training["minutes"] == round((30 - vae_steps) / 60, 2)
    vae_rows = [r for r in csv.DictReader((tmp_path / "run" / "vae" / "metrics.csv").open()) if r["seconds"]]
    assert int(vae_rows[-1]["step"]) == vae_steps and float(vae_rows[-1]["seconds"]) == vae_steps


def test_vae_steps_or_minutes_given_replace_the_share_and_minutes_still_bound_the_run(tmp_path):
    config = text_config(vae_steps=3, data="shapes:n=48")
    config.run.steps, config.run.minutes = None, 0.25  # 15 one-second steps in all
    train(config, tmp_path / "run", clock=one_second_steps())
    training = json.loads((tmp_path / "run" / "model" / "difflab.json").read_text())["training"]
    assert training["vae_steps"] == 3 and training["steps"] == 12
    config.vae.steps, config.vae.minutes = None, 0.25
    with pytest.raises(ConfigError, match=r"--vae-minutes 0.25 leaves nothing of --minutes 0.25 for the UNet"):
        train(config, tmp_path / "other")


def test_a_new_latent_text_model_draws_its_timesteps_shifted_and_other_runs_uniformly(trained):
    from difflab.config import TEXT_TIMESTEP_SHIFT
    from difflab.training.settings import resolve_timestep_shift

    info = json.loads((trained / "model" / "difflab.json").read_text())
    assert info["training"]["timestep_shift"] == TEXT_TIMESTEP_SHIFT != 1  # the default, recorded
    pixel, fine_tune, unconditional, chosen = text_config(), text_config(), TrainConfig(), text_config()
    pixel.model.vae = "none"
    fine_tune.model.base = str(trained)
    chosen.optim.timestep_shift = 1.5
    assert [resolve_timestep_shift(c).optim.timestep_shift for c in (pixel, fine_tune, unconditional, chosen)] == [
        1.0, 1.0, 1.0, 1.5]


@pytest.mark.parametrize("preset, independent", [("small", True), ("medium", False)])
def test_the_small_presets_text_encoder_reads_each_word_apart_from_the_words_before_it(preset, independent, tmp_path):
    """`small` has no transformer layers: a word's output is its embedding at its place whatever precedes
    it, so "green triangle" reaches the UNet as "green" and "triangle" (what lets a pair never seen be
    drawn); a layered encoder (`medium`) mixes each word with those before it."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from difflab.models.text_presets import text_preset

    config = CLIPTextConfig(**text_preset(preset).text_config(vocab_size=50, max_tokens=8, bos=0, eos=1))
    encoder = CLIPTextModel(config).eval()
    encoder.save_pretrained(tmp_path)  # what the saved model holds, loaded back by plain transformers
    encoder = CLIPTextModel.from_pretrained(tmp_path).eval()
    green, red, triangle = 5, 6, 7
    with torch.no_grad():
        a = encoder(torch.tensor([[0, green, triangle, 1]]))[0][0]
        b = encoder(torch.tensor([[0, red, triangle, 1]]))[0][0]
    assert not torch.allclose(a[1], b[1])  # the colours differ
    assert torch.allclose(a[2], b[2]) == independent  # "triangle" after either colour


def test_detail_weights_lift_a_small_objects_pixels_above_its_background():
    from difflab.training.autoencoder import detail_weights

    images = torch.ones(2, 3, 16, 16)  # white
    images[0, :, 2:5, 2:5] = torch.tensor([0.7, -0.7, -0.7]).view(3, 1, 1)  # a small red square on the first
    weights = detail_weights(images, 2.0)
    assert weights.shape == (2, 1, 16, 16)
    assert torch.allclose(weights.mean(dim=(1, 2, 3)), torch.ones(2))  # the loss keeps its scale
    assert weights[0, 0, 3, 3] > 5 * weights[0, 0, 10, 10]  # the object's pixels against the background's
    assert torch.allclose(weights[1], torch.ones(1, 16, 16))  # a plain image: plain MSE
    assert torch.allclose(detail_weights(images, 0.0), torch.ones(2, 1, 16, 16))


def test_the_vae_stage_weighs_its_reconstruction_loss_by_detail(monkeypatch, tmp_path):
    from difflab.training import autoencoder

    strengths = []
    original = autoencoder.detail_weights
    monkeypatch.setattr(autoencoder, "detail_weights", lambda images, s: strengths.append(s) or original(images, s))
    config = text_config(steps=1, vae_steps=2)
    config.vae.detail_weight = 3.5
    train(config, tmp_path / "run")
    assert strengths == [3.5, 3.5]


def test_a_given_text_encoder_and_vae_stay_frozen(tmp_path):
    from safetensors.torch import load_file

    base = tiny_sd.build(tmp_path / "sd")
    config = text_config(steps=3, data="shapes:n=48")
    config.model.vae = config.model.text_encoder = str(base)
    train(config, tmp_path / "run")
    assert not (tmp_path / "run" / "vae").exists() and not (tmp_path / "run" / "tokenizer").exists()
    for part in ("text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        given, saved = load_file(base / part), load_file(tmp_path / "run" / "model" / part)
        assert all(torch.equal(given[k], saved[k]) for k in given)
    model = load_model(tmp_path / "run")
    assert model.unet.config.cross_attention_dim == tiny_sd.TEXT_WIDTH


def test_captions_longer_than_the_tokenizer_are_counted_in_one_warning(tmp_path, caplog):
    base = tiny_sd.build(tmp_path / "sd")  # letters are tokens: 24 tokens hold about 20 letters
    config = text_config(steps=1, data="shapes:n=32")
    config.model.text_encoder = str(base)
    with caplog.at_level(logging.WARNING, logger="difflab"):
        train(config, tmp_path / "run")
    warnings = [r.getMessage() for r in caplog.records if "longer than the tokenizer" in r.getMessage()]
    assert len(warnings) == 1
    assert re.match(r"^(\d+) of \1 captions are longer than the tokenizer's 24 tokens", warnings[0])


def test_resuming_with_another_tokenizer_is_refused(trained, tmp_path):
    import shutil

    from difflab.models.tokenizer import train_tokenizer

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    shutil.rmtree(run / "tokenizer")
    train_tokenizer(["a green star", "a blue moon"], run / "tokenizer", model_max_length=32)
    with pytest.raises(RunFolderError, match="another tokenizer"):
        train(text_config(steps=6), run, resume=True)


def test_text_conditioning_needs_captions(tmp_path):
    config = text_config(data="digits")
    with pytest.raises(DataError, match=r"^--conditioning text needs captions, and digits has none"):
        train(config, tmp_path / "run")


def test_a_caption_template_gives_labelled_data_captions(tmp_path):
    config = text_config(steps=1, vae_steps=1, data="digits")
    config.data.caption_template = "a digit {label}"
    train(config, tmp_path / "run")
    vocabulary = json.loads((tmp_path / "run" / "tokenizer" / "vocab.json").read_text())
    assert "digit</w>" in vocabulary


def test_an_image_size_the_vae_does_not_divide_is_refused(tmp_path):
    config = text_config()
    config.data.image_size = 15
    with pytest.raises(ModelError, match=r"^image size 15 is not a multiple of 2, .* use --image-size 14 or 16$"):
        train(config, tmp_path / "run")


def test_a_vae_without_a_usable_scaling_factor_is_refused(tmp_path):
    base = tiny_sd.build(tmp_path / "sd")
    config_file = base / "vae" / "config.json"
    vae_config = json.loads(config_file.read_text())
    vae_config["scaling_factor"] = 0.0
    config_file.write_text(json.dumps(vae_config))
    config = text_config()
    config.model.vae = str(base)
    with pytest.raises(ModelError, match=r"has no usable latent scaling factor"):
        train(config, tmp_path / "run")


def test_a_vae_too_coarse_for_the_unet_is_refused(tmp_path):
    config = text_config()
    config.data.image_size = 4
    config.model.vae = str(tiny_sd.build(tmp_path / "sd", "upscale"))  # ×4: 1×1 latents; the tiny UNet halves once
    config.model.text_encoder = config.model.vae
    with pytest.raises(ModelError, match=r"makes 1×1 latents of 4 px images, .* use --image-size 8$"):
        train(config, tmp_path / "run")


def test_the_command_says_text_conditioning_needs_captions_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "difflab", "train", "--data", "digits", "--conditioning", "text",
                             "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "needs captions" in result.stderr


def test_a_pixel_space_text_model_saves_and_loads_with_its_text_encoder(tmp_path):
    config = text_config(steps=2)
    config.model.vae = "none"
    model_dir = train(config, tmp_path / "run")
    assert not (tmp_path / "run" / "vae").exists()  # no VAE stage
    model = load_model(model_dir)
    assert model.codec is None and model.prompts is not None
    assert model.unet.config.in_channels == 3 and model.unet.config.sample_size == 16
    prompts = ["a small red circle at the top left on a white background"] * 2
    images = generate(model, GenerationRequest(2, steps=2, prompts=prompts))
    again = generate(load_model(model_dir), GenerationRequest(2, steps=2, prompts=prompts))
    assert images.shape == (2, 3, 16, 16) and torch.equal(images, again)
    assert not torch.equal(images, generate(model, GenerationRequest(2, steps=2, prompts=["a large blue square"] * 2)))
    from difflab.cli.train import output_kind

    kind = output_kind(config, model_dir)  # what the command prints it saved: no diffusers pipeline takes it
    assert "pixel-space" in kind and "StableDiffusionPipeline" not in kind


def test_measured_adherence_is_written_into_the_models_card(trained, tmp_path):
    import shutil

    from difflab.metrics.prompt_adherence import record_evaluation

    folder = tmp_path / "model"
    shutil.copytree(trained / "model", folder)
    result = {"n": 10, "frechet_distance": 12.5, "frechet_floor": 1.25, "sampler": "ddim", "steps": 5, "cfg_scale": 7.5,
              "adherence": {"seen": {"n": 5, "colour": 1.0, "shape": 0.8, "position": 0.6},
                            "held_out": {"n": 5, "colour": 0.4, "shape": 0.2, "position": 0.0}},
              "vae_ceiling": {"colour": 0.9, "shape": 0.7, "position": 1.0, "all": 0.6}}
    record_evaluation(folder, result)
    record_evaluation(folder, result)  # again: the rows are replaced, not added twice
    card = (folder / "README.md").read_text()
    assert card.count("| prompt adherence, seen combinations | colour 100.0%, shape 80.0%, position 60.0%") == 1
    assert "| prompt adherence, held-out combinations | colour 40.0%" in card
    assert "12.500 (real-data floor 1.250, n=10)" in card
    assert "| the VAE's reconstructions of real images (a ceiling) | colour 90.0%, shape 70.0%, position 100.0%" in card
    info = json.loads((folder / "difflab.json").read_text())
    assert info["evaluation"]["prompt adherence, seen combinations"].startswith("colour 100.0%")
    assert load_model(folder).info.evaluation == info["evaluation"]


def test_a_text_model_of_labelled_data_is_asked_for_each_class_by_its_caption(tmp_path, monkeypatch):
    from difflab.metrics import classifier
    from difflab.metrics.evaluate import Evaluator

    monkeypatch.setattr(classifier, "MIN_STEPS", 20)
    config = text_config(steps=2, vae_steps=2, data="digits")
    config.data.caption_template = "a digit {label}"
    model = load_model(train(config, tmp_path / "run"))
    assert model.info.training.caption_template == "a digit {label}"
    asked = []
    import difflab.metrics.evaluate as evaluate

    real_generate = evaluate.generate

    def spy(model, request, **kw):
        asked.append(request)
        return real_generate(model, request, **kw)

    monkeypatch.setattr(evaluate, "generate", spy)
    evaluator = Evaluator.for_data("digits", 16, 3)
    result = evaluator(model, 20, sampler="ddim", steps=2, cfg_scale=None, caption_template="a digit {label}")
    assert asked[0].prompts[:3] == ["a digit 0", "a digit 1", "a digit 2"] and asked[0].class_labels is None
    assert asked[0].cfg_scale == 7.5
    assert 0 <= result["class_accuracy"] <= 1 and len(result["class_accuracy_per_class"]) == 10

    # the VAE's ceiling: the floor's real images through the VAE, measured as generated ones are
    two_step_vae = evaluator.vae_ceiling(model, 20)

    class LosesNothing:
        encode = decode = staticmethod(lambda x: x)

    model.codec = LosesNothing()
    perfect = evaluator.vae_ceiling(model, 20)
    real = evaluator.real_batch(20)
    read = evaluator.classifier.features_and_predictions(real["images"])[1]
    assert perfect["frechet_distance"] == evaluator.floor(20)
    assert perfect["class_accuracy"] == round((read == real["labels"]).float().mean().item(), 4)
    assert two_step_vae["frechet_distance"] > perfect["frechet_distance"]  # a VAE trained 2 steps loses the digits


def test_the_clip_score_is_clips_own_image_text_similarity(tiny_clip):
    from transformers import CLIPModel, CLIPTokenizer

    from difflab.metrics.clip_score import clip_score
    from difflab.models.clip import load_clip

    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    prompts = ["a red disc", "blue box", "tree"]
    model, tokenizer = CLIPModel.from_pretrained(tiny_clip), CLIPTokenizer.from_pretrained(tiny_clip)
    tokens = tokenizer(prompts, padding="max_length", max_length=16, return_tensors="pt")
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        out = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                    pixel_values=((images + 1) / 2 - mean) / std)
    cosines = out.logits_per_image.diagonal() / model.logit_scale.exp()
    expected = (cosines.clamp(min=0) * 100).mean().item()
    assert clip_score(load_clip(str(tiny_clip)), images, prompts) == pytest.approx(expected, abs=1e-3)


def test_every_generation_mode_runs_on_a_trained_text_model(trained):
    from difflab.diffusion.guidance import color_guidance

    model = load_model(trained)
    prompt = "a large red circle in the centre on a white background"
    plain = generate(model, GenerationRequest(2, sampler="ddim", steps=4, prompts=prompt,
                                              negative_prompt="a black background"))
    photo = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1))
    img2img = generate(model, GenerationRequest(2, sampler="ddim", steps=4, prompts=prompt, image=photo, strength=0.25))
    mask = torch.zeros(1, 16, 16)
    mask[:, :8] = 1  # repaint the top half
    inpainted = generate(model, GenerationRequest(2, sampler="ddim", steps=4, prompts=prompt, image=photo, mask=mask))
    guided = generate(model, GenerationRequest(2, sampler="ddim", steps=4, prompts=prompt,
                                               guidance=[color_guidance((0.0, 0.0, 1.0), scale=2e3)]))
    for images in (plain, img2img, inpainted, guided):
        assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    # each mode uses its input (their equality to diffusers' pipelines is tested in test_stable_diffusion.py)
    other = 1 - photo
    assert not torch.allclose(img2img, plain, atol=1e-3)
    assert not torch.allclose(img2img, generate(model, GenerationRequest(2, sampler="ddim", steps=4, prompts=prompt,
                                                                         image=other, strength=0.25)), atol=1e-3)
    assert not torch.allclose(inpainted, generate(model, GenerationRequest(2, sampler="ddim", steps=4, prompts=prompt,
                                                                           image=other, mask=mask)), atol=1e-3)
    assert guided[:, 2].mean() > plain[:, 2].mean()  # bluer


def test_a_quick_preset_model_samples_with_its_gentler_guidance_and_others_with_the_plain_default(tmp_path, trained):
    from difflab.images import png_settings
    from difflab.models.text_presets import QUICK_GUIDANCE
    from difflab.storage.folder import load_model

    config = text_config(steps=1, vae_steps=1)
    config.model.preset = "quick"
    quick = train(config, tmp_path / "quick")
    assert json.loads((quick / "difflab.json").read_text())["guidance"] == QUICK_GUIDANCE
    model = load_model(quick)
    assert model.default_cfg_scale == 3.0 and model.default_guidance["cfg_rescale"] == 0.7
    grid = png_settings(next((tmp_path / "quick" / "samples").glob("step_*.png")))
    assert grid["cfg_scale"] == 3.0 and grid["cfg_rescale"] == 0.7  # the run's own grid samples with it too
    plain = load_model(trained / "model")  # the tiny preset: the kind's plain 7.5
    assert plain.default_guidance == {} and plain.default_cfg_scale == 7.5
