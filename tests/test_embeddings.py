"""Textual inversion, loaded: the files diffusers' `load_textual_inversion` reads give diffusers' images on tiny
Stable Diffusion components; `difflab sample --embedding`, the demo's token list; one-line errors for bad files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import tiny_sd
from difflab.cli import main
from difflab.diffusion.generate import generate
from difflab.diffusion.request import GenerationRequest
from difflab.models.embeddings import expand_tokens, learned_tokens, load_embeddings
from difflab.storage.folder import load_model

WIDTH = tiny_sd.TEXT_WIDTH


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return tiny_sd.build(tmp_path_factory.mktemp("sd") / "sd", "text")


def vectors(count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, WIDTH, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One file of each format diffusers reads."""
    root = tmp_path_factory.mktemp("embeddings")
    (root / "cat").mkdir()
    save_file({"<cat-toy>": vectors(2, 1)}, str(root / "cat" / "learned_embeds.safetensors"))  # diffusers', 2 vectors
    save_file({"emb_params": vectors(3, 2)}, str(root / "birb.safetensors"))  # A1111/civitai
    torch.save({"string_to_param": {"*": vectors(1, 3)}, "name": "<pt-style>", "string_to_token": {"*": 265},
                "step": 100}, root / "style.pt")  # A1111's pickle
    return root


def diffusers_images(sd, loads: list[tuple[str, str | None]], prompts: list[str]) -> np.ndarray:
    from diffusers import StableDiffusionPipeline

    from difflab.diffusion.samplers import scheduler_for

    pipe = StableDiffusionPipeline.from_pretrained(sd)
    pipe.scheduler = scheduler_for("ddim", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for path, token in loads:
        pipe.load_textual_inversion(path, token=token)
    generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    return pipe(prompts, negative_prompt=[""] * len(prompts), guidance_scale=3.0, num_inference_steps=3,
                generator=generators, output_type="np").images


def difflab_images(model, prompts: list[str]) -> np.ndarray:
    images = generate(model, GenerationRequest(len(prompts), sampler="ddim", steps=3, seed=0, prompts=prompts,
                                               cfg_scale=3.0))
    return images.permute(0, 2, 3, 1).numpy()


def test_every_format_gives_diffusers_images(sd, files):
    prompts = ["a <cat-toy> in <birb-style>", "<pt-style> cat"]
    model = load_model(sd)
    tokens = load_embeddings(model, [str(files / "cat"), f"{files / 'birb.safetensors'}:<birb-style>",
                                     str(files / "style.pt")], allow_pickle=True)
    assert tokens == ["<cat-toy>", "<birb-style>", "<pt-style>"]
    theirs = diffusers_images(sd, [(str(files / "cat"), None), (str(files / "birb.safetensors"), "<birb-style>"),
                                   (str(files / "style.pt"), None)], prompts)
    assert np.abs(theirs - difflab_images(model, prompts)).max() < 1e-5
    # the rows are the files' vectors, and a token of several vectors is written out in full
    tokenizer, weight = model.prompts.tokenizer, model.prompts.text_encoder.get_input_embeddings().weight
    ids = tokenizer.convert_tokens_to_ids(["<birb-style>", "<birb-style>_1", "<birb-style>_2"])
    assert torch.equal(weight[ids].detach(), vectors(3, 2))
    assert expand_tokens(["<birb-style>!"], tokenizer) == ["<birb-style> <birb-style>_1 <birb-style>_2!"]
    assert learned_tokens(tokenizer) == ["<cat-toy>", "<birb-style>", "<pt-style>"]


def test_the_embedding_is_what_draws(sd, files, tmp_path):
    other = tmp_path / "other.safetensors"
    save_file({"<cat-toy>": vectors(2, 99)}, str(other))
    a, b = load_model(sd), load_model(sd)
    a.load_textual_inversion(files / "cat")
    b.load_textual_inversion(other)
    assert np.abs(difflab_images(a, ["a <cat-toy>"]) - difflab_images(b, ["a <cat-toy>"])).max() > 1e-3


def test_an_a1111_file_is_named_by_its_file_name(sd, files):
    model = load_model(sd)
    before = torch.random.get_rng_state()
    assert model.load_textual_inversion(files / "birb.safetensors")[0] == "birb"
    # the new rows are set, not drawn: loading leaves the global generator as it was (no mean resizing)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_sample_takes_repeated_embeddings_and_records_them(sd, files, tmp_path):
    from PIL import Image

    out = tmp_path / "grid.png"
    assert main(["-q", "sample", "--model", str(sd), "--embedding", str(files / "cat"), "--embedding",
                 f"{files / 'birb.safetensors'}:<birb-style>", "--prompt", "a <cat-toy> in <birb-style>", "-n", "1",
                 "--sampler", "ddim", "--steps", "3", "--cfg-scale", "3", "--precision", "no", "--out", str(out),
                 "--out-dir", str(tmp_path / "each")]) == 0
    model = load_model(sd)
    load_embeddings(model, [str(files / "cat"), f"{files / 'birb.safetensors'}:<birb-style>"])
    expected = difflab_images(model, ["a <cat-toy> in <birb-style>"])[0]
    png = Image.open(tmp_path / "each" / "000000.png")
    assert np.abs(np.asarray(png.convert("RGB")) / 255 - expected).max() <= 1 / 255 + 1e-6
    assert "birb.safetensors:<birb-style>" in str(png.text)


def test_the_demo_lists_the_loaded_tokens(sd, files):
    from difflab.app import build_demo

    demo = build_demo(sd, embeddings=[str(files / "cat")])
    text = [getattr(block, "value", "") for block in demo.blocks.values()
            if getattr(block, "elem_id", None) == "embedding-tokens"]
    assert text and "`<cat-toy>`" in text[0] and "_1" not in text[0]


# ---- bad input: one line, exit 2 -----------------------------------------------------------------------

def bad_file(case: str, tmp_path, files) -> tuple[list[str], str]:
    path = tmp_path / "e.safetensors"
    if case == "wrong width":
        save_file({"<x>": torch.zeros(1, 768)}, str(path))
        message = "768 wide and this model's text encoder takes 16"
    elif case == "empty file":
        path.write_bytes(b"")
        message = "is empty (0 bytes)"
    elif case == "damaged file":
        path.write_bytes(b"not safetensors at all")
        message = "the file is damaged or not safetensors"
    elif case == "token in the tokenizer":
        save_file({"a": torch.zeros(1, WIDTH)}, str(path))  # a letter: a token of the tiny vocabulary
        message = "token 'a' of embedding"
    elif case == "loaded twice":
        return [str(files / "cat"), str(files / "cat")], "token '<cat-toy>' of embedding"
    elif case == "nan":
        save_file({"<x>": torch.tensor([[float("nan")] * WIDTH, [float("inf")] * WIDTH])}, str(path))
        message = f"is damaged: {2 * WIDTH} of its {2 * WIDTH} values are NaN or infinite"
    elif case == "pickle":
        return [str(files / "style.pt")], "pass --allow-pickle"
    elif case == "missing":
        return [str(tmp_path / "nothing.safetensors")], "does not exist"
    elif case == "several tensors":
        save_file({"clip_l": torch.zeros(1, WIDTH), "clip_g": torch.zeros(1, 8)}, str(path))
        message = "an SDXL embedding"
    else:
        raise ValueError(case)
    return [str(path)], message


CASES = ["wrong width", "empty file", "damaged file", "token in the tokenizer", "loaded twice", "nan", "pickle",
         "missing", "several tensors"]


@pytest.mark.parametrize("case", CASES)
def test_a_bad_embedding_is_one_line_and_exit_2(case, sd, files, tmp_path, capsys):
    specs, message = bad_file(case, tmp_path, files)
    argv = ["-q", "sample", "--model", str(sd), "--prompt", "a", "-n", "1", "--steps", "2",
            "--out", str(tmp_path / "x.png")]
    for spec in specs:
        argv += ["--embedding", spec]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("difflab: error:") and message in err[0], err
    assert not (tmp_path / "x.png").exists()
    if case == "nan":
        assert "e.safetensors" in err[0]  # the damaged file is named


def test_a_bad_embedding_leaves_the_model_as_it_was(sd, tmp_path):
    from difflab.errors import ModelError

    path = tmp_path / "wide.safetensors"
    save_file({"<x>": torch.zeros(2, 768)}, str(path))
    model = load_model(sd)
    before = len(model.prompts.tokenizer), model.prompts.text_encoder.get_input_embeddings().weight.shape
    with pytest.raises(ModelError):
        model.load_textual_inversion(path)
    after = len(model.prompts.tokenizer), model.prompts.text_encoder.get_input_embeddings().weight.shape
    assert before == after
