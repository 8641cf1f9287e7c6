"""Loss guidance: colour, CLIP (a tiny CLIPModel built here), image, classifier and custom terms;
fast and full gradients; every sampler and prediction type; windows, cadence, CFG; bad input."""

from __future__ import annotations

import pytest
import torch

from difflab.cli import main
from difflab.config import ModelConfig
from difflab.diffusion.generate import generate, row_labels
from difflab.diffusion.guidance import (
    DEFAULT_COLOR_SCALE,
    GuidanceTerm,
    classifier_guidance,
    clip_guidance,
    color_guidance,
    color_loss,
    custom_guidance,
    image_guidance,
    load_clip,
    parse_color,
    parse_guide,
)
from difflab.diffusion.request import GenerationRequest
from difflab.errors import GuidanceError, ModelError
from difflab.metrics.classifier import EvalClassifier
from difflab.models.build import build_model
from difflab.storage.folder import load_model

WHITE = (1.0, 1.0, 1.0)


def recording(term: GuidanceTerm, log: list) -> GuidanceTerm:
    """`term`, appending each call's mean loss to `log`."""
    inner = term.loss

    def loss(x0):
        value = inner(x0)
        log.append(float(value.detach().mean()))
        return value

    term.loss = loss
    return term


def distance(images: torch.Tensor, rgb=WHITE) -> float:
    """Mean distance of [0, 1] images to a colour, as the colour term measures it."""
    return color_loss(rgb)(images * 2 - 1).mean().item()


@pytest.mark.parametrize("mode", ["fast", "full"])
@pytest.mark.parametrize("sampler", ["dpm++2m", "ddim", "euler", "heun", "ddpm"])
def test_color_guidance_pulls_samples_to_the_colour(trained_model, sampler, mode):
    model = load_model(trained_model)
    plain = generate(model, GenerationRequest(4, sampler=sampler, steps=6, seed=3))
    guided = generate(model, GenerationRequest(4, sampler=sampler, steps=6, seed=3,
                                               guidance=[color_guidance(WHITE, 100)], guidance_mode=mode))
    assert distance(guided) < 0.8 * distance(plain)


@pytest.mark.parametrize("prediction", ["epsilon", "v", "x0"])
def test_every_prediction_type(prediction):
    model = build_model(ModelConfig(preset="tiny", prediction=prediction), 8, 3, "none", seed=0)
    target = (1.0, 0.2, 0.6)
    plain = generate(model, GenerationRequest(3, sampler="ddim", steps=5))
    for mode in ("fast", "full"):
        guided = generate(model, GenerationRequest(3, sampler="ddim", steps=5, guidance=[color_guidance(target, 400)],
                                                   guidance_mode=mode))
        if prediction == "x0" and mode == "full":  # x̂₀ is the network's output: only its own gradient acts
            assert not torch.equal(guided, plain)
        else:
            assert distance(guided, target) < 0.8 * distance(plain, target)


def test_window_and_cadence_choose_the_steps(trained_model):
    model = load_model(trained_model)
    # Steps 0, 2 and 4 of 10; heun calls the model once on its first step and twice on the others.
    for sampler, calls in (("ddim", 3), ("heun", 5)):
        seen = []
        term = custom_guidance(lambda x0, seen=seen: seen.append(1) or x0.mean(), 1.0, window=(0.0, 0.5), every=2)
        generate(model, GenerationRequest(2, sampler=sampler, steps=10, guidance=[term]))
        assert len(seen) == calls
    with pytest.raises(GuidanceError, match="window"):
        color_guidance(WHITE, window=(0.6, 0.2))
    with pytest.raises(GuidanceError, match="cadence"):
        color_guidance(WHITE, every=0)


def test_same_seed_same_image_whatever_the_batch(trained_model, tiny_clip):
    model = load_model(trained_model)
    terms = [color_guidance(WHITE, 20), clip_guidance("a red rose", load_clip(str(tiny_clip)), 20)]
    one_batch = generate(model, GenerationRequest(4, sampler="euler-a", steps=4, guidance=terms), batch_size=4)
    two_batches = generate(model, GenerationRequest(4, sampler="euler-a", steps=4, guidance=terms), batch_size=3)
    torch.testing.assert_close(one_batch, two_batches)


def test_terms_compose_with_each_other_and_with_cfg(conditional_model):
    model = load_model(conditional_model)
    labels = row_labels(3, 2)
    plain = generate(model, GenerationRequest(6, steps=5, class_labels=labels, cfg_scale=2.0))
    white = generate(model, GenerationRequest(6, steps=5, class_labels=labels, cfg_scale=2.0,
                                              guidance=[color_guidance(WHITE, 100)]))
    black = custom_guidance(lambda x0: (x0 + 1).abs().mean((1, 2, 3)), 50)  # pulls the other way, half as hard
    both = generate(model, GenerationRequest(6, steps=5, class_labels=labels, cfg_scale=2.0,
                                             guidance=[color_guidance(WHITE, 100), black]))
    assert distance(white) < 0.8 * distance(plain)
    assert distance(white) < distance(both) < distance(plain)


def test_classifier_guidance_raises_the_class_probability(trained_model):
    model = load_model(trained_model)
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))  # a random linear classifier
    network[1].weight.data *= 10

    def log_p(images):
        with torch.no_grad():
            return torch.log_softmax(network(images * 2 - 1), 1)[:, 7].mean().item()

    plain = generate(model, GenerationRequest(6, steps=6, seed=1))
    for mode in ("fast", "full"):
        guided = generate(model, GenerationRequest(6, steps=6, seed=1, guidance=[classifier_guidance(network, 7, 20)],
                                                   guidance_mode=mode))
        assert log_p(guided) > log_p(plain) + 0.1


def test_clip_guidance_end_to_end(trained_model, tiny_clip):
    model = load_model(trained_model)
    clip = load_clip(str(tiny_clip))
    losses = []
    term = recording(clip_guidance("a red rose", clip, scale=300, cuts=8), losses)
    plain = generate(model, GenerationRequest(4, sampler="ddim", steps=8, seed=5))
    guided = generate(model, GenerationRequest(4, sampler="ddim", steps=8, seed=5, guidance=[term]))
    assert len(losses) == 8 and losses[-1] < losses[0]  # the loss falls over the steps
    score = clip_guidance("a red rose", clip, scale=1, cuts=16).loss
    with torch.random.fork_rng():
        torch.manual_seed(0)
        assert score(guided * 2 - 1).mean() < score(plain * 2 - 1).mean()  # and the result is closer
    reference = torch.zeros(3, 16, 16)
    reference[0, 4:12, 4:12] = 1  # a red square
    closeness = image_guidance(reference, clip, scale=1, cuts=16).loss
    guided = generate(model, GenerationRequest(4, sampler="ddim", steps=8, seed=5, guidance_mode="full",
                                               guidance=[image_guidance(reference, clip, scale=300, cuts=8)]))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        assert closeness(guided * 2 - 1).mean() < closeness(plain * 2 - 1).mean()


def test_parse_color_and_guide(tiny_clip):
    assert parse_color("#55FFAA") == parse_color("55ffaa") == (0x55 / 255, 1.0, 0xAA / 255)
    assert parse_color("red") == (1.0, 0.0, 0.0) and parse_color("#fff") == WHITE
    term = parse_guide("color=#55FFAA:40@0.2-0.8/2")
    assert (term.name, term.scale, term.window, term.every) == ("color", 40.0, (0.2, 0.8), 2)
    assert parse_guide("colour=red").scale == DEFAULT_COLOR_SCALE
    term = parse_guide("clip=a rose: red:8", clip=load_clip(str(tiny_clip)))
    assert (term.name, term.scale) == ("clip", 8.0)
    network = EvalClassifier(1, 3)
    assert parse_guide("classifier=2:3", classifier=network).scale == 3.0


def test_bad_guidance_input(tiny_clip, tmp_path):
    with pytest.raises(GuidanceError, match="unknown guidance term 'sharpness'; choose one of: color, clip"):
        parse_guide("sharpness=9:2")
    with pytest.raises(GuidanceError, match="cannot read the colour '#55FFAX'"):
        parse_guide("color=#55FFAX:40")
    with pytest.raises(GuidanceError, match="cannot read the guidance"):
        parse_guide("color #55FFAA")
    with pytest.raises(GuidanceError, match="clip guidance needs a CLIP model: give --clip-model"):
        parse_guide("clip=a red rose:8")
    with pytest.raises(GuidanceError, match="image guidance needs a CLIP model"):
        parse_guide("image=ref.png:8")
    with pytest.raises(GuidanceError, match="classifier guidance needs a classifier"):
        parse_guide("classifier=3")
    with pytest.raises(GuidanceError, match="no class 'zebra'"):
        parse_guide("classifier=zebra", classifier=EvalClassifier(1, 3))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    for folder in (tmp_path / "nothing", tmp_path / "broken"):
        with pytest.raises(ModelError, match="cannot load a CLIP model from") as caught:
            load_clip(str(folder))
        assert "\n" not in str(caught.value)
    clip = load_clip(str(tiny_clip))
    with pytest.raises(GuidanceError, match="is 2[0-9] tokens; this CLIP model reads at most 16"):
        clip_guidance("abcdefghijklmnopqrst", clip)
    with pytest.raises(GuidanceError, match="cannot read the guidance image"):
        image_guidance(tmp_path / "missing.png", clip)
    with pytest.raises(GuidanceError, match="unknown guidance mode 'slow'"):
        generate(build_model(ModelConfig(preset="tiny"), 8, 1, "none", seed=0),
                 GenerationRequest(1, steps=2, guidance=[color_guidance(WHITE)], guidance_mode="slow"))


def test_cli_guidance(trained_model, tiny_clip, tmp_path, capsys):
    from PIL import Image

    common = ["sample", "--model", str(trained_model), "-n", "4", "--steps", "5", "--seed", "2"]
    assert main(common + ["--out", str(tmp_path / "plain.png"), "--out-dir", str(tmp_path / "plain")]) == 0
    assert main(common + ["--out", str(tmp_path / "white.png"), "--out-dir", str(tmp_path / "white"),
                          "--guide", "color=#FFFFFF:40", "--guide", "clip=a digit:4",
                          "--clip-model", str(tiny_clip), "--guidance-mode", "full"]) == 0

    def mean(folder):
        return sum(torch.tensor(list(Image.open(p).getdata())).float().mean().item()
                   for p in sorted(folder.glob("*.png"))) / 4

    assert mean(tmp_path / "white") > mean(tmp_path / "plain") + 20
    for extra, message in [
        (["--guide", "colr=red"], "unknown guidance term 'colr'"),
        (["--guide", "color=#12345"], "cannot read the colour '#12345'"),
        (["--guide", "clip=a cat:8"], "clip guidance needs a CLIP model"),
        (["--guide", "clip=a cat:8", "--clip-model", str(tmp_path / "none")], "cannot load a CLIP model"),
    ]:
        capsys.readouterr()
        assert main(common + ["--out", str(tmp_path / "x.png")] + extra) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
