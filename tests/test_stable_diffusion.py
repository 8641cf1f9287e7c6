"""The Stable Diffusion family through difflab's one sampler, against diffusers' own pipelines on the
same tiny random components, prompts, seeds, schedulers and inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_sd
from difflab.diffusion.generate import generate
from difflab.diffusion.request import GenerationRequest
from difflab.diffusion.samplers import scheduler_for
from difflab.storage.folder import load_model

SAMPLERS = ("ddim", "dpm++2m", "euler-a")  # euler-a draws noise at every step
PROMPTS = ["a red circle", "a blue square on black"]
NEGATIVE = "green"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    return {kind: tiny_sd.build(root / kind, kind) for kind in ("text", "inpaint", "depth", "upscale")}


def picture(size: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def square_mask(size: int) -> Image.Image:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 255
    return Image.fromarray(mask)


def theirs(folder, pipeline: str, sampler: str, seed: int, **call) -> np.ndarray:
    import diffusers

    pipe = getattr(diffusers, pipeline).from_pretrained(folder)
    pipe.scheduler = scheduler_for(sampler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(PROMPTS))]
    return pipe(prompt=PROMPTS, negative_prompt=[NEGATIVE] * len(PROMPTS), guidance_scale=7.5, generator=generators,
                output_type="np", **call).images


def ours(folder, sampler: str, seed: int, **inputs) -> np.ndarray:
    steps = inputs.pop("num_inference_steps")
    images = generate(load_model(folder), GenerationRequest(len(PROMPTS), sampler=sampler, steps=steps, seed=seed,
                                                            prompts=PROMPTS, negative_prompt=NEGATIVE, cfg_scale=7.5,
                                                            **inputs))
    return images.permute(0, 2, 3, 1).numpy()


def assert_same(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    assert np.abs(a - b).max() < 1e-5, np.abs(a - b).max()
    assert a.std() > 0.01  # real images, not a constant


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_text_to_image_equals_the_pipeline(folders, sampler):
    reference = theirs(folders["text"], "StableDiffusionPipeline", sampler, 3, num_inference_steps=6,
                       height=16, width=24)
    assert_same(ours(folders["text"], sampler, 3, num_inference_steps=6, height=16, width=24), reference)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_img2img_equals_the_pipeline(folders, sampler):
    image = picture(16, 0)
    reference = theirs(folders["text"], "StableDiffusionImg2ImgPipeline", sampler, 5, num_inference_steps=8,
                       image=[image] * 2, strength=0.6)
    assert_same(ours(folders["text"], sampler, 5, num_inference_steps=8, image=image, strength=0.6), reference)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("kind", ["inpaint", "text"])  # a 9-channel UNet; a plain one (known region re-imposed)
@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpainting_equals_the_pipeline(folders, sampler, kind, strength):
    image, mask = picture(16, 1), square_mask(16)
    call = dict(num_inference_steps=6, height=16, width=16, strength=strength)
    reference = theirs(folders[kind], "StableDiffusionInpaintPipeline", sampler, 7, image=[image] * 2,
                       mask_image=[mask] * 2, **call)
    assert_same(ours(folders[kind], sampler, 7, image=image, mask=mask, **call), reference)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_depth_to_image_equals_the_pipeline(folders, sampler):
    image = picture(16, 2)
    depth = torch.linspace(0, 1, 16 * 16).reshape(1, 16, 16)
    reference = theirs(folders["depth"], "StableDiffusionDepth2ImgPipeline", sampler, 9, num_inference_steps=8,
                       image=[image] * 2, depth_map=depth, strength=0.75)
    assert_same(ours(folders["depth"], sampler, 9, num_inference_steps=8, image=image, depth=depth, strength=0.75),
                reference)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_upscaling_equals_the_pipeline(folders, sampler):
    low = picture(8, 3)
    reference = theirs(folders["upscale"], "StableDiffusionUpscalePipeline", sampler, 11, num_inference_steps=6,
                       image=[low] * 2, noise_level=20)
    result = ours(folders["upscale"], sampler, 11, num_inference_steps=6, image=low, noise_level=20)
    assert result.shape == (2, 32, 32, 3)  # ×4
    assert_same(result, reference)


def test_a_folders_safety_checker_runs_like_the_pipelines(tmp_path):
    import diffusers

    folder = tiny_sd.build(tmp_path / "checked", "text", safety=True)
    model = load_model(folder)
    checker = model.safety_checker[0]
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-1.0)  # every image now counts as flagged
    kept = generate(model, GenerationRequest(2, steps=3, prompts="a cat", safety_check=False))
    flagged = generate(model, GenerationRequest(2, steps=3, prompts="a cat"))
    assert kept.std() > 0.01 and flagged.abs().max() == 0  # black
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    pipe.safety_checker.concept_embeds_weights.data.fill_(-1.0)
    pipe.scheduler = scheduler_for("dpm++2m", pipe.scheduler.config)
    reference = pipe(["a cat"] * 2, num_inference_steps=3, output_type="np",
                     generator=[torch.Generator().manual_seed(i) for i in range(2)]).images
    assert np.abs(reference).max() == 0
    assert load_model(folder, safety_checker=False).safety_checker is None


def test_a_saved_text_model_loads_in_plain_diffusers_with_the_same_images(folders, tmp_path):
    import diffusers

    from difflab.storage.card import model_card
    from difflab.storage.folder import save_model

    model = load_model(folders["text"])
    saved = save_model(model, tmp_path / "saved", model_card(model, str(tmp_path / "saved")))
    card = (saved / "README.md").read_text()
    assert "pipeline_tag: text-to-image" in card and "StableDiffusionPipeline.from_pretrained" in card
    assert "difflab sample --model" in card and "(difflab.json)" not in card
    assert (saved / "difflab.json").is_file() and (saved / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    ours = generate(load_model(saved), GenerationRequest(2, sampler="dpm++2m", steps=5, seed=4, prompts=PROMPTS,
                                                         negative_prompt=NEGATIVE))
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(saved)
    pipe.scheduler = scheduler_for("dpm++2m", pipe.scheduler.config)
    reference = pipe(PROMPTS, negative_prompt=[NEGATIVE] * 2, num_inference_steps=5, output_type="np",
                     generator=[torch.Generator().manual_seed(4 + i) for i in range(2)]).images
    assert_same(ours.permute(0, 2, 3, 1).numpy(), reference)


def test_the_cards_diffusers_snippet_gives_difflabs_images(folders, tmp_path):
    import re

    from difflab.storage.card import model_card

    model = load_model(folders["text"])
    code = re.findall(r"```python\n(.*?)```", model_card(model, str(folders["text"])), re.S)[0]
    scope: dict = {}
    exec(code.replace(".images", ".images; images = [__import__('numpy').asarray(i) for i in images]"),
         scope)  # noqa: S102
    ours = generate(model, GenerationRequest(4, sampler="dpm++2m", steps=20, seed=0, prompts="a red circle",
                                             negative_prompt="blurry"))
    theirs_uint8 = np.stack(scope["images"]).astype(np.float32) / 255
    assert np.abs(ours.permute(0, 2, 3, 1).numpy() - theirs_uint8).max() <= 1 / 255 + 1e-6


def test_colour_guidance_moves_decoded_latent_samples_toward_the_colour(folders):
    from difflab.diffusion.guidance import color_guidance

    model = load_model(folders["text"])
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    kwargs = dict(sampler="ddim", steps=6, seed=0, prompts="a circle", cfg_scale=1.0)
    plain = generate(model, GenerationRequest(2, **kwargs))
    # A random tiny VAE's decoder barely depends on its latents (its Jacobian is ~1e-3 of a trained
    # one's), hence the large scale; the gradient still has to pass through the decoder to act.
    for mode in ("fast", "full"):
        guided = generate(model, GenerationRequest(2, guidance=[color_guidance((1.0, 0.0, 0.0), scale=2e5)],
                                                   guidance_mode=mode, **kwargs))
        before, after = (plain - red).abs().mean().item(), (guided - red).abs().mean().item()
        assert after < before - 0.01, (mode, before, after)
        assert guided[:, 0].mean() > plain[:, 0].mean() + 0.03 and guided[:, 1].mean() < plain[:, 1].mean() - 0.03


def test_guidance_windows_count_the_steps_a_partial_run_takes(folders):
    """img2img at strength 0.5 runs the last half of the steps: a term acting on the first half of the
    run must act there, not on the (skipped) first half of the schedule."""
    from difflab.diffusion.guidance import custom_guidance

    calls = []

    def loss(x0):
        calls.append(1)
        return x0.mean() * 0

    term = custom_guidance(loss, 1.0, window=(0.0, 0.5))
    generate(load_model(folders["text"]), GenerationRequest(1, sampler="ddim", steps=8, prompts="a",
                                                            image=picture(16, 0), strength=0.5, guidance=[term]))
    assert len(calls) == 2  # half of the 4 steps run


def test_a_hub_pipeline_is_fetched_without_its_duplicate_weights(monkeypatch, tmp_path):
    """Online users give Hub ids: a pipeline repo's components are fetched, not its fp16 copies or
    single-file checkpoints; a bare model repo is fetched whole (no network here: the Hub calls are
    recorded)."""
    import fnmatch

    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    from difflab.storage.folder import resolve_model_folder

    fetched = {}

    def snapshot_download(repo_id, **patterns):
        fetched[repo_id] = patterns
        return str(tmp_path)

    def hf_hub_download(repo_id, filename):
        if repo_id == "someone/ddpm":
            raise EntryNotFoundError("no model_index.json")
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    resolve_model_folder("someone/sd")
    resolve_model_folder("someone/ddpm")

    def taken(repo, path):
        patterns = fetched[repo]
        return (any(fnmatch.fnmatch(path, p) for p in patterns["allow_patterns"])
                and not any(fnmatch.fnmatch(path, p) for p in patterns.get("ignore_patterns", [])))

    for path in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                 "tokenizer/vocab.json", "tokenizer/merges.txt", "text_encoder/model.safetensors"):
        assert taken("someone/sd", path), path
    for path in ("v1-5-pruned.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
                 "unet/diffusion_pytorch_model.non_ema.safetensors", "text_encoder/pytorch_model.bin"):
        assert not taken("someone/sd", path), path
    assert taken("someone/ddpm", "diffusion_pytorch_model.safetensors") and taken("someone/ddpm", "config.json")


def test_depth_estimated_by_the_folders_model_equals_the_pipeline(folders, tmp_path):
    from difflab.models.depth import load_depth_estimator

    image = picture(16, 4)
    reference = theirs(folders["depth"], "StableDiffusionDepth2ImgPipeline", "ddim", 2, num_inference_steps=4,
                       image=[image] * 2, strength=1.0)
    assert_same(ours(folders["depth"], "ddim", 2, num_inference_steps=4, image=image, strength=1.0), reference)
    # The same estimator as a depth-model folder of its own (what --depth-model takes): weights + processor.
    import shutil

    estimator = shutil.copytree(folders["depth"] / "depth_estimator", tmp_path / "dpt")
    shutil.copy(folders["depth"] / "feature_extractor" / "preprocessor_config.json", estimator)
    model = load_model(folders["depth"])
    model.depth_estimator = load_depth_estimator(str(estimator))
    again = generate(model, GenerationRequest(2, sampler="ddim", steps=4, seed=2, prompts=PROMPTS,
                                              negative_prompt=NEGATIVE, image=image, strength=1.0))
    assert_same(again.permute(0, 2, 3, 1).numpy(), reference)


def test_the_command_draws_a_row_per_prompt_and_each_png_says_how_it_was_made(folders, tmp_path):
    from difflab.cli import main
    from difflab.images import png_settings

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a blue square\n\n")
    code = main(["sample", "--model", str(folders["text"]), "--prompt", "a red circle", "--prompt-file", str(prompts),
                 "--negative-prompt", "green", "-n", "2", "--steps", "3", "--seed", "5", "--precision", "no",
                 "--out", str(tmp_path / "grid.png"), "--out-dir", str(tmp_path / "each")])
    assert code == 0
    files = sorted((tmp_path / "each").iterdir())
    assert [png_settings(f)["prompt"] for f in files] == ["a red circle"] * 2 + ["a blue square"] * 2
    with Image.open(files[2]) as image:
        parameters = image.info["parameters"]
        ours_third = np.asarray(image.convert("RGB"))
    assert parameters.splitlines()[:2] == ["a blue square", "Negative prompt: green"]
    assert "Steps: 3, Sampler: dpm++2m, CFG scale: 7.5, Seed: 7, Size: 16x16" in parameters
    alone = generate(load_model(folders["text"]), GenerationRequest(1, steps=3, seed=7, prompts="a blue square",
                                                                    negative_prompt="green"))
    assert np.abs(ours_third / 255 - alone[0].permute(1, 2, 0).numpy()).max() <= 1 / 255  # seed 5 + 2, any batch
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.height > 2 * 64 > grid.height / 3  # two rows of 64-px cells
