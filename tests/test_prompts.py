"""Weighted, blended and long prompts (docs/prompts.md) on tiny Stable Diffusion components: A1111's
syntax read into weights, the embeddings compel makes from them, what reaches the UNet, what the PNG
records, and a one-line error for each kind of bad syntax. The tiny tokenizer's tokens are letters,
and its limit is tiny_sd.PROMPT_TOKENS (24), so a 200-token prompt is 200 letters."""

from __future__ import annotations

import json
import re

import pytest
import torch
from PIL import Image

import tiny_sd
from difflab.cli import main
from difflab.diffusion.generate import generate
from difflab.diffusion.request import GenerationRequest
from difflab.errors import InputError
from difflab.models.denoiser import Denoiser
from difflab.models.prompt_syntax import parse_prompt
from difflab.storage.folder import load_model

LIMIT = tiny_sd.PROMPT_TOKENS


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_sd.build(tmp_path_factory.mktemp("prompts") / "text", "text")


@pytest.fixture(scope="module")
def model(folder):
    return load_model(folder)


def unet_contexts(model, monkeypatch) -> list[torch.Tensor]:
    """What the UNet receives as encoder_hidden_states, call by call."""
    seen, forward = [], model.unet.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["encoder_hidden_states"].detach().clone())
        return forward(*args, **kwargs)

    monkeypatch.setattr(model.unet, "forward", spy)
    return seen


@pytest.mark.parametrize("prompt, segments", [
    ("a red ball", [[("a red ball", 1.0)]]),
    ("a (red:1) ball", [[("a red ball", 1.0)]]),
    ("a (red) ball", [[("a ", 1.0), ("red", 1.1), (" ball", 1.0)]]),
    ("a [red] ball", [[("a ", 1.0), ("red", 1 / 1.1), (" ball", 1.0)]]),
    ("a ((red):1.5) ball", [[("a ", 1.0), ("red", 1.1 * 1.5), (" ball", 1.0)]]),
    ("a red BREAK (blue:0.5) sky", [[("a red", 1.0)], [("blue", 0.5), (" sky", 1.0)]]),
    (r"a \(red\) (ball\:x:2)", [[("a (red) ", 1.0), ("ball:x", 2.0)]]),
    ("(style: oil on canvas)", [[("style: oil on canvas", 1.1)]]),
])
def test_a1111_syntax_is_read_into_weighted_pieces(prompt, segments):
    got = parse_prompt(prompt)
    assert [[text for text, _ in s] for s in got] == [[text for text, _ in s] for s in segments]
    assert [w for s in got for _, w in s] == pytest.approx([w for s in segments for _, w in s])


def test_a_plain_prompt_and_a_weight_of_one_give_diffusers_embeddings_and_images(folder, model):
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    theirs = pipe.encode_prompt("a red ball", "cpu", 1, False)[0]
    assert torch.equal(model.prompts.encode(["a red ball"]), theirs)
    assert torch.equal(model.prompts.encode(["a (red:1) ball"]), theirs)
    plain = generate(model, GenerationRequest(2, prompts="a red ball", negative_prompt="blue", steps=2, seed=3))
    weighted = generate(model, GenerationRequest(2, prompts="a (red:1) ball", negative_prompt="(blue:1)", steps=2,
                                                 seed=3))
    assert torch.equal(plain, weighted) and plain.std() > 0.01


def red_positions(model) -> slice:
    ids = model.prompts.tokenizer("a red ball").input_ids
    start = ids.index(model.prompts.tokenizer.convert_tokens_to_ids("r"))
    return slice(start, start + 3)  # r, e, d</w>


def test_a_weight_above_one_moves_its_tokens_away_from_the_empty_prompt(model):
    encode = model.prompts.encode
    plain, up, empty = encode(["a red ball"]), encode(["a (red:1.5) ball"]), encode([""])
    red = red_positions(model)
    assert torch.allclose(up[:, red] - empty[:, red], 1.5 * (plain[:, red] - empty[:, red]), atol=1e-5)
    others = torch.ones(LIMIT, dtype=torch.bool)
    others[red] = False
    assert torch.equal(up[:, others], plain[:, others])  # only the weighted words change
    assert torch.allclose(encode(["a (red) ball"])[:, red] - empty[:, red], 1.1 * (plain[:, red] - empty[:, red]),
                          atol=1e-5)


def test_a_weight_below_one_moves_the_prompt_toward_leaving_the_words_out(model):
    encode = model.prompts.encode
    plain = encode(["a red ball"])
    distances = [float((encode([f"a (red:{w}) ball"]) - plain).norm()) for w in (0.9, 0.5, 0.1)]
    assert 0 < distances[0] < distances[1] < distances[2]
    assert torch.allclose(encode(["a [red] ball"]), encode([f"a (red:{1 / 1.1}) ball"]), atol=1e-6)


def test_a_200_token_prompt_reaches_the_unet_whole_with_the_negative_padded_to_it(model, monkeypatch):
    words = ["abcd", "efgh", "ijkl", "mnop", "qrst"] * 10  # 50 words of 4 letters: 200 tokens
    prompt = " ".join(words)
    assert len(model.prompts.tokenizer(prompt).input_ids) == 202  # with the start and end tokens
    contexts = unet_contexts(model, monkeypatch)
    images = generate(model, GenerationRequest(1, prompts=prompt, negative_prompt="z", steps=2, seed=0))
    both = contexts[0]
    assert both.shape[0] == 2 and both.shape[1] > LIMIT and both.shape[1] % LIMIT == 0
    assert both.shape[1] >= LIMIT * -(-200 // (LIMIT - 2))  # every token in a chunk of its own length
    chunked = model.prompts.encode([prompt])
    assert torch.equal(both[1:], chunked)  # the prompt, whole
    assert torch.equal(both[:1, :LIMIT], model.prompts.encode(["z"]))  # the negative, padded to the prompt's length
    assert torch.equal(both[:1, LIMIT:2 * LIMIT], model.prompts.encode([""]))
    # The last words count: change them and the image changes (a cut prompt would give the same image).
    changed = generate(model, GenerationRequest(1, prompts=" ".join(words[:-2] + ["zzzz", "zzzz"]),
                                                negative_prompt="z", steps=2, seed=0))
    assert not torch.equal(images, changed)


def test_a_request_pads_every_prompt_to_its_longest_so_batching_changes_nothing(model):
    long = " ".join(["abcd"] * 12)
    prompts = ["a red ball", long, "a blue sky"]
    together = generate(model, GenerationRequest(3, prompts=prompts, steps=2, seed=1), batch_size=3)
    apart = generate(model, GenerationRequest(3, prompts=prompts, steps=2, seed=1), batch_size=1)
    assert (together - apart).abs().max() < 1e-5, (together - apart).abs().max()
    alone = generate(model, GenerationRequest(1, prompts=prompts[0], steps=2, seed=1))  # one chunk, not padded to two
    assert (alone[0] - together[0]).abs().max() > 1e-3


def test_break_starts_a_new_chunk(model):
    encode = model.prompts.encode
    broken = encode(["a red BREAK a ball"])
    assert broken.shape[1] == 2 * LIMIT
    assert torch.allclose(broken[:, :LIMIT], encode(["a red"]), atol=1e-6)
    assert torch.allclose(broken[:, LIMIT:], encode(["a ball"]), atol=1e-6)


@pytest.mark.parametrize("weight", [0.25, 0.5])
def test_a_blend_is_the_stated_mix_of_the_two_prompts(model, monkeypatch, weight):
    encode = model.prompts.encode
    contexts = unet_contexts(model, monkeypatch)
    generate(model, GenerationRequest(2, prompts="a mouse", blend=[f"a leopard:{weight}"], steps=1, seed=0))
    expected = (1 - weight) * encode(["a mouse"]) + weight * encode(["a leopard"])
    negative, conditioned = contexts[0].chunk(2)
    assert torch.allclose(conditioned, expected.expand(2, -1, -1), atol=1e-6)
    assert torch.equal(negative, encode([""] * 2))  # the negative is not blended


def test_given_embeddings_are_sampled_as_the_prompt_would_be(model):
    embeds = model.prompts.encode(["a red ball"])
    given = generate(model, GenerationRequest(2, prompt_embeds=embeds,
                                              negative_prompt_embeds=model.prompts.encode(["blue"]), steps=2, seed=4))
    prompted = generate(model, GenerationRequest(2, prompts="a red ball", negative_prompt="blue", steps=2, seed=4))
    assert torch.equal(given, prompted)


@pytest.mark.parametrize("call, message", [
    (dict(prompts="a", prompt_embeds=torch.zeros(1, LIMIT, tiny_sd.TEXT_WIDTH)), "prompts or prompt embeddings"),
    (dict(prompt_embeds=torch.zeros(1, LIMIT, 3)), r"has shape \[1, 24, 3\]"),
    (dict(prompt_embeds=torch.full((1, LIMIT, tiny_sd.TEXT_WIDTH), float("nan"))), "not finite"),
    (dict(prompt_embeds=torch.zeros(1, LIMIT, tiny_sd.TEXT_WIDTH, dtype=torch.long)), "must be a float tensor"),
    (dict(negative_prompt_embeds=torch.zeros(1, LIMIT, tiny_sd.TEXT_WIDTH)), "need prompt embeddings"),
    (dict(prompts="a", blend=[("b", 0.7), ("c", 0.6)]), "add up to 1.3"),
    (dict(prompts="a", blend=[("b", float("nan"))]), "outside"),
])
def test_bad_embeddings_and_blends_from_python_are_one_line_errors(model, call, message):
    with pytest.raises(InputError, match=message) as error:
        generate(model, GenerationRequest(1, steps=1, **call))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "a (red ball"], r"'\(' at character 3 is never closed"),
    (["--prompt", "a red) ball"], r"'\)' at character 6 closes nothing"),
    (["--prompt", "a [red) ball"], r"'\[' at character 3 is closed by '\)'"),
    (["--prompt", "a (red:abc) ball"], "the weight 'abc' .* is not a number"),
    (["--prompt", "a (red:1,5) ball"], "the weight '1,5' .* is not a number"),
    (["--prompt", "a (red:-2) ball"], "must be a finite number, 0 or more"),
    (["--prompt", "a", "--negative-prompt", "(blue"], r"'\(' at character 1 is never closed"),
    (["--prompt", "a", "--blend", "a leopard"], "a blend is PROMPT:WEIGHT"),
    (["--prompt", "a", "--blend", "a leopard:half"], "the blend weight 'half' .* is not a number"),
    (["--prompt", "a", "--blend", "a leopard:1.5"], r"blend weight 1.5 .* is outside \(0, 1\]"),
    (["--prompt", "a", "--blend", "a leopard:0"], r"blend weight 0 .* is outside \(0, 1\]"),
    (["--prompt", "a", "--blend", "a leopard:-0.2"], r"outside \(0, 1\]"),
    (["--prompt", "a", "--blend", "b:0.6", "--blend", "c:0.6"], "add up to 1.2: at most 1"),
    (["--prompt", "a", "--blend", "(b:0.6"], r"'\(' at character 1 is never closed"),
])
def test_bad_prompt_syntax_and_blends_are_one_line_errors(capsys, tmp_path, folder, argv, message):
    out = tmp_path / "out.png"
    code = main(["sample", "--model", str(folder), *argv, "--steps", "1", "-n", "1", "--out", str(out)])
    err = capsys.readouterr().err
    lines = re.findall(r"difflab: error: [^\r\n]*", err)
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert re.search(message, lines[0]), lines[0]
    assert not out.exists()


def test_the_png_records_the_weighted_prompt_and_the_blend(tmp_path, folder):
    prompt, out = "a (red:1.3) [ball] BREAK sky", tmp_path / "o.png"
    code = main(["sample", "--model", str(folder), "--prompt", prompt, "--negative-prompt", "(blue:0.8)",
                 "--blend", "a leopard:0.5", "--steps", "1", "-n", "1", "--out", str(out)])
    assert code == 0
    with Image.open(out) as image:
        parameters, settings = image.info["parameters"], json.loads(image.info["difflab"])
    lines = parameters.split("\n")
    assert lines[0] == prompt and lines[1] == "Negative prompt: (blue:0.8)"
    assert 'Blend: "a leopard:0.5"' in lines[2]
    assert settings["prompt"] == prompt and settings["blend"] == ["a leopard:0.5"]


# --- models whose UNet takes no longer context: the prompt is cut, said in one short line (issue 28) ---

def test_a_model_that_takes_one_chunk_cuts_the_prompt_with_one_short_warning_before_the_progress_bar(
        capsys, tmp_path, folder, monkeypatch):
    monkeypatch.setattr(Denoiser, "takes_long_context", property(lambda self: False))
    monkeypatch.delenv("DIFFLAB_QUIET", raising=False)  # the progress bar shows (an earlier `difflab -q` hides it)
    prompt = "a small red circle at the top left on a white background " * 180  # about 10,000 characters
    code = main(["sample", "--model", str(folder), "--prompt", prompt, "--steps", "2", "-n", "1",
                 "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert code == 0
    warnings = [line for line in re.split(r"[\r\n]", err) if "tokens dropped" in line]
    assert len(warnings) == 1 and len(warnings[0]) < 160, warnings
    line = warnings[0]
    assert line.startswith("difflab: prompt longer than the text encoder's 24 tokens:")  # a line of its own
    dropped = len(model_tokens(folder, prompt)) - 2 - (LIMIT - 2)
    assert f"{dropped} tokens dropped" in line
    shown = re.search(r"from '(.*)'", line)[1]
    assert shown.startswith("…") and shown.endswith("…")  # starts mid-word here (letters are tokens), and goes on
    assert shown.strip("… ").replace(" ", "") in prompt.replace(" ", "")
    assert err.index("tokens dropped") < err.index("sampling (")  # said before the bar starts


def model_tokens(folder, prompt: str) -> list[int]:
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(folder / "tokenizer")(prompt, verbose=False).input_ids


def test_a_model_that_takes_one_chunk_gives_diffusers_images_for_a_long_plain_prompt(folder, model, monkeypatch):
    import diffusers

    monkeypatch.setattr(Denoiser, "takes_long_context", property(lambda self: False))
    prompt = "a small red circle at the top left"
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    theirs = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
    assert model.prompts.length(prompt, long=False) == LIMIT
    assert torch.equal(model.prompts.encode([prompt], long=False), theirs)


# --- training: --sample-prompts are prompts (checked before the run folder exists), captions are text ---

def test_bad_sample_prompts_are_refused_before_the_run_folder_is_made(tmp_path):
    from difflab.config import TrainConfig
    from difflab.training.trainer import train

    config = TrainConfig()
    config.data.spec, config.data.image_size, config.model.conditioning = "shapes:n=8", 16, "text"
    config.run.sample_prompts = "a red circle | a (blue square"
    with pytest.raises(InputError, match=r"'\(' at character 3 is never closed"):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("caption", ["a smile :)", "a (left) [right] \\ dog", "plain words"])
def test_a_caption_escaped_is_its_own_text_as_a_prompt(model, caption):
    from difflab.models.prompt_syntax import escape

    assert parse_prompt(escape(caption)) == [[(caption, 1.0)]]
    assert torch.equal(model.prompts.encode([escape(caption)]), model.prompts._encode_plain([caption]))
