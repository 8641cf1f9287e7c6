"""A new user's mistakes with training runs, DreamBooth, LoRA, data, eval, push and model folders (issue 28,
points 3, 7, 9, 10, 13-17, 19 and 20): each is one line, found before any work, and a refused start leaves
nothing behind; every command difflab prints for the user to run is run here as printed."""

from __future__ import annotations

import json
import logging
import re
import shlex
import shutil
import time

import pytest
from PIL import Image

from difflab.cli import build_parser, main
from difflab.errors import DataError, ModelError
from difflab.training.trainer import train
from test_text_training import text_config

PROMPT = "a photo of sks star"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny text-to-image run trained on shapes (its tokenizer learnt from the captions)."""
    run = tmp_path_factory.mktemp("base") / "run"
    train(text_config(steps=2, vae_steps=2, data="shapes:n=48"), run)
    return run


@pytest.fixture(scope="module")
def pixel(tmp_path_factory):
    from conftest import tiny_config

    run = tmp_path_factory.mktemp("pixel") / "run"
    train(tiny_config(steps=1), run)
    return run


@pytest.fixture(scope="module")
def instances(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stars")
    for i in range(3):
        Image.new("RGB", (16, 16), (40 * i, 80, 220)).save(folder / f"star_{i}.png")
    return folder


def dreambooth(base, instances, out, *extra) -> list[str]:
    return ["-q", "dreambooth", "--model", str(base / "model"), "--instance-data", str(instances), "--instance-prompt",
            PROMPT, "--out", str(out), "--steps", "1", "--sample-every", "0", "--sample-steps", "2", "--sample-count",
            "2", "--checkpoint-every", "0", "--precision", "no", *extra]


def new_text_run(out, *extra) -> list[str]:
    return ["-q", "train", "--conditioning", "text", "--model", "tiny", "--data", "shapes:n=48", "--batch-size", "8",
            "--precision", "no", "--vae-steps", "2", "--vae-batch-size", "8", "--steps", "1", "--sample-every", "0",
            "--checkpoint-every", "0", "--sample-steps", "2", "--image-size", "16", "--out", str(out), *extra]


def one_line_error(argv, capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("difflab: error: "), err
    return err[0]


# ---- 3, 19: one name for the LoRA rank, refused at 0, below and above the adapted layers' width --------------

RANK_CASES = {
    "dreambooth rank 0": (["--lora", "--rank", "0"], "--lora-rank must be greater than 0 (got 0)"),
    "dreambooth rank -1": (["--lora", "--lora-rank", "-1"], "--lora-rank must be greater than 0 (got -1)"),
    "dreambooth rank past the width": (["--lora", "--rank", "100000"],
                                       "--lora-rank 100000 is more than the width of the layers it adapts (the "
                                       "narrowest, unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k, is "
                                       "16 wide)"),
    "dreambooth rank without --lora": (["--rank", "2"], "--lora-rank is the rank of LoRA adapters: add --lora"),
    "finetune rank past the width": (None, "--lora-rank 17 is more than the width"),
    "train a new model with a rank": (None, "--lora-rank trains adapters on a pretrained text-to-image model"),
}


@pytest.mark.parametrize("case", list(RANK_CASES))
def test_a_lora_rank_that_cannot_work_is_one_line_before_any_work(case, base, instances, tmp_path, capsys):
    extra, message = RANK_CASES[case]
    out = tmp_path / "run"
    if case == "finetune rank past the width":
        argv = ["-q", "finetune", "--from", str(base), "--data", "shapes:n=16", "--lora-rank", "17", "--out", str(out)]
    elif case == "train a new model with a rank":
        argv = new_text_run(out, "--lora-rank", "4")
    else:
        argv = dreambooth(base, instances, out, *extra)
    started = time.perf_counter()
    assert message in one_line_error(argv, capsys)
    assert not out.exists()  # refused before the run folder was written
    assert time.perf_counter() - started < 20


def test_the_widest_rank_the_layers_take_is_accepted_and_one_more_is_not(base):
    from difflab.errors import ConfigError
    from difflab.models.lora import check_rank
    from difflab.storage.folder import load_model

    model = load_model(base)
    check_rank(model, 16)  # the tiny preset's narrowest adapted layer (cross-attention's to_k: 16 → 32)
    with pytest.raises(ConfigError, match="use --lora-rank 16 or less"):
        check_rank(model, 17)


# ---- 19: each command's --help speaks of its own flags and defaults ---------------------------------------

def command_parsers() -> dict:
    parser = build_parser()
    return next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices


@pytest.mark.parametrize("command", list(command_parsers()))
def test_help_names_only_flags_the_command_has(command):
    """A flag named in a command's help exists in that command (or is written as another command's:
    'difflab push --space')."""
    parsers = command_parsers()
    parser = parsers[command]
    flags = {o for a in parser._actions for o in a.option_strings}
    for text in [parser.description or ""] + [a.help or "" for a in parser._actions]:
        for other, named in re.findall(r"difflab (\w+)((?: [^ ')]+)*)", text):
            if other in parsers:
                text = text.replace(f"difflab {other}{named}", "")  # another command's flags: checked there
        for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", text):
            assert flag in flags, f"{command} --help names {flag}, which it does not have: {text!r}"


def test_dreambooth_help_gives_its_own_defaults():
    helps = {a.dest: a.help for a in command_parsers()["dreambooth"]._actions}
    assert helps["run.steps"].endswith("; default 400") and "1000" not in helps["run.steps"]
    assert "1/20 of the base model's own" in helps["optim.lr"] and "5e-06" not in helps["optim.lr"]
    assert "--model" in helps["model.allow_pickle"] and "--from" not in helps["model.allow_pickle"]
    assert helps["model.lora_rank"].startswith("with --lora: the adapters' rank")
    train_helps = {a.dest: a.help for a in command_parsers()["train"]._actions}
    assert train_helps["run.steps"].endswith("; default 1000 when no budget is given")


# ---- 14, 13: every check that can run before training runs before it; a refused start leaves nothing -------

def before_training_cases(tmp_path, base, pixel, instances):
    empty = tmp_path / "empty"
    empty.mkdir()
    text_encoder_only = tmp_path / "encoder"
    shutil.copytree(base / "model" / "text_encoder", text_encoder_only / "text_encoder")
    out = tmp_path / "run"
    return {
        "image size the UNet cannot halve": (new_text_run(out, "--image-size", "18"),
                                             "the VAE this run trains makes 9×9 latents of 18 px images, and the UNet "
                                             "halves them 1 times, so they must be a multiple of 2: use "
                                             "--image-size 20"),
        "a pixel run as --vae": (new_text_run(out, "--vae", str(pixel)), f"cannot load an AutoencoderKL from {pixel}"),
        "a text encoder without its tokenizer": (new_text_run(out, "--text-encoder", str(text_encoder_only)),
                                                 f"--text-encoder {text_encoder_only} has no tokenizer"),
        "empty --sample-prompts": (new_text_run(out, "--sample-prompts", " | "), "--sample-prompts holds no prompt"),
        "dreambooth on an empty folder": (dreambooth(base, empty, out), "no images in --instance-data folder"),
        "dreambooth on a pixel model": (dreambooth(pixel, instances, out),
                                        f"{pixel / 'model'} has no text encoder: DreamBooth teaches text-to-image"),
    }


@pytest.mark.parametrize("case", ["image size the UNet cannot halve", "a pixel run as --vae",
                                  "a text encoder without its tokenizer", "empty --sample-prompts",
                                  "dreambooth on an empty folder", "dreambooth on a pixel model"])
def test_a_start_refused_before_its_first_step_leaves_nothing_behind(case, tmp_path, base, pixel, instances, capsys,
                                                                       caplog):
    argv, message = before_training_cases(tmp_path, base, pixel, instances)[case]
    started = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="difflab"):
        assert message in one_line_error(argv, capsys)
    assert "VAE stage" not in caplog.text  # nothing trained before the check
    assert not (tmp_path / "run").exists()
    assert time.perf_counter() - started < 20


def test_a_refused_start_in_a_folder_of_the_users_leaves_the_folder_as_it_was(tmp_path, pixel, instances, capsys):
    out = tmp_path / "run"
    out.mkdir()
    # refused after the run folder was written (the base model is loaded first): what set-up wrote is removed,
    # the user's folder is not
    assert "has no text encoder" in one_line_error(dreambooth(pixel, instances, out), capsys)
    assert out.is_dir() and list(out.iterdir()) == []
    from difflab.training.run_folder import RunFolder

    (out / "config.toml").write_text("")
    (out / "notes.txt").write_text("mine")
    RunFolder(out).discard_unstarted()
    assert sorted(p.name for p in out.iterdir()) == ["config.toml", "notes.txt"]  # not only what set-up wrote


def test_the_corrected_command_takes_over_a_folder_left_by_a_killed_start_without_its_tokenizer(tmp_path):
    """A start killed before its first step (SIGKILL: no chance to clean up) leaves config.toml and the
    tokenizer learnt from its captions; the next start must learn its own."""
    from difflab.config import dumps_config
    from difflab.training.run_folder import RunFolder

    out = tmp_path / "run"
    (out / "tokenizer").mkdir(parents=True)
    (out / "tokenizer" / "tokenizer_config.json").write_text("{}")
    config = text_config()
    (out / "config.toml").write_text(dumps_config(config))
    assert RunFolder(out).prepare(config, resume=False, overwrite=False) is None
    assert not (out / "tokenizer").exists() and (out / "config.toml").is_file()


# ---- 16: damaged model folders name the part -------------------------------------------------------------

def damage(folder, case) -> None:
    if case == "text encoder config":
        config = json.loads((folder / "text_encoder" / "config.json").read_text())
        config["hidden_size"], config["intermediate_size"] = 32, 64
        (folder / "text_encoder" / "config.json").write_text(json.dumps(config))
    elif case == "empty model_index.json":
        (folder / "model_index.json").write_text("{}")
    elif case == "broken tokenizer.json":
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(folder / "tokenizer")).save_pretrained(str(folder / "tokenizer"))
        data = json.loads((folder / "tokenizer" / "tokenizer.json").read_text())
        del data["added_tokens"]
        (folder / "tokenizer" / "tokenizer.json").write_text(json.dumps(data))
        for name in ("vocab.json", "merges.txt"):
            (folder / "tokenizer" / name).unlink(missing_ok=True)


DAMAGE = {
    "text encoder config": "its text_encoder/ does not fit its weights: ",
    "empty model_index.json": "model_index.json names no pipeline class (_class_name); the model folder",
    "broken tokenizer.json": "its tokenizer/ cannot be loaded (KeyError 'added_tokens')",
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_model_folder_names_the_part(case, tmp_path, base, capsys):
    folder = tmp_path / "model"
    shutil.copytree(base / "model", folder)
    damage(folder, case)
    message = one_line_error(["-q", "sample", "--model", str(folder), "--prompt", "a red circle", "-n", "1",
                              "--steps", "2", "--out", str(tmp_path / "x.png")], capsys)
    assert DAMAGE[case] in message and "look at the above report" not in message
    assert "damaged" in message
    if case == "text encoder config":  # the layer, the file and both shapes
        assert re.search(r"token_embedding.weight is \d+×16 in model.safetensors and \d+×32 by config.json", message)


def test_a_pixel_text_folder_with_a_damaged_text_encoder_names_it(tmp_path, base):
    """The same words where difflab loads a text encoder itself (--text-encoder, pixel text models)."""
    from difflab.storage.text_encoder import load_text_encoder

    folder = tmp_path / "model"
    shutil.copytree(base / "model", folder)
    damage(folder, "text encoder config")
    with pytest.raises(ModelError, match="its text_encoder/ does not fit its weights"):
        load_text_encoder(folder)


# ---- 15, 17, 20: unfinished runs are named as such, with a command that works ------------------------------

def run_printed(command: str, cwd, monkeypatch) -> int:
    """Run a command difflab printed, as a user pasting it would (in `cwd`)."""
    argv = shlex.split(command)
    assert argv[0] == "difflab", command
    monkeypatch.chdir(cwd)
    return main(["-q", *argv[1:]])


def quoted_command(message: str) -> str:
    return re.search(r"with: (difflab .+)$", message)[1]


@pytest.mark.parametrize("state", ["never trained a step", "checkpoint without a model"])
@pytest.mark.parametrize("command", ["push", "sample", "sample the vae stage"])
def test_an_unfinished_run_is_named_with_the_command_that_finishes_it(state, command, tmp_path, pixel, base, capsys,
                                                                     monkeypatch):
    text = command == "sample the vae stage"
    run = tmp_path / "my run"  # a space: the printed command quotes it
    shutil.copytree(base if text else pixel, run)
    shutil.rmtree(run / "model")
    if state == "never trained a step":
        for name in ("checkpoints", "vae", "samples", "metrics.csv", "loss.png", "tokenizer"):
            shutil.rmtree(run / name, ignore_errors=True) if (run / name).is_dir() else (run / name).unlink(
                missing_ok=True)
        if text:
            (run / "vae").mkdir()
    target = run / "vae" if text else run
    if command == "push":
        argv = ["-q", "push", "--model", str(target), "--repo-id", "me/model", "--dry-run"]
    else:
        argv = ["-q", "sample", "--model", str(target), "-n", "1", "--out", str(tmp_path / "x.png")]
        argv += ["--prompt", "a"] if text else []
    message = one_line_error(argv, capsys)
    assert "DDPMPipeline" not in message and "no UNet" not in message
    if state == "never trained a step":
        assert "never trained a step (no model/ yet)" in message and "start it with: difflab train --config" in message
    else:
        assert "has not finished (no model/ yet)" in message and "finish it with: difflab train --out" in message
    if text:
        assert message.startswith(f"difflab: error: {target} is the VAE stage of the run {run}, not a diffusion model")
        return  # a text run takes longer to finish: its command is run by the pixel cases
    printed = quoted_command(message)
    if state == "checkpoint without a model":
        assert printed.endswith("--resume")
    assert run_printed(printed, tmp_path, monkeypatch) == 0
    assert (run / "model" / "unet" / "config.json").is_file()


def test_an_unfinished_dreambooth_run_is_finished_by_dreambooth(tmp_path, base, instances, capsys, monkeypatch):
    from difflab.storage.hub import HubError, upload_plan

    out = tmp_path / "db"
    assert main(dreambooth(base, instances, out)) == 0
    shutil.rmtree(out / "model")
    with pytest.raises(HubError) as error:
        upload_plan(out)
    printed = quoted_command(str(error.value))
    assert printed == f"difflab dreambooth --out {out} --resume"
    assert run_printed(printed, tmp_path, monkeypatch) == 0 and (out / "model" / "model_index.json").is_file()


# ---- 20 (and 9): the "sample more with:" commands run as printed; the card names the subject's token ---------

@pytest.mark.parametrize("kind", ["dreambooth lora", "dreambooth full", "text", "pixel"])
def test_the_printed_sample_command_runs_as_printed(kind, tmp_path, base, instances, capsys, monkeypatch):
    out = tmp_path / "out dir" / "run"
    if kind.startswith("dreambooth"):
        argv = dreambooth(base, instances, out, *(["--lora", "--rank", "2"] if kind == "dreambooth lora" else []))
    elif kind == "text":
        argv = new_text_run(out, "--sample-prompts", "a red circle | a blue square")
    else:
        argv = ["-q", "train", "--data", "digits", "--model", "tiny", "--image-size", "8", "--steps", "1",
                "--batch-size", "8", "--sample-every", "0", "--checkpoint-every", "0", "--out", str(out)]
    argv.remove("-q")  # the lines below are info lines
    capsys.readouterr()
    assert main(argv) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "sample more with: " in line]
    assert len(lines) == 1
    printed = lines[0].split("sample more with: ", 1)[1]
    assert printed.count("--model") == 1, printed
    if kind.startswith("dreambooth"):
        assert f"--prompt '{PROMPT}'" in printed
        card = (out / "model" / "README.md").read_text()
        assert "`sks`" in card and "`photo`" not in card  # point 9: the subject's token, not "photo"
    if kind == "text":
        assert "--prompt 'a red circle'" in printed
    assert run_printed(printed, tmp_path, monkeypatch) == 0
    assert Image.open(tmp_path / "grid.png").size[0] > 0


def test_the_subject_token_without_a_class_prompt(base):
    from transformers import CLIPTokenizer

    from difflab.training.dreambooth import check_token

    tokenizer = CLIPTokenizer.from_pretrained(str(base / "model" / "tokenizer"))
    assert check_token("a photo of sks star", None, tokenizer) == "sks"  # "photo" is new to this tokenizer too
    assert check_token("a photo of sks star", "a photo of star", tokenizer) == "sks"
    assert check_token("a sks shape", None, tokenizer) == "sks"


# ---- 7: captions that would be ignored or dropped without a word ------------------------------------------

def captioned_folder(folder, count=12, sidecar=True):
    folder.mkdir()
    for i in range(count):
        Image.new("RGB", (8, 8), (20 * i, 80, 200)).save(folder / f"{i:02d}.png")
        if sidecar:
            (folder / f"{i:02d}.txt").write_text(f"a square {i}")
    return folder


def test_a_caption_column_on_sidecar_captions_is_refused(tmp_path):
    from difflab.data import open_dataset

    folder = captioned_folder(tmp_path / "data")
    with pytest.raises(DataError, match=r"--caption-column prompt names a column of a metadata.jsonl or "
                                        r"metadata.csv, and .* has none \(its captions are IMAGE.txt files"):
        open_dataset(str(folder), 8, 3, caption_column="prompt")
    assert open_dataset(str(folder), 8, 3).captions[0] == "a square 0"


def test_metadata_entries_that_name_no_image_are_named(tmp_path, caplog):
    from difflab.data import open_dataset

    folder = captioned_folder(tmp_path / "data", sidecar=False)
    lines = [{"file_name": f"{i:02d}.png", "text": f"a square {i}"} for i in range(12)]
    lines += [{"file_name": "gone.png", "text": "lost"}, {"file_name": "sub/typo.png", "text": "lost too"}]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    with caplog.at_level(logging.WARNING, logger="difflab"):
        data = open_dataset(str(folder), 8, 3, split="train")  # a split: the other split's entries are not unknown
    assert len(data) == 11  # 12 images, the tenth held out
    warnings = [r.getMessage() for r in caplog.records if "name no image file" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("2 entries of ") and "gone.png, sub/typo.png" in warnings[0]


# ---- 10: eval of a text model on its own captioned data ---------------------------------------------------

def test_eval_measures_a_text_model_on_its_own_captioned_data(tmp_path, base, tiny_clip, capsys):
    folder = captioned_folder(tmp_path / "mine", count=20)
    command = ["eval", "--model", str(base), "--data", str(folder), "-n", "4", "--steps", "2", "--no-record"]
    message = one_line_error(command, capsys)
    assert "has no labels to train the evaluation classifier on; give --features clip:PATH" in message
    assert main([*command, "--clip-model", str(tiny_clip), "--json", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["feature_space"] == f"clip:{tiny_clip}" and result["data"] == str(folder)
    assert result["frechet_distance"] >= 0 and "frechet_floor" in result and "vae_ceiling" in result
    assert "clip_score" in result and "clip_score_real" in result
    assert main([*command, "--features", f"clip:{tiny_clip}", "--json", str(tmp_path / "f.json")]) == 0
    assert "clip_score" not in json.loads((tmp_path / "f.json").read_text())  # no --clip-model: no CLIP score


def test_eval_asks_the_text_model_for_the_held_out_captions(tmp_path, base, tiny_clip, monkeypatch):
    from difflab.metrics import evaluate

    asked = []
    real_generate = evaluate.generate

    def recording(model, request, **kwargs):
        asked.append(request.prompts)
        return real_generate(model, request, **kwargs)

    monkeypatch.setattr(evaluate, "generate", recording)
    folder = captioned_folder(tmp_path / "mine", count=20)
    assert main(["-q", "eval", "--model", str(base), "--data", str(folder), "-n", "3", "--steps", "2",
                 "--clip-model", str(tiny_clip)]) == 0
    assert asked == [["a square 9", "a square 19", "a square 9"]]  # the test split: every tenth image


def test_features_on_a_shapes_text_model_are_not_ignored(base, tiny_clip, capsys, monkeypatch):
    from difflab.metrics import prompt_adherence

    seen = {}

    def fake(model, n, **kwargs):
        seen.update(kwargs)
        return {"n": n, "adherence": {}, "frechet_distance": 0.0, "frechet_floor": 0.0,
                "feature_space": kwargs["features"].name, "sampler": "ddim", "steps": 2, "seed": 0}

    monkeypatch.setattr(prompt_adherence, "evaluate_prompts", fake)
    monkeypatch.setattr(prompt_adherence, "adherence_line", lambda result: "")
    assert main(["-q", "eval", "--model", str(base), "-n", "2", "--no-record", "--features",
                 f"clip:{tiny_clip}"]) == 0
    assert seen["features"].name == f"clip:{tiny_clip}"
    message = one_line_error(["eval", "--model", str(base), "-n", "2", "--features", "classifier"], capsys)
    assert "a text model trained on shapes is measured in the attribute reader's features" in message


def card_commands(card: str) -> list[str]:
    """The difflab commands of a model card's bash blocks, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", card, re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [line.strip() for line in lines if line.strip().startswith("difflab ")]


@pytest.mark.parametrize("kind", ["text", "pixel", "dreambooth lora"])
def test_the_commands_of_a_model_card_run_as_printed(kind, tmp_path, base, pixel, instances, monkeypatch):
    if kind == "dreambooth lora":
        out = tmp_path / "lora"
        assert main(dreambooth(base, instances, out, "--lora", "--rank", "2")) == 0
        model = out / "model"
    else:
        model = (base if kind == "text" else pixel) / "model"
    commands = card_commands((model / "README.md").read_text())
    assert commands, "the card shows how to sample the model"
    Image.new("RGB", (16, 16), (200, 40, 40)).save(tmp_path / "photo.png")
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (0, 0, 8, 16))  # repaint the left half
    mask.save(tmp_path / "mask.png")
    for command in commands:
        command = command.replace("--steps 20", "--steps 2")  # the same command, quicker
        assert run_printed(command, tmp_path, monkeypatch) == 0, command
