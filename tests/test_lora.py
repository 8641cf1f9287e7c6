"""LoRA adapters: made through peft, saved in the diffusers LoRA format, applied to difflab models
with weights and combined; the same images as plain diffusers' `load_lora_weights`; one-line errors."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import tiny_sd
from difflab.cli import main
from difflab.diffusion.generate import generate
from difflab.diffusion.request import GenerationRequest
from difflab.diffusion.samplers import scheduler_for
from difflab.models import lora as adapters
from difflab.storage import lora
from difflab.storage.folder import load_model

PROMPTS = ["a red circle", "a blue square"]
SIZE = dict(height=16, width=16)
RANK_A, ALPHA_A = 2, 3.0  # adapter A: UNet and text encoder, scaled by 1.5
RANK_B, ALPHA_B = 3, 3.0  # adapter B: UNet only, scaled by 1


def randomize(parameters, seed: int) -> None:
    """Adapters start as a no-op (B = 0); these get random non-zero weights, as if trained."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in parameters:
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny SD folder; LoRA A (UNet + text encoder) in a run folder; LoRA B (UNet) in a plain folder."""
    root = tmp_path_factory.mktemp("lora")
    base = tiny_sd.build(root / "base", "text")
    model = load_model(base)
    randomize(adapters.add_lora(model, RANK_A, ALPHA_A, text_encoder=True), 1)
    run = root / "run-a"
    run.mkdir()
    (run / "config.toml").write_text("# a run folder\n")
    lora.save_lora(model, run / "model")
    model = load_model(base)
    randomize(adapters.add_lora(model, RANK_B, ALPHA_B), 2)
    lora.save_lora(model, root / "lora-b")
    return {"base": base, "a": run, "b": root / "lora-b", "root": root}


def ours(model, sampler: str = "dpm++2m", seed: int = 3, steps: int = 4) -> np.ndarray:
    images = generate(model, GenerationRequest(len(PROMPTS), sampler=sampler, steps=steps, seed=seed, prompts=PROMPTS,
                                               **SIZE))
    return images.permute(0, 2, 3, 1).numpy()


def diffusers_pipeline(base, sampler: str = "dpm++2m"):
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(base)
    pipe.scheduler = scheduler_for(sampler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def theirs(pipe, seed: int = 3, steps: int = 4, **call) -> np.ndarray:
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(PROMPTS))]
    return pipe(PROMPTS, num_inference_steps=steps, generator=generators, output_type="np", **SIZE, **call).images


def assert_same(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    assert np.abs(a - b).max() < 1e-5, np.abs(a - b).max()
    assert a.std() > 0.01


def weights_file(folder):
    return folder / "model" / lora.LORA_WEIGHTS if (folder / "model").is_dir() else folder / lora.LORA_WEIGHTS


# ---- adapters and the file ---------------------------------------------------------------------------

def test_add_lora_makes_only_the_adapters_trainable(files):
    model = load_model(files["base"])
    trainable = adapters.add_lora(model, rank=4, text_encoder=True)
    names = {n for network in (model.unet, model.prompts.text_encoder) for n, p in network.named_parameters()
             if p.requires_grad}
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert not any(p.requires_grad for p in model.codec.vae.parameters())
    # Every attention projection of the UNet and of the text encoder, and nothing else, is adapted.
    for network, targets, count in ((model.unet, adapters.UNET_TARGETS, 4 * 2 * 4),
                                    (model.prompts.text_encoder, adapters.TEXT_ENCODER_TARGETS, 2 * 4)):
        adapted = {n.rsplit(".lora_", 1)[0] for n, p in network.named_parameters() if p.requires_grad}
        assert adapted == {n for n, _ in network.named_modules() if n.endswith(targets)} and len(adapted) == count
    assert sum(p.numel() for p in trainable) == adapters.lora_summary(model)["parameters"]
    assert adapters.lora_summary(model)["targets"] == {"unet": ["to_k", "to_out.0", "to_q", "to_v"],
                                                   "text_encoder": ["k_proj", "out_proj", "q_proj", "v_proj"]}
    # Adapters start as the base model (B = 0), and a gradient reaches them only.
    x, t = torch.randn(1, 4, 8, 8), torch.tensor(10)
    text = model.prompts.encode(["a"])
    before = {n: p.detach().clone() for n, p in model.unet.named_parameters() if not p.requires_grad}
    plain = load_model(files["base"])
    from difflab.models.conditioning import Conditioning

    with torch.no_grad():
        assert torch.equal(model.denoiser(x, t, Conditioning(text=text)), plain.denoiser(x, t, Conditioning(text=text)))
    model.denoiser(x, t, Conditioning(text=text)).square().mean().backward()
    unet_adapters = [p for n, p in model.unet.named_parameters() if ".lora_" in n]
    assert all(p.grad is not None for p in unet_adapters)  # every UNet adapter gets a gradient
    assert any(p.grad.abs().sum() > 0 for p in unet_adapters)
    assert all(p.grad is None for n, p in model.unet.named_parameters() if n in before)
    # Without text_encoder=True the text encoder is left alone (and frozen); a rank must be a whole number ≥ 1.
    unet_only = load_model(files["base"])
    assert adapters.add_lora(unet_only, rank=2) and set(adapters.adapted_networks(unet_only)) == {"unet"}
    assert not any(p.requires_grad for p in unet_only.prompts.text_encoder.parameters())
    with pytest.raises(lora.ConfigError, match="rank must be a whole number of at least 1"):
        adapters.add_lora(load_model(files["base"]), rank=0)


def test_the_file_is_diffusers_lora_format_with_rank_and_alpha(files):
    from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE

    from difflab.storage import hub

    assert lora.LORA_WEIGHTS == LORA_WEIGHT_NAME_SAFE == hub.LORA_WEIGHTS  # what diffusers and difflab push look for
    path = weights_file(files["a"])
    tensors = load_file(str(path))
    assert tensors and all(k.startswith(("unet.", "text_encoder.text_model.")) and "lora" in k for k in tensors)
    assert any(k.startswith("text_encoder.") for k in tensors)
    with safe_open(str(path), "pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    assert metadata["unet.r"] == RANK_A and metadata["unet.lora_alpha"] == ALPHA_A
    assert metadata["text_encoder.r"] == RANK_A and set(metadata["text_encoder.target_modules"]) == set(
        adapters.TEXT_ENCODER_TARGETS)
    assert not any(k.startswith("text_encoder.") for k in load_file(str(weights_file(files["b"]))))
    # What is applied is what was saved, to the bit.
    model = load_model(files["base"])
    name = lora.apply_lora(model, files["a"])
    again = adapters.lora_state_dicts(model, name)
    saved = {f"{part}.{k}": v for part, layers in again.items() for k, v in layers.items()}
    assert saved.keys() == tensors.keys() and all(torch.equal(saved[k], tensors[k]) for k in tensors)


# ---- (a) plain diffusers gives difflab's images ----------------------------------------------------

def test_diffusers_load_lora_weights_with_a_scale_gives_difflabs_images(files):
    model = load_model(files["base"])
    lora.apply_lora(model, files["a"], 0.6)
    pipe = diffusers_pipeline(files["base"])
    pipe.load_lora_weights(str(files["a"] / "model"))
    assert_same(ours(model), theirs(pipe, cross_attention_kwargs={"scale": 0.6}))


def test_diffusers_set_adapters_gives_difflabs_images_with_every_sampler(files):
    model = load_model(files["base"])
    lora.apply_lora(model, weights_file(files["a"]), 1.3)  # the file itself
    pipe = diffusers_pipeline(files["base"], "euler-a")
    pipe.load_lora_weights(str(weights_file(files["a"])), adapter_name="a")
    pipe.set_adapters("a", 1.3)
    assert_same(ours(model, "euler-a", seed=5), theirs(pipe, seed=5))


# ---- (b) weight 0 is the base model ----------------------------------------------------------------

def test_weight_zero_is_the_base_model_and_one_changes_it(files):
    base = ours(load_model(files["base"]))
    model = load_model(files["base"])
    name = lora.apply_lora(model, files["a"], 0.0)
    assert adapters.adapter_weights(model) == {name: 0.0}
    assert np.abs(ours(model) - base).max() < 1e-6
    lora.set_lora_weights(model, {name: 1.0})
    assert adapters.adapter_weights(model) == {name: 1.0}
    changed = ours(model)
    assert np.abs(changed - base).max() > 0.02
    # The text encoder's adapters act too: the prompt embeddings differ from the base model's.
    plain = load_model(files["base"])
    assert (model.prompts.encode(PROMPTS) - plain.prompts.encode(PROMPTS)).abs().max() > 1e-3


# ---- (c) several adapters combine as peft combines them -------------------------------------------

@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # diffusers' pipeline, given a second adapter
def test_two_adapters_combine_as_peft_does(files):
    model = load_model(files["base"])
    names = lora.apply_loras(model, lora.plan_loras([files["a"], files["b"]], [0.7, 0.4]))
    assert adapters.adapter_weights(model) == dict(zip(names, [0.7, 0.4]))
    pipe = diffusers_pipeline(files["base"])
    pipe.load_lora_weights(str(files["a"] / "model"), adapter_name="a")
    pipe.load_lora_weights(str(files["b"]), adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[0.7, 0.4])
    assert_same(ours(model), theirs(pipe))

    # One projection by hand: W·x + b + Σ weight·(alpha/rank)·B·A·x over the two files.
    layer = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q"
    base = dict(load_model(files["base"]).unet.named_modules())[layer]
    x = torch.randn(3, base.in_features)
    expected = base(x)
    for folder, weight, scaling in ((files["a"], 0.7, ALPHA_A / RANK_A), (files["b"], 0.4, ALPHA_B / RANK_B)):
        tensors = load_file(str(weights_file(folder)))
        down = next(v for k, v in tensors.items() if k.startswith(f"unet.{layer}.") and "down" in k)
        up = next(v for k, v in tensors.items() if k.startswith(f"unet.{layer}.") and "up" in k)
        expected = expected + weight * scaling * (x @ down.T @ up.T)
    with torch.no_grad():
        got = dict(model.unet.named_modules())[layer](x)
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, base(x), atol=1e-3)


def test_a_kohya_file_gives_the_same_images_as_the_diffusers_one(files, tmp_path):
    """kohya's names (lora_unet_…, lora_te_text_model_…, .alpha tensors), as A1111 and ComfyUI use them,
    converted by diffusers' own loader."""
    from diffusers.utils import convert_state_dict_to_kohya, convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    tensors = load_file(str(weights_file(files["a"])))
    peft_names = {**convert_unet_state_dict_to_peft({k: v for k, v in tensors.items() if k.startswith("unet.")}),
                  **convert_state_dict_to_peft({k: v for k, v in tensors.items() if k.startswith("text_encoder.")})}
    kohya = {k.replace("lora_te1_", "lora_te_"): v for k, v in convert_state_dict_to_kohya(peft_names).items()}
    kohya = {k: (torch.tensor(ALPHA_A) if k.endswith(".alpha") else v) for k, v in kohya.items()}
    assert any(k.startswith("lora_te_text_model_") for k in kohya) and any(k.startswith("lora_unet_") for k in kohya)
    save_file(kohya, str(tmp_path / "sks_style_v1.safetensors"))
    expected = load_model(files["base"])
    lora.apply_lora(expected, files["a"], 0.8)
    model = load_model(files["base"])
    lora.apply_lora(model, tmp_path, 0.8)  # a folder whose only .safetensors file is the LoRA
    assert_same(ours(model), ours(expected))


# ---- difflab sample --lora -------------------------------------------------------------------------

def test_sample_with_loras_gives_generates_images(files, tmp_path):
    from difflab.images import png_settings

    out = tmp_path / "each"
    argv = ["sample", "--model", str(files["base"]), "--prompt", PROMPTS[0], "-n", "2", "--steps", "4", "--height",
            "16", "--width", "16", "--seed", "3", "--precision", "no", "--out", str(tmp_path / "grid.png"),
            "--out-dir", str(out)]
    assert main([*argv, "--lora", str(files["a"]), "--lora", str(files["b"]), "--lora-scale", "0.7", "0.4"]) == 0
    model = load_model(files["base"])
    lora.apply_loras(model, lora.plan_loras([files["a"], files["b"]], [0.7, 0.4]))
    expected = generate(model, GenerationRequest(2, steps=4, seed=3, prompts=[PROMPTS[0]] * 2, **SIZE))
    from PIL import Image

    written = np.stack([np.asarray(Image.open(out / f"{3 + i:06d}.png")) for i in range(2)]).astype(np.float32) / 255
    assert np.abs(written - expected.permute(0, 2, 3, 1).numpy()).max() <= 1 / 255 + 1e-6
    settings = png_settings(out / "000003.png")
    assert settings["lora"] == [str(files["a"]), str(files["b"])] and settings["lora_scale"] == [0.7, 0.4]
    # One weight for all LoRAs; weight 0 draws the base model.
    assert main([*argv, "--lora", str(files["a"]), "--lora", str(files["b"]), "--lora-scale", "0"]) == 0
    base = generate(load_model(files["base"]), GenerationRequest(2, steps=4, seed=3, prompts=[PROMPTS[0]] * 2, **SIZE))
    written = np.stack([np.asarray(Image.open(out / f"{3 + i:06d}.png")) for i in range(2)]).astype(np.float32) / 255
    assert np.abs(written - base.permute(0, 2, 3, 1).numpy()).max() <= 1 / 255 + 1e-6


def test_difflab_apply_lora_is_at_the_top_level(files):
    import difflab

    model = difflab.load_model(files["base"])
    name = difflab.apply_lora(model, files["b"], 0.5)
    assert adapters.adapter_weights(model) == pytest.approx({name: 0.5})


# ---- (d) mistakes: one line each, exit status 2, nothing written -----------------------------------

def one_error(capsys, tmp_path, model, *lora_args) -> str:
    out = tmp_path / "out.png"
    code = main(["sample", "--model", str(model), "--prompt", "a", "--steps", "2", "-n", "1", "--out", str(out),
                 *lora_args])
    err = capsys.readouterr().err
    lines = re.findall(r"difflab: error: [^\r\n]*", err)
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert not out.exists()
    return lines[0]


@pytest.fixture(scope="module")
def mistakes(files):
    """A pixel model (no attention layers), a LoRA made for a UNet of other widths, a pickled LoRA, an
    empty folder, and a full UNet's weights file given as a LoRA."""
    import diffusers

    root = files["root"] / "mistakes"
    torch.manual_seed(0)
    for attention in (False, True):  # difflab's CPU presets attend nowhere; diffusers' default mid block does
        unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                     block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                     up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                     add_attention=attention)
        diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler()).save_pretrained(
            root / ("pixel-attention" if attention else "pixel"))
    other = load_model(files["base"])
    other.denoiser.unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 24),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=tiny_sd.TEXT_WIDTH, attention_head_dim=2, norm_num_groups=4)
    randomize(adapters.add_lora(other, 2), 3)
    lora.save_lora(other, root / "other-widths")
    (root / "pickled").mkdir()
    torch.save(load_file(str(weights_file(files["b"]))), root / "pickled" / "pytorch_lora_weights.bin")
    (root / "empty").mkdir()
    tensors = load_file(str(weights_file(files["b"])))  # one layer renamed: a UNet laid out otherwise
    (root / "other-layout").mkdir()
    save_file({k.replace("mid_block.attentions.0.", "mid_block.attentions.7."): v for k, v in tensors.items()},
              str(root / "other-layout" / "pytorch_lora_weights.safetensors"))
    return root


@pytest.mark.parametrize("case, message", [
    ("pixel", "this is a pixel model with no attention layers for a LoRA to adapt; LoRA files adapt text-to-image"),
    ("pixel-attention", "this is a pixel model; LoRA files adapt text-to-image models"),
    ("other-widths", r"does not fit this model \(made for another base model\?\): 32 of its 32 layers do not fit: "
                     r"unet\.down_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn1\.to_\w+ \(24→24 wide in the "
                     r"LoRA, 16→16 in the model\);.*; and 29 more$"),
    ("other-layout", r"8 of its 32 layers do not fit: unet\.mid_block\.attentions\.7\.transformer_blocks\.0\.attn1"
                     r"\.to_\w+ \(not in this model\)"),
    ("empty", "is a folder with no LoRA file .*pytorch_lora_weights.safetensors"),
    ("base", "is a model folder with no LoRA file"),
    ("pickled", r"pytorch_lora_weights.bin is a pickle.*--allow-pickle"),
    ("full-weights", "holds no LoRA weights"),
    ("missing", "LoRA .*nowhere does not exist"),
    ("hub", "someone/no-such-lora is neither a LoRA here nor one that could be fetched from the Hugging Face Hub"),
    ("scales", "--lora-scale gives 2 weights for 1 LoRAs"),
    ("scale-alone", "--lora-scale sets the weights of LoRAs: give them with --lora"),
])
def test_lora_mistakes(capsys, tmp_path, files, mistakes, case, message):
    model, lora_args = files["base"], ["--lora", str(files["b"])]
    if case.startswith("pixel"):
        model = mistakes / case
    elif case in ("other-widths", "other-layout", "empty", "pickled"):
        lora_args = ["--lora", str(mistakes / case)]
    elif case == "base":
        lora_args = ["--lora", str(files["base"])]
    elif case == "full-weights":
        lora_args = ["--lora", str(files["base"] / "unet" / "diffusion_pytorch_model.safetensors")]
    elif case == "hub":  # the tests run with HF_HUB_OFFLINE=1
        lora_args = ["--lora", "someone/no-such-lora"]
    elif case == "missing":
        lora_args = ["--lora", str(tmp_path / "nowhere")]
    elif case == "scales":
        lora_args += ["--lora-scale", "0.5", "0.5"]
    elif case == "scale-alone":
        lora_args = ["--lora-scale", "0.5"]
    assert re.search(message, one_error(capsys, tmp_path, model, *lora_args)), message


def test_a_pickled_lora_loads_with_allow_pickle_and_a_misfit_leaves_the_model_as_it_was(files, mistakes):
    model = load_model(files["base"])
    lora.apply_lora(model, mistakes / "pickled", 0.5, allow_pickle=True)
    expected = load_model(files["base"])
    lora.apply_lora(expected, files["b"], 0.5)
    assert_same(ours(model), ours(expected))

    model = load_model(files["base"])
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    with pytest.raises(lora.ModelError, match="does not fit"):
        lora.apply_lora(model, mistakes / "other-widths")
    assert not hasattr(model.unet, "peft_config") or not model.unet.peft_config
    assert model.unet.state_dict().keys() == before.keys()


# ---- the model card, and difflab push's expectations of it -----------------------------------------

def test_the_card_names_the_base_model_and_push_files_it_under_it(files, tmp_path):
    from difflab.storage.card import lora_card
    from difflab.storage.hub import front_matter, upload_plan

    model = load_model(files["base"])
    randomize(adapters.add_lora(model, RANK_A, ALPHA_A, text_encoder=True), 1)
    folder = tmp_path / "sks-lora"
    card = lora_card(str(folder), "someone/tiny-sd", **adapters.lora_summary(model), instance_prompt='a "sks" circle')
    lora.save_lora(model, folder, card=card)
    metadata, body = front_matter((folder / "README.md").read_text())
    assert metadata["base_model"] == "someone/tiny-sd" and metadata["instance_prompt"] == 'a "sks" circle'
    assert {"lora", "difflab", "text-to-image"} <= set(metadata["tags"])
    assert "| rank | 2 (alpha 3" in body and "`to_q`" in body and "`q_proj`" in body
    plan = upload_plan(folder, "model", repo_id="me/sks-lora")
    assert plan.kind == "lora" and plan.metadata["base_model"] == "someone/tiny-sd" and not plan.notes
    assert set(plan.paths) == {lora.LORA_WEIGHTS, "README.md"}
    assert '--lora "me/sks-lora"' in plan.card and 'load_lora_weights("me/sks-lora"' in plan.card
    assert "# me/sks-lora" in plan.card and str(folder) not in plan.card
    # A base model that is a local folder: named in the text, kept out of the metadata.
    local = lora_card(str(folder), str(files["base"]), **adapters.lora_summary(model))
    assert "base_model" not in front_matter(local)[0] and f"`{files['base']}` (a local folder)" in local


def test_the_cards_diffusers_snippet_gives_difflabs_images(files, tmp_path):
    from difflab.storage.card import lora_card

    model = load_model(files["base"])
    card = lora_card(str(files["b"]), str(files["base"]), rank=RANK_B, alpha=ALPHA_B,
                     targets={"unet": list(adapters.UNET_TARGETS)}, prompt="a red circle", scale=0.8)
    command = re.findall(r"```bash\n(.*?)```", card, re.S)[0]
    assert f'--lora "{files["b"]}" --lora-scale 0.8' in command
    code = re.findall(r"```python\n(.*?)```", card, re.S)[0]
    scope: dict = {}
    exec(code.replace(".images", ".images; images = [__import__('numpy').asarray(i) for i in images]"),
         scope)  # noqa: S102
    lora.apply_lora(model, files["b"], 0.8)
    expected = generate(model, GenerationRequest(4, sampler="dpm++2m", steps=20, seed=0, prompts="a red circle"))
    got = np.stack(scope["images"]).astype(np.float32) / 255
    assert np.abs(expected.permute(0, 2, 3, 1).numpy() - got).max() <= 1 / 255 + 1e-6


def test_a_lora_folder_given_as_the_model_says_to_give_its_base(tmp_path):
    from difflab.errors import ModelError
    from difflab.storage.folder import load_model

    folder = tmp_path / "just-a-lora"
    folder.mkdir()
    (folder / "pytorch_lora_weights.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match=r"holds a LoRA, which adapts a base model: .*--model BASE --lora"):
        load_model(folder)
