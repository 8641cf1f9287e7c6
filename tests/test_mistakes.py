"""A new user's mistakes: each is one line from difflab, exit status 2, no traceback, and nothing lost.

Kinds (docs/reliability.md, section 8): resumes with nothing to resume from; SIGTERM and SIGHUP;
failed starts; output paths; sizes, counts and steps out of range; inf and nan; devices; damaged
model weights; messages that point the right way.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from difflab.cli import main
from difflab.errors import DataError
from difflab.metrics.frechet import frechet_distance
from difflab.training.checkpoints import find_latest
from difflab.training.trainer import Trainer

TINY = ["--data", "digits", "--image-size", "8", "--model", "tiny", "--batch-size", "8", "--warmup-steps", "2",
        "--sample-every", "0", "--sample-count", "2", "--sample-steps", "2", "--log-every", "1"]


def run_cli(capsys, *args) -> tuple[int, str]:
    """Exit status and stderr of `difflab ARGS` run in this process."""
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def one_error(err: str) -> str:
    """The only line of stderr, an error line."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("difflab: error: "), err
    assert "Traceback" not in err
    return lines[0]


def unet_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "unet" / "diffusion_pytorch_model.safetensors")


def folder_state(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its bytes: to show that nothing was changed."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished 6-step run with checkpoints at steps 4 and 6."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["-q", "train", *TINY, "--steps", "6", "--checkpoint-every", "2", "--out", str(run)]) == 0
    return run


# ---- 1. a resume never silently replaces finished work ---------------------------------------------------

@pytest.mark.parametrize("damage", ["deleted", "checksums"])
def test_a_resume_without_an_intact_checkpoint_changes_nothing(tmp_path, capsys, finished_run, damage):
    run = Path(shutil.copytree(finished_run, tmp_path / "run"))
    found = "metrics up to step 6; a model folder; sample grids"
    if damage == "deleted":
        shutil.rmtree(run / "checkpoints")
    else:
        for checkpoint in (run / "checkpoints").glob("step_*"):
            with open(checkpoint / "model.safetensors", "r+b") as f:
                f.seek(200)
                f.write(b"\x00\x01\x02\x03")
        found = "2 damaged checkpoints (step_00000004, step_00000006); " + found
    before = folder_state(run)
    code, err = run_cli(capsys, "train", "--out", run, "--resume", "--steps", "8")
    assert code == 2
    line = [x for x in err.splitlines() if x.startswith("difflab: error:")]
    assert line == [f"difflab: error: {run} has no intact checkpoint to resume from (found: {found}); nothing was "
                    "changed: run again with --overwrite to delete it and start over, or choose another --out"]
    assert folder_state(run) == before  # the model, the metrics and the damaged checkpoints are all still there


@pytest.mark.parametrize("state", ["missing", "empty"])
def test_a_resume_of_a_folder_with_no_run_is_refused(tmp_path, capsys, state):
    run = tmp_path / "run"
    if state == "empty":
        run.mkdir()
    code, err = run_cli(capsys, "train", *TINY, "--steps", "2", "--out", run, "--resume")
    assert code == 2
    word = "does not exist" if state == "missing" else "is empty"
    assert one_error(err) == (f"difflab: error: {run} {word}: there is no run to resume; check --out, or leave out "
                              "--resume to start a new run there")
    assert not run.exists() or not any(run.iterdir())


# ---- 2. SIGTERM and SIGHUP are handled like Ctrl-C ---------------------------------------------------------

def test_sigterm_saves_a_checkpoint_and_the_run_resumes_exactly(tmp_path, capsys, monkeypatch):
    args = ["train", *TINY, "--steps", "10", "--checkpoint-every", "0"]
    assert run_cli(capsys, *args, "--out", tmp_path / "straight")[0] == 0
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    original = Trainer.train_step

    def signalled_during_step_7(self, micro_batches):
        if self.state.step == 6:
            os.kill(os.getpid(), signal.SIGTERM)  # lands in the middle of the step
        return original(self, micro_batches)

    monkeypatch.setattr(Trainer, "train_step", signalled_during_step_7)
    run = tmp_path / "run"
    code, err = run_cli(capsys, *args, "--out", run)
    assert code == 128 + signal.SIGTERM
    assert err.strip().splitlines()[-1] == "difflab: stopped by SIGTERM"
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # the handlers are given back
    assert find_latest(run / "checkpoints").name == "step_00000007"  # the step it was in was finished
    metrics = (run / "metrics.csv").read_text()
    assert [line.split(",")[0] for line in metrics.splitlines()[1:]] == [str(s) for s in range(1, 8)]

    monkeypatch.setattr(Trainer, "train_step", original)
    assert run_cli(capsys, "train", "--out", run, "--resume")[0] == 0
    straight, resumed = unet_weights(tmp_path / "straight"), unet_weights(run)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    strip = [line.split(",")[:3] for line in (tmp_path / "straight" / "metrics.csv").read_text().splitlines()]
    assert [line.split(",")[:3] for line in (run / "metrics.csv").read_text().splitlines()] == strip


@pytest.mark.slow
def test_a_real_sigterm_from_outside_stops_a_run_with_status_143(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "difflab", "-q", "train", *TINY, "--steps", "100000",
                                "--checkpoint-every", "0", "--out", str(run)],
                               env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ((run / "metrics.csv").is_file() and (run / "metrics.csv").read_text().count("\n") >= 3):
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read() if process.poll() else ""
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert err.strip().splitlines()[-1] == "difflab: stopped by SIGTERM" and "Traceback" not in err
    latest = find_latest(run / "checkpoints")
    last_row = (run / "metrics.csv").read_text().strip().splitlines()[-1]
    assert latest is not None and int(latest.name.removeprefix("step_")) == int(last_row.split(",")[0])


# ---- 3. a run that fails before its first step blocks nothing ---------------------------------------------

@pytest.mark.parametrize("bad,message", [
    (["--model", "course", "--image-size", "30"], "image size 30 does not fit"),
    (["--model", "nope"], "unknown model preset 'nope'"),
])
def test_a_failed_start_leaves_nothing_that_blocks_the_corrected_command(tmp_path, capsys, bad, message):
    run = tmp_path / "run"
    code, err = run_cli(capsys, "train", *TINY, "--steps", "2", *bad, "--out", run)
    assert code == 2 and message in one_error(err)
    code, err = run_cli(capsys, "train", *TINY, "--steps", "2", "--out", run)  # corrected
    assert code == 0, err
    assert (run / "model").is_dir() and "preset = \"tiny\"" in (run / "config.toml").read_text()


# ---- 4, 5, 7. mistakes on the command line: one line each, before any work ---------------------------------

@pytest.fixture(scope="module")
def folders(tmp_path_factory, finished_run) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("places")
    (root / "a-file.txt").write_text("not a folder")
    (root / "unreadable").mkdir()
    for name in ("a.png", "b.png"):
        (root / "unreadable" / name).write_text("not an image")
    (root / "few").mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / "few" / f"{i}.png")
    damaged = Path(shutil.copytree(finished_run / "model", root / "damaged"))
    weights = damaged / "unet" / "diffusion_pytorch_model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2: len(blob) // 2 + 64] = b"\xff" * 64  # NaN floats: the file still loads
    weights.write_bytes(bytes(blob))
    return {"model": finished_run / "model", "file": root / "a-file.txt", "dir": root,
            "unreadable": root / "unreadable", "few": root / "few", "damaged": damaged}


CASES = [
    # output paths: a folder, a path under a file
    (["sample", "--model", "{model}", "--out", "{dir}"], "--out {dir} is a folder; give a file name, such as"),
    (["sample", "--model", "{model}", "--out", "{file}/x.png"], "--out {file}/x.png cannot be written: {file} is a "
                                                                "file, not a folder"),
    (["sample", "--model", "{model}", "--out-dir", "{file}"], "--out-dir {file} is a file; give a folder"),
    (["eval", "--model", "{model}", "--json", "{dir}"], "--json {dir} is a folder; give a file name, such as "
                                                        "{dir}/result.json"),
    (["noise", "--out", "{dir}"], "--out {dir} is a folder"),
    (["scratch", "sample", "--model", "{model}", "--out", "{file}/x.png"], "cannot be written: {file} is a file"),
    (["train", "--config", "{dir}"], "config file {dir} cannot be read (Is a directory)"),
    (["demo", "--model", "{model}", "--export", "{file}/space"], "--export {file}/space cannot be written: {file} is "
                                                                 "a file"),
    # sizes, counts and steps out of range
    (["train", "--image-size", "100000"], "--image-size 100000 is too large"),
    (["noise", "--image-size", "-3"], "--image-size must be greater than 0 (got -3)"),
    (["noise", "--columns", "100000000"], "--columns from 2 to 64"),
    (["train", "--timesteps", "1"], "--timesteps must be from 2 to 100,000 (got 1)"),
    (["train", "--sample-steps", "2000"], "--sample-steps 2000 is more than dpm++2m can take from the model's noise "
                                          "schedule of 1000 timesteps; use at most 1000"),
    (["sample", "--model", "{model}", "--steps", "5000"], "--steps 5000 is more than dpm++2m can take"),
    (["sample", "--model", "{model}", "--sampler", "pndm", "--steps", "1000"], "use at most 999"),
    (["sample", "--model", "{model}", "--columns", "0"], "--columns must be from 1 to the number of images (16), "
                                                         "not 0"),
    (["sample", "--model", "{model}", "-n", "100000000"], "of memory and"),  # said before it starts
    (["train", "--warmup-steps", "-5"], "--warmup-steps must be at least 0 (got -5)"),
    (["train", "--sample-count", "100000000"], "--sample-count 100000000 is more than the 1,024 difflab allows"),
    (["train", "--batch-size", "100000000"], "--batch-size 100000000 is more than the 65,536 difflab allows"),
    (["quickstart", "-n", "1"], "-n must be from 2 to 100,000 (got 1)"),
    (["eval", "--model", "{model}", "--data", "{few}"], "{few} has 3 images, too few to hold out a 'test' split "
                                                        "(every tenth image): it needs at least 10"),
    # inf and nan
    (["train", "--lr", "inf"], "--lr must be a finite number (got inf)"),
    (["train", "--ema-decay", "nan"], "--ema-decay must be a finite number (got nan)"),
    (["quickstart", "--minutes", "inf"], "--minutes must be a finite number (got inf)"),
    (["scratch", "train", "--lr", "nan"], "--lr must be a finite number (got nan)"),
    (["sample", "--model", "{model}", "--cfg-scale", "inf"], "--cfg-scale must be a finite number (got inf)"),
    (["sample", "--model", "{model}", "--eta", "nan"], "--eta must be a finite number (got nan)"),
    (["eval", "--model", "{model}", "--cfg-scale", "nan"], "--cfg-scale must be a finite number (got nan)"),
    (["sample", "--model", "{model}", "--guide", "color=red:inf"], "the color guidance scale must be a finite "
                                                                   "number, not inf"),
    # devices
    (["train", "--device", "tpu"], "unknown device 'tpu'; use auto, cpu, cuda, cuda:N or mps"),
    (["sample", "--model", "{model}", "--device", "meta"], "unknown device 'meta'"),
    # damaged models
    (["sample", "--model", "{damaged}"], "{damaged}/unet/diffusion_pytorch_model.safetensors is damaged: "),
    (["finetune", "--from", "{damaged}"], "{damaged}/unet/diffusion_pytorch_model.safetensors is damaged"),
    # messages that point the right way
    (["train", "--data", "{file}"], "{file} is a file, not a folder of images; give the folder that holds it"),
    (["noise", "--data", "{unreadable}"], "none of the 2 images in {unreadable} can be read (first: a.png: not an "
                                          "image file (PNG, JPEG, WebP, BMP or GIF)); difflab reads PNG"),
    (["sample", "--model", "{model}", "--guide", "color=#55FFAA:abc"], "the scale 'abc' in the guidance "
                                                                       "'color=#55FFAA:abc' is not a number"),
]
if not torch.cuda.is_available():
    CASES.append((["train", "--device", "cuda"], "--device cuda: no CUDA GPU is available here; use --device cpu"))


@pytest.mark.parametrize("args,message", CASES, ids=[" ".join(c[0][:1] + c[0][-2:]) for c in CASES])
def test_a_mistake_is_one_line_before_any_work(tmp_path, capsys, monkeypatch, folders, args, message):
    monkeypatch.chdir(tmp_path)  # default outputs (samples.png, noise.png) land here
    fill = {k: str(v) for k, v in folders.items()}
    args = [a.format(**fill) for a in args]
    if args[0] in ("train", "finetune", "quickstart") or args[:2] == ["scratch", "train"]:
        args += ["--out", str(tmp_path / "run")]
    if args[0] in ("train", "finetune") and "--steps" not in args:
        args += ["--steps", "1"]
    code, err = run_cli(capsys, *args)
    assert code == 2, err
    assert message.format(**fill) in one_error(err)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written == [], written  # refused before anything was written


def test_a_generation_estimated_at_hours_asks_for_yes(monkeypatch, finished_run):
    from difflab import workload
    from difflab.errors import ConfigError
    from difflab.storage.folder import load_model

    model = load_model(finished_run)
    monkeypatch.setattr(workload, "_seconds_per_call", lambda model, batch, size=None: 0.5)  # a slow machine, made up
    workload.check_workload(model, 1000, 20, 64, yes=False)  # 16 batches × 20 steps × 0.5 s: under 3 minutes
    with pytest.raises(ConfigError, match=r"^-n 100000 images × 20 steps would take about 4.3 hours on cpu "
                                          r"\(measured here\); lower -n or --steps, or pass --yes to start anyway$"):
        workload.check_workload(model, 100_000, 20, 64, yes=False)
    workload.check_workload(model, 100_000, 20, 64, yes=True)  # the user said so


def test_argparse_mistakes_are_one_line_and_a_hint(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["sample", "--model", "m", "-n", "ten"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "difflab sample: error: argument -n/--count: invalid int value: 'ten'", "(see 'difflab sample --help')"]


def test_an_unreachable_hub_dataset_is_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "difflab", "noise", "--data", "nobody/no-such-dataset",
                             "--out", str(tmp_path / "n.png")], env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 2
    assert one_error(result.stderr).startswith("difflab: error: could not load dataset 'nobody/no-such-dataset'")
    # online but unreachable, huggingface_hub logs each of its retries: the CLI sets its level before it loads
    code = ("import logging, os; os.environ.pop('HF_HUB_VERBOSITY', None); from difflab.cli import setup_logging; "
            "setup_logging(False); import huggingface_hub.utils._http; "
            "print(logging.getLogger('huggingface_hub.utils._http').getEffectiveLevel())")
    level = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert level.strip() == "40"  # errors only


# ---- the Fréchet distance of tiny sets ---------------------------------------------------------------------

def test_the_frechet_distance_of_tiny_sets_is_said_to_be_indicative(caplog):
    rng = np.random.default_rng(0)
    with pytest.raises(DataError, match="needs at least 2 images in each set, and more than 64"):
        frechet_distance(rng.normal(size=(1, 64)), rng.normal(size=(50, 64)))
    a, b = rng.normal(size=(5, 64)), rng.normal(size=(5, 64)) + 1
    with caplog.at_level("WARNING", logger="difflab"):
        distance = frechet_distance(a, b)
    assert np.isfinite(distance) and distance > 0 and frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    assert "only indicative; use at least 65 images in each set" in caplog.text


def test_a_decompression_bomb_as_a_guidance_image_is_refused_from_its_header(tmp_path):
    from difflab.diffusion.guidance import read_image_tensor
    from difflab.errors import GuidanceError
    from test_hostile_images import handmade_png

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(handmade_png(100_000, 100_000, 8, 0, b""))  # 10 GB of pixels, announced in 50 bytes
    with pytest.raises(GuidanceError, match=r"cannot read the guidance image .*decompression bomb"):
        read_image_tensor(bomb)
