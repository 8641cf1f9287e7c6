"""Single-file checkpoints both ways: `difflab export --single-file` writes the original SD layout (and
LoRAs in the kohya format), `--model model.safetensors` loads one through diffusers' from_single_file;
the same images as difflab's folders and as plain diffusers; one-line errors for what cannot be used."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import tiny_sd
from difflab.cli import main
from difflab.diffusion.generate import generate
from difflab.diffusion.request import GenerationRequest
from difflab.diffusion.samplers import scheduler_for
from difflab.errors import ConfigError, ModelError, OutputError
from difflab.models import lora as adapters
from difflab.storage import lora
from difflab.storage.folder import load_model, save_model
from difflab.storage.original_layout import UNET_PREFIX, VAE_PREFIX, pipeline_to_original
from difflab.storage.single_file import CONFIGS_METADATA
from difflab.storage.single_file_export import export_single_file

PROMPTS = ["a red circle", "a blue square"]
SIZE = dict(height=16, width=16)


def randomize(parameters, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in parameters:
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny SD folder (diffusers'), a difflab run of it, its export, a LoRA run and its kohya export."""
    root = tmp_path_factory.mktemp("single-file")
    base = tiny_sd.build(root / "base", "text")
    run = root / "run"
    run.mkdir()
    (run / "config.toml").write_text("# a run folder\n")
    save_model(load_model(base), run / "model", card="# a tiny model\n")
    exported = root / "tiny.safetensors"
    assert main(["export", "--single-file", str(exported), "--model", str(run)]) == 0
    model = load_model(base)
    lora_parameters = adapters.add_lora(model, 2, 3.0, text_encoder=True)  # alpha ≠ rank: a scale of 1.5
    randomize(lora_parameters, 1)
    lora_run = root / "lora-run"
    lora_run.mkdir()
    (lora_run / "config.toml").write_text("# a LoRA run\n")
    lora.save_lora(model, lora_run / "model")
    kohya = root / "kohya" / "lora.safetensors"
    assert main(["export", "--single-file", str(kohya), "--model", str(lora_run)]) == 0
    return {"root": root, "base": base, "run": run, "file": exported, "lora": lora_run, "kohya": kohya}


def ours(model, seed: int = 3, steps: int = 4) -> np.ndarray:
    images = generate(model, GenerationRequest(len(PROMPTS), sampler="dpm++2m", steps=steps, seed=seed,
                                               prompts=PROMPTS, **SIZE))
    return images.permute(0, 2, 3, 1).numpy()


def theirs(pipe, seed: int = 3, steps: int = 4) -> np.ndarray:
    pipe.scheduler = scheduler_for("dpm++2m", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(PROMPTS))]
    return pipe(PROMPTS, num_inference_steps=steps, generator=generators, output_type="np", **SIZE).images


def assert_same(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    assert np.abs(a - b).max() < 1e-5, np.abs(a - b).max()
    assert a.std() > 0.01


def one_error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("difflab: error: ") and err.count("\n") == 1, err
    return err


# ---- export, then load ------------------------------------------------------------------------------

def test_export_then_load_gives_the_same_images(files, tmp_path):
    # The file is the original layout, and carries what difflab needs to load it with nothing else.
    with safe_open(str(files["file"]), "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}
    assert metadata["modelspec.prediction_type"] == "epsilon"
    carried = set(json.loads(metadata[CONFIGS_METADATA]))
    assert {"model_index.json", "unet/config.json", "vae/config.json", "difflab.json"} <= carried
    assert any(name.startswith("tokenizer/") for name in carried)  # a small vocabulary travels too
    model = load_model(files["file"])
    assert model.variant is None and model.info.image_size == load_model(files["run"]).info.image_size
    assert_same(ours(model), ours(load_model(files["run"])))
    from difflab.training.dreambooth import base_training_info  # DreamBooth reads the base model's training

    run_info = json.loads((files["run"] / "model" / "difflab.json").read_text())
    assert model.info.to_json() == load_model(files["run"]).info.to_json()  # what the model is, carried along
    assert base_training_info(str(files["file"])).to_json() == run_info["training"]
    # The same through the command line: the grid sampled from the file is the run's, pixel for pixel.
    grids = []
    for source in (files["file"], files["run"]):
        out = tmp_path / f"{len(grids)}.png"
        assert main(["sample", "--model", str(source), "--prompt", "a cat", "-n", "2", "--steps", "3",
                     "--width", "16", "--height", "16", "--out", str(out)]) == 0
        grids.append(np.asarray(Image.open(out)))
    assert np.array_equal(grids[0], grids[1]) and grids[0].std() > 1


def test_a_half_precision_export_loads_to_nearly_the_same_images(files, tmp_path):
    out = tmp_path / "half.safetensors"
    assert main(["export", "--single-file", str(out), "--model", str(files["run"]), "--half"]) == 0
    assert {t.dtype for t in load_file(str(out)).values()} == {torch.float16}
    assert out.stat().st_size < 0.6 * files["file"].stat().st_size
    half, full = ours(load_model(out)), ours(load_model(files["run"]))
    assert np.abs(half - full).max() < 0.05 and np.abs(half - full).max() > 0  # float16's rounding, no more
    big = tmp_path / "big"
    shutil.copytree(files["run"], big)
    model = load_model(big)
    with torch.no_grad():
        model.unet.conv_out.weight[0, 0, 0, 0] = 1e6  # finite in float32, infinite in float16
    save_model(model, big / "model", card="# big\n")
    with pytest.raises(ModelError, match="beyond float16's range .*without --half"):
        export_single_file(big, tmp_path / "big.safetensors", half=True)
    assert not (tmp_path / "big.safetensors").exists()


def test_difflab_gives_diffusers_from_single_file_images(files):
    import diffusers

    model = load_model(files["file"], config_folder=files["base"])  # the configs of a diffusers folder
    pipe = diffusers.StableDiffusionPipeline.from_single_file(
        str(files["file"]), config=str(files["base"]), local_files_only=True, safety_checker=None,
        requires_safety_checker=False)
    assert_same(ours(model), theirs(pipe))


def test_an_inpainting_model_exports_and_loads_as_one(files, tmp_path):
    folder = tiny_sd.build(tmp_path / "inpaint", "inpaint")
    out = tmp_path / "inpaint.safetensors"
    export_single_file(folder, out)
    model, original = load_model(out), load_model(folder)
    assert model.variant == "inpaint"
    for mine, theirs_ in ((model.unet, original.unet), (model.codec.vae, original.codec.vae),
                          (model.prompts.text_encoder, original.prompts.text_encoder)):
        state, expected = mine.state_dict(), theirs_.state_dict()
        assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)


def test_the_layout_is_stable_diffusions_at_its_shape():
    """An SD-shaped UNet and VAE (four levels of two blocks, SD's block types; narrow) take the names SD
    checkpoints have, and diffusers reads the file as SD 1.x."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(block_out_channels=(32, 64, 64, 64), layers_per_block=2, cross_attention_dim=32,
                                attention_head_dim=2, norm_num_groups=8, sample_size=8,
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = AutoencoderKL(block_out_channels=(8, 16, 16, 16), layers_per_block=2, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                        num_hidden_layers=2, vocab_size=100))
    state = pipeline_to_original(unet, vae, text)
    assert infer_diffusers_model_type(state) == "v1"
    for name in ("input_blocks.3.0.op.weight", "input_blocks.11.0.in_layers.2.weight", "middle_block.1.proj_in.weight",
                 "middle_block.2.emb_layers.1.weight", "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight",
                 "output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight", "time_embed.2.bias", "out.2.weight"):
        assert UNET_PREFIX + name in state, name
    for name in ("encoder.down.0.downsample.conv.weight", "decoder.up.3.upsample.conv.weight",
                 "decoder.up.0.block.2.conv2.weight", "encoder.down.1.block.0.nin_shortcut.weight",
                 "encoder.mid.attn_1.q.weight", "decoder.norm_out.bias"):
        assert VAE_PREFIX + name in state, name
    assert state[VAE_PREFIX + "encoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in state
    assert len(state) == len(unet.state_dict()) + len(vae.state_dict()) + len(text.state_dict())


def test_sd2_text_encoders_take_openclips_layout(tmp_path):
    """A 1024-wide gelu text encoder (SD 2.x's OpenCLIP) is written as OpenCLIP names it, q, k and v in one
    in_proj_weight (what A1111 reads SD 2.x by), and diffusers' from_single_file reads it back unchanged."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = tiny_sd.build(tmp_path / "sd2", "text")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    torch.manual_seed(0)
    pipe.text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=1024, intermediate_size=32, num_attention_heads=8,
                                                     num_hidden_layers=2, vocab_size=60, hidden_act="gelu",
                                                     max_position_embeddings=tiny_sd.PROMPT_TOKENS))
    pipe.unet = diffusers.UNet2DConditionModel.from_config(
        {**pipe.unet.config, "cross_attention_dim": 1024})
    pipe.save_pretrained(folder)
    state = pipeline_to_original(pipe.unet, pipe.vae, pipe.text_encoder)
    prefix = "cond_stage_model.model."
    assert state[prefix + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 1024, 1024)
    assert prefix + "ln_final.weight" in state and prefix + "positional_embedding" in state
    assert not any(k.startswith("cond_stage_model.transformer.") for k in state)
    save_file(state, str(tmp_path / "sd2.safetensors"))
    loaded = load_model(tmp_path / "sd2.safetensors", config_folder=folder).prompts.text_encoder.state_dict()
    expected = pipe.text_encoder.state_dict()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in loaded)


def test_built_in_configs_are_sd15_and_sd21_and_chosen_by_layout(tmp_path):
    """difflab's own configs build networks of SD 1.5's and SD 2.1's published sizes, whose original
    layout diffusers reads as v1 / v2 (and as inpainting with a 9-channel UNet)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from difflab.storage.single_file import built_in_configs

    sizes = {"sd15": (859_520_964, 83_653_863, 123_060_480), "sd21": (865_910_724, 83_653_863, None)}
    for family, kind in (("sd15", "v1"), ("sd21", "v2")):
        from importlib import resources

        folder = resources.files("difflab.storage") / "sd_configs" / family
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
            text = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        counts = [sum(p.numel() for p in n.parameters()) for n in (unet, vae, text)]
        assert [c for c, s in zip(counts, sizes[family]) if s] == [s for s in sizes[family] if s], (family, counts)
        from difflab.storage.original_layout import unet_to_original

        shapes = {k: torch.empty(v.shape, device="meta") for k, v in unet_to_original(unet).items()}
        chosen, chosen_family = built_in_configs(tmp_path / "x.safetensors", shapes, {}, tmp_path / family)
        assert chosen_family == family
        if family == "sd21":  # v-prediction at 768 px, unless the file's model spec says epsilon
            assert json.loads((chosen / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == (
                "v_prediction")
            epsilon, _ = built_in_configs(tmp_path / "x.safetensors", shapes, {"modelspec.prediction_type": "epsilon"},
                                          tmp_path / "eps")
            assert json.loads((epsilon / "unet" / "config.json").read_text())["sample_size"] == 64
        inpainting = dict(shapes)
        key = UNET_PREFIX + "input_blocks.0.0.weight"
        inpainting[key] = torch.empty((320, 9, 3, 3), device="meta")
        chosen, _ = built_in_configs(tmp_path / "x.safetensors", inpainting, {}, tmp_path / f"{family}-inpaint")
        assert json.loads((chosen / "model_index.json").read_text())["_class_name"] == "StableDiffusionInpaintPipeline"
        assert json.loads((chosen / "unet" / "config.json").read_text())["in_channels"] == 9
        assert kind in ("v1", "v2")


# ---- pickles ----------------------------------------------------------------------------------------

def test_a_ckpt_loads_only_with_allow_pickle_and_gives_the_same_images(files, tmp_path, capsys):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(files["file"]))}, ckpt)  # as LDM training saved them
    err = one_error(capsys, ["sample", "--model", str(ckpt), "--config-folder", str(files["base"]), "--prompt", "a"])
    assert "is a pickle" in err and "--allow-pickle" in err
    model = load_model(ckpt, allow_pickle=True, config_folder=files["base"])
    assert_same(ours(model), ours(load_model(files["run"])))
    # weights_only=True: a pickle that would run code is refused, naming what it calls.
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hook": shutil.rmtree}, evil)
    with pytest.raises(ModelError, match="was refused: it calls shutil.rmtree"):
        load_model(evil, allow_pickle=True)


# ---- damaged files ----------------------------------------------------------------------------------

def test_nan_weights_are_named(files, tmp_path, capsys):
    state = load_file(str(files["file"]))
    with safe_open(str(files["file"]), "pt") as f:
        metadata = f.metadata()
    name = UNET_PREFIX + "out.2.weight"
    state[name] = state[name].clone()
    state[name][0, 0, 0, 0] = float("nan")
    damaged = tmp_path / "nan.safetensors"
    save_file(state, str(damaged), metadata=metadata)
    err = one_error(capsys, ["sample", "--model", str(damaged), "--prompt", "a", "--steps", "2", "-n", "1",
                             "--out", str(tmp_path / "x.png")])
    assert f"{damaged} is damaged: 1 of the" in err and "NaN" in err
    assert not (tmp_path / "x.png").exists()


def test_a_truncated_file_is_named(files, tmp_path, capsys):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(files["file"].read_bytes()[:-1000])
    err = one_error(capsys, ["sample", "--model", str(truncated), "--prompt", "a"])
    assert f"{truncated} is damaged: it is not a complete safetensors file" in err
    pickled = tmp_path / "truncated.ckpt"
    torch.save({"w": torch.zeros(1000)}, pickled)
    pickled.write_bytes(pickled.read_bytes()[:-500])
    err = one_error(capsys, ["sample", "--model", str(pickled), "--allow-pickle", "--prompt", "a"])
    assert f"cannot read {pickled}" in err and "damaged" in err


# ---- what cannot be loaded --------------------------------------------------------------------------

def test_loading_mistakes(files, tmp_path, capsys):
    plain = tmp_path / "plain.safetensors"  # the tiny layout, without the configs difflab's exports carry
    save_file(load_file(str(files["file"])), str(plain))
    err = one_error(capsys, ["sample", "--model", str(plain), "--prompt", "a"])
    assert "does not have the Stable Diffusion 1.x/2.x layout" in err and "--config-folder" in err
    assert "not a Stable Diffusion checkpoint" in one_error(
        capsys, ["sample", "--model", str(files["kohya"]), "--prompt", "a"])
    assert "is for single-file checkpoints" in one_error(
        capsys, ["sample", "--model", str(files["run"]), "--config-folder", str(files["base"]), "--prompt", "a"])
    assert "is not a folder" in one_error(
        capsys, ["sample", "--model", str(plain), "--config-folder", str(tmp_path / "nowhere"), "--prompt", "a"])
    (tmp_path / "empty").mkdir()
    assert "neither a diffusers Stable Diffusion folder" in one_error(
        capsys, ["sample", "--model", str(plain), "--config-folder", str(tmp_path / "empty"), "--prompt", "a"])
    # No tokenizer anywhere: the message says what to give.
    no_tokenizer = tmp_path / "configs"
    shutil.copytree(files["base"], no_tokenizer, ignore=shutil.ignore_patterns("tokenizer", "*.safetensors"))
    err = one_error(capsys, ["sample", "--model", str(plain), "--config-folder", str(no_tokenizer), "--prompt", "a"])
    assert "needs a CLIP tokenizer" in err and "tokenizer/" in err and "hf download" in err
    (no_tokenizer / "tokenizer").mkdir()  # a tokenizer folder without its vocabulary is not taken for one
    assert "holds no tokenizer vocabulary" in one_error(
        capsys, ["sample", "--model", str(plain), "--config-folder", str(no_tokenizer), "--prompt", "a"])
    (no_tokenizer / "tokenizer").rmdir()
    # With it, a folder of configs alone (no weights) is enough.
    shutil.copytree(files["base"] / "tokenizer", no_tokenizer / "tokenizer")
    assert_same(ours(load_model(plain, config_folder=no_tokenizer)), ours(load_model(files["run"])))
    with pytest.raises(ConfigError):
        load_model(files["run"], config_folder=no_tokenizer)


def test_a_tokenizer_in_the_hugging_face_cache_is_found(files, monkeypatch):
    """Without --config-folder, SD 1.x's tokenizer is looked up in the HF cache (never downloaded)."""
    import huggingface_hub

    from difflab.storage.single_file import CACHED_TOKENIZERS, find_tokenizer

    asked = []

    def cache(repo, filename, **kwargs):
        asked.append((repo, filename))
        found = repo == CACHED_TOKENIZERS["sd15"][-1][0] and filename == "tokenizer.json"
        return str(files["base"] / "tokenizer" / "tokenizer.json") if found else None

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", cache)
    tokenizer = find_tokenizer(files["file"], files["root"] / "none", None, "sd15")
    assert tokenizer("ab").input_ids == load_model(files["base"]).prompts.tokenizer("ab").input_ids
    assert asked[0] == ("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer/tokenizer.json")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    with pytest.raises(ModelError, match="hf download stable-diffusion-v1-5/stable-diffusion-v1-5"):
        find_tokenizer(files["file"], files["root"] / "none", None, "sd15")


# ---- LoRA: the kohya format -------------------------------------------------------------------------

def test_the_kohya_lora_loads_in_diffusers_and_gives_the_runs_images(files):
    import diffusers

    tensors = load_file(str(files["kohya"]))
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in tensors)
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in tensors)
    downs = [k for k in tensors if k.endswith(".lora_down.weight")]
    assert downs and all(k.replace(".lora_down.weight", ".lora_up.weight") in tensors for k in downs)
    assert {float(tensors[k.replace(".lora_down.weight", ".alpha")]) for k in downs} == {3.0}
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_q.lora_down.weight" in tensors

    model = load_model(files["base"])
    lora.apply_lora(model, files["lora"])  # the run's own LoRA, in difflab
    expected = ours(model)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(files["base"])
    pipe.load_lora_weights(str(files["kohya"].parent), weight_name=files["kohya"].name)
    assert_same(theirs(pipe), expected)
    assert np.abs(expected - ours(load_model(files["base"]))).max() > 0.02  # the LoRA changes the images
    # difflab applies the kohya file as well (diffusers converts it).
    model = load_model(files["base"])
    lora.apply_lora(model, files["kohya"])
    assert_same(ours(model), expected)


# ---- export mistakes --------------------------------------------------------------------------------

def test_export_refuses_to_overwrite(files, tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"mine")
    err = one_error(capsys, ["export", "--single-file", str(out), "--model", str(files["run"])])
    assert "exists; pass --overwrite" in err and out.read_bytes() == b"mine"
    assert main(["export", "--single-file", str(out), "--model", str(files["run"]), "--overwrite"]) == 0
    assert load_file(str(out)).keys() == load_file(str(files["file"])).keys()
    assert not list(tmp_path.glob(".*partial*"))


def test_export_mistakes(files, tmp_path, capsys):
    import diffusers

    def export(model, out="out.safetensors") -> str:
        return one_error(capsys, ["export", "--single-file", str(tmp_path / out), "--model", str(model)])

    assert "should end in .safetensors" in export(files["run"], "out.ckpt")
    assert "model folder" in export(tmp_path / "nowhere") and "does not exist" in export(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    assert "is neither a text-to-image model folder" in export(tmp_path / "empty")
    pixel = tmp_path / "pixel"
    diffusers.DDPMPipeline(unet=diffusers.UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4,
                                                     down_block_types=("DownBlock2D",) * 2,
                                                     up_block_types=("UpBlock2D",) * 2),
                           scheduler=diffusers.DDPMScheduler()).save_pretrained(pixel)
    assert "is a pixel model" in export(pixel)
    upscaler = tiny_sd.build(tmp_path / "upscale", "upscale")
    capsys.readouterr()  # diffusers' progress bars while the folders were built
    assert "StableDiffusionUpscalePipeline" in export(upscaler)
    pixel_text = tmp_path / "pixel-text"
    (pixel_text / "unet").mkdir(parents=True)
    (pixel_text / "text_encoder").mkdir()
    assert "text model in pixel space" in export(pixel_text)
    (tmp_path / "kohya").mkdir()
    shutil.copy(files["kohya"], tmp_path / "kohya" / lora.LORA_WEIGHTS)
    assert "already in the kohya format" in export(tmp_path / "kohya")
    (tmp_path / "folder.safetensors").mkdir()
    with pytest.raises(OutputError, match="is a folder"):
        export_single_file(files["run"], tmp_path / "folder.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
