"""Textual inversion, trained: the one trainer learning only the new token's rows of tiny Stable Diffusion
components; learned_embeds.safetensors that plain diffusers loads with difflab's images; checkpoints that hold
only the rows; an interrupted run resumed to the same rows; one-line errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import tiny_sd
from difflab.cli import main
from difflab.config import textual_inversion_defaults
from difflab.models.embeddings import EMBEDDING_FILE
from difflab.storage.folder import load_model
from difflab.training import textual_inversion as ti
from difflab.training.run_folder import MetricsLog
from test_dreambooth import star
from test_embeddings import difflab_images, diffusers_images

TOKEN = "<star>"


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return tiny_sd.build(tmp_path_factory.mktemp("sd") / "sd", "text")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stars")
    for i in range(3):
        star(turn=0.2 * i).save(folder / f"star_{i}.png")
    return folder


def args(sd, images, out, *extra) -> list[str]:
    return ["-q", "textual-inversion", "--model", str(sd), "--data", str(images), "--token", TOKEN, "--init-word", "a",
            "--out", str(out), "--steps", "4", "--sample-every", "0", "--sample-steps", "2", "--sample-count", "2",
            "--checkpoint-every", "2", "--log-every", "1", "--precision", "no", "--lr", "0.05", *extra]


@pytest.fixture(scope="module")
def run(sd, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("ti") / "run"
    assert main(args(sd, images, out, "--num-vectors", "2")) == 0
    return out


def test_only_the_new_rows_learn(sd, run):
    base = load_model(sd)
    learned = load_file(str(run / "model" / EMBEDDING_FILE))
    assert list(learned) == [TOKEN] and learned[TOKEN].shape == (2, tiny_sd.TEXT_WIDTH)
    a = base.prompts.tokenizer.convert_tokens_to_ids("a</w>")
    start = base.prompts.text_encoder.get_input_embeddings().weight[a]
    assert (learned[TOKEN] - start.detach()).abs().amax(dim=1).min() > 1e-3  # both vectors moved from "a"
    trained = load_model(sd)
    trained.load_textual_inversion(run)
    old = base.prompts.text_encoder.get_input_embeddings().weight
    rows = len(base.prompts.tokenizer)  # diffusers' loader resizes the matrix to the tokenizer's length + new tokens
    assert torch.equal(trained.prompts.text_encoder.get_input_embeddings().weight[:rows], old[:rows])
    for name in ("unet", "vae"):  # the rest of the model is the base's: the run saved nothing else
        assert not (run / "model" / name).exists()
    assert sorted(p.name for p in (run / "model").iterdir()) == ["README.md", EMBEDDING_FILE]


def test_checkpoints_hold_only_the_new_rows(run):
    checkpoint = run / "checkpoints" / "step_00000004"
    assert sorted(p.name for p in checkpoint.glob("*.safetensors")) == ["optimizer.safetensors", "rng.safetensors",
                                                                        "trained.safetensors"]
    trained = load_file(str(checkpoint / "trained.safetensors"))
    assert {k: tuple(v.shape) for k, v in trained.items()} == {"rows": (2, tiny_sd.TEXT_WIDTH)}
    optimizer = load_file(str(checkpoint / "optimizer.safetensors"))
    assert all(v.shape == (2, tiny_sd.TEXT_WIDTH) for v in optimizer.values() if v.dim() > 0)
    assert torch.equal(trained["rows"], load_file(str(run / "model" / EMBEDDING_FILE))[TOKEN])


def test_plain_diffusers_loads_it_and_gives_difflabs_images(sd, run):
    prompts = [f"a {TOKEN}", f"{TOKEN} on a hill"]
    model = load_model(sd)
    model.load_textual_inversion(run)
    theirs = diffusers_images(sd, [(str(run / "model"), None)], prompts)
    assert np.abs(theirs - difflab_images(model, prompts)).max() < 1e-5
    card = (run / "model" / "README.md").read_text()
    assert f"`{TOKEN}` (2 vectors, started from `a`)" in card and "load_textual_inversion" in card


def test_the_captions_are_the_templates_with_the_token(sd, images, run):
    config = textual_inversion_defaults()
    config.model.base, config.data.spec = str(sd), str(images)
    config.textual_inversion.token, config.textual_inversion.init_word = TOKEN, "a"
    data = ti.make_data(config, load_model(sd), None)
    assert len(data) == 3 * len(ti.OBJECT_TEMPLATES) and data.captions[0] == f"a photo of a {TOKEN}"
    config.textual_inversion.what = "style"
    data = ti.make_data(config, load_model(sd), None)
    assert set(data.captions) == {t.format(TOKEN) for t in ti.STYLE_TEMPLATES}
    assert [int(r["step"]) for r in MetricsLog(run / "metrics.csv").rows] == [1, 2, 3, 4]


def test_an_interrupted_run_resumes_to_the_same_rows(sd, images, run, tmp_path):
    from difflab.cli import build_parser
    from difflab.cli.textual_inversion import resolve_config

    out = tmp_path / "run"
    config, _ = resolve_config(build_parser().parse_args(args(sd, images, out, "--num-vectors", "2")[1:]))

    def stop_at_2(state):
        if state.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ti.textual_inversion(config, out, after_step=stop_at_2)
    assert not (out / "model").exists()
    assert main(args(sd, images, out, "--num-vectors", "2", "--resume")) == 0
    resumed, whole = (load_file(str(r / "model" / EMBEDDING_FILE))[TOKEN] for r in (out, run))
    assert torch.equal(resumed, whole)
    assert [int(r["step"]) for r in MetricsLog(out / "metrics.csv").rows] == [1, 2, 3, 4]


# ---- bad input: one line, exit 2 ----------------------------------------------------------------------

def bad_input(case: str, sd, images, tmp_path) -> tuple[list[str], str]:
    out = tmp_path / "run"
    empty = tmp_path / "empty"
    empty.mkdir()
    base = args(sd, images, out)
    replaced = {
        "init word of two tokens": (["--init-word", "ab"], "is 2 tokens to this model's tokenizer (a + b</w>)"),
        "token in the tokenizer": (["--token", "b"], "already in the tokenizer"),
        "no images": (["--data", str(empty)], "no images in --data folder"),
        "no vectors": (["--num-vectors", "0"], "--num-vectors must be greater than 0"),
        "token with a space": (["--token", "my thing"], "one word without spaces"),
    }
    if case == "no token":
        i = base.index("--token")
        return base[:i] + base[i + 2:], "give the new token with --token"
    flags, message = replaced[case]
    argv = list(base)
    if flags[0] in argv:
        argv[argv.index(flags[0]) + 1] = flags[1]
    else:
        argv += flags
    return argv, message


@pytest.mark.parametrize("case", ["init word of two tokens", "token in the tokenizer", "no images", "no vectors",
                                  "token with a space", "no token"])
def test_bad_input_is_one_line_and_exit_2(case, sd, images, tmp_path, capsys):
    argv, message = bad_input(case, sd, images, tmp_path)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("difflab: error:") and message in err[0], err


def test_the_rows_learn_as_in_diffusers_script(sd):
    """diffusers' textual_inversion.py gives AdamW the whole embedding table and copies every other row back
    after each step; difflab gives AdamW only the new rows. The new rows, and every output, come out the same."""
    config = textual_inversion_defaults()
    config.model.base = str(sd)
    config.textual_inversion.token, config.textual_inversion.init_word = TOKEN, "a"
    config.textual_inversion.num_vectors = 2
    ours, theirs = load_model(sd), load_model(sd)
    part = ti.NewTokenRows(config, ours)
    ours_opt = torch.optim.AdamW([part.embedding.rows], lr=0.1, weight_decay=1e-2)
    # the script, step by step
    tokenizer, encoder = theirs.prompts.tokenizer, theirs.prompts.text_encoder
    tokens = [TOKEN, f"{TOKEN}_1"]
    tokenizer.add_tokens(tokens)
    encoder.resize_token_embeddings(len(tokenizer))
    ids = tokenizer.convert_tokens_to_ids(tokens)
    table = encoder.get_input_embeddings().weight
    with torch.no_grad():
        table[ids] = table[tokenizer.convert_tokens_to_ids("a</w>")].clone()
    original = table.detach().clone()
    encoder.requires_grad_(False)
    table.requires_grad_(True)
    theirs_opt = torch.optim.AdamW([table], lr=0.1, weight_decay=1e-2)
    keep = torch.ones(len(tokenizer), dtype=torch.bool)
    keep[ids] = False
    prompts = [f"a photo of a {TOKEN} {TOKEN}_1", f"the {TOKEN} {TOKEN}_1 on a hill"]
    batch = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
    for step in range(3):
        for model, optimizer in ((ours, ours_opt), (theirs, theirs_opt)):
            loss = model.prompts.text_encoder(batch)[0].pow(2).mean() * (step + 1)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        with torch.no_grad():  # the script's restore
            table[keep] = original[keep]
    torch.testing.assert_close(part.embedding.rows.detach(), table[ids].detach(), rtol=1e-6, atol=1e-7)
    assert not torch.equal(part.embedding.rows.detach(), original[ids])
    with torch.no_grad():
        torch.testing.assert_close(ours.prompts.text_encoder(batch)[0], theirs.prompts.text_encoder(batch)[0])
