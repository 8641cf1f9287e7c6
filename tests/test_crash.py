"""Killed at any moment, resumed with nothing lost.

`difflab train` is killed with SIGKILL again and again, at moments chosen to fall inside every step
of writing a checkpoint and the model (src/difflab/testhooks.py pauses the process there), in the
middle of training and at arbitrary times. After each kill the run folder is checked, and the next
process resumes it (and is killed in turn). The last one finishes, and its weights must equal those
of a run that was never interrupted.

Python's start-up and imports take seconds, so the processes are forked from a "zygote" that has
imported everything once; each one is still a separate process running `difflab train` that is
SIGKILLed with no chance to clean up. The final resume runs as a plain `python -m difflab`.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difflab.training.checkpoints import find_latest, load_checkpoint, verify

STEPS = 12
ARGS = ["-q", "train", "--data", "digits", "--image-size", "8", "--model", "tiny", "--batch-size", "8",
        "--steps", str(STEPS), "--warmup-steps", "2", "--checkpoint-every", "2", "--keep-checkpoints", "2",
        "--log-every", "1", "--sample-every", "0", "--sample-count", "2", "--sample-steps", "2"]

# When each process is killed, in order, and the newest complete checkpoint that must then be found.
# ("pause", POINT): at that point of the checkpoint or model writer; ("logged", N[, S]): once metrics.csv
# has step N (and S seconds more; the kill lands in the steps after it); ("after", S): S seconds after
# the start.
KILLS = [
    (("after", 0.05), None),                                # starting up: maybe nothing written yet
    (("pause", "step_00000002:started"), None),             # an empty hidden .partial folder
    (("pause", "step_00000002:model-written"), None),       # one file of four
    (("pause", "step_00000002:state-written"), None),       # complete, but still hidden
    (("pause", "step_00000002:renamed"), 2),                # in place; `latest` not yet updated
    (("pause", "step_00000004:optimizer-written"), 2),
    (("pause", "step_00000006:latest-written"), 6),         # before the old ones are pruned
    (("pause", "step_00000002:hidden-for-deletion"), 8),    # pruning, after step 8
    (("logged", 9), 8),                                     # training, between checkpoints
    (("logged", 10), 8),                                    # at once if it resumed from step 10
    (("pause", "step_00000012:ema-written"), 10),           # the final checkpoint, its last file
    (("pause", "step_00000012:renamed"), 12),               # complete; `latest` still names step 10
    (("pause", "model:assembled"), 12),                     # the model, not yet moved into place
]
RANDOM_KILLS = 6  # then, in a second run, at random moments


ZYGOTE = r"""
import json, os, sys
import difflab.cli, difflab.training.trainer, diffusers.training_utils, sklearn.datasets  # once, slowly
import difflab.training.autoencoder, difflab.training.dreambooth, transformers  # text runs, DreamBooth
import difflab.plots  # matplotlib: the loss curve every run ends with

for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.environ.update(job["env"])
        log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(log, 1), os.dup2(log, 2), os.close(0)
        code = 1
        try:
            code = difflab.cli.main(job["argv"])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:
            os._exit(code)
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


class Zygote:
    """Forks `difflab` processes from one that has done the slow imports."""

    def __init__(self, env: dict):
        self.process = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env)
        self.child: int | None = None

    def start(self, argv: list[str], env: dict, log: Path) -> int:
        self.process.stdin.write(json.dumps({"argv": argv, "env": env, "log": str(log)}) + "\n")
        self.process.stdin.flush()
        self.child = int(self.process.stdout.readline())
        return self.child

    def exit_code(self, timeout: float) -> int | None:
        """The exit status of the process started last, if it has ended within `timeout` seconds."""
        if select.select([self.process.stdout], [], [], timeout)[0]:
            self.child = None
            return int(self.process.stdout.readline())
        return None

    def close(self) -> None:
        """Stop the zygote, and a process of its that a failed test left running (paused, perhaps)."""
        if self.child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.child, signal.SIGKILL)
        self.process.stdin.close()
        self.process.wait(timeout=60)


def metrics_steps(run: Path) -> list[int]:
    try:
        with open(run / "metrics.csv", newline="") as f:
            return [int(r["step"]) for r in csv.DictReader(f) if r.get("seconds")]
    except (OSError, ValueError, KeyError):
        return []


def kill_at(zygote: Zygote, argv: list[str], moment: tuple, run: Path, tmp: Path, index: int,
            may_finish: bool = False) -> bool:
    """Start a process and SIGKILL it at `moment`; False if it finished first (where `may_finish`)."""
    paused = tmp / f"paused-{index}"
    env = {"DIFFLAB_TEST_PAUSE_AT": moment[1], "DIFFLAB_TEST_PAUSED_FILE": str(paused)} if moment[0] == "pause" else {}
    log = tmp / f"process-{index}.log"
    pid = zygote.start(argv, env, log)
    started, logged = time.monotonic(), None
    while True:
        code = zygote.exit_code(0.005)
        if code == 0 and may_finish:
            return False
        assert code is None, f"kill {index} {moment}: the process ended by itself ({code}):\n{log.read_text()}"
        if moment[0] == "logged" and logged is None and moment[1] in metrics_steps(run):
            logged = time.monotonic()
        if ((moment[0] == "pause" and paused.exists())
                or (moment[0] == "after" and time.monotonic() - started >= moment[1])
                or (logged is not None and time.monotonic() - logged >= (moment[2] if len(moment) > 2 else 0))):
            break
        if time.monotonic() - started > 120:
            os.kill(pid, signal.SIGKILL)
            pytest.fail(f"kill {index} {moment}: never reached:\n{log.read_text()}")
    os.kill(pid, signal.SIGKILL)
    code = zygote.exit_code(60)
    if code == 0 and may_finish:  # it finished just before the kill
        return False
    assert code == -signal.SIGKILL, f"kill {index} {moment}: status {code}:\n{log.read_text()}"
    return True


def finish(zygote: Zygote, argv: list[str], log: Path) -> None:
    zygote.start(argv, {}, log)
    assert zygote.exit_code(120) == 0, log.read_text()


def check_after_kill(run: Path, expected: int | None, index: int, ema: bool = True) -> None:
    """Every visible checkpoint is complete, and the newest is found, loads and is at least `expected`
    (`ema`: the run keeps a moving average, whose step is the run's)."""
    root = run / "checkpoints"
    visible = sorted(root.glob("step_*")) if root.is_dir() else []
    assert all(verify(c) is not None for c in visible), f"kill {index}: an incomplete checkpoint is visible"
    latest = find_latest(root)
    assert latest == (visible[-1] if visible else None)
    if expected is not None:
        assert latest is not None and int(latest.name.removeprefix("step_")) >= expected, f"kill {index}: {latest}"
    if latest is not None:
        _, state = load_checkpoint(latest)
        assert state["step"] == int(latest.name.removeprefix("step_"))
        assert not ema or state["ema_step"] == state["step"]


def restart(run: Path) -> list[str]:
    """What a job script runs after a kill: --resume once there is a checkpoint to resume from, and
    --overwrite before (a resume with nothing to resume from is refused, so that it never silently
    starts over)."""
    return [*ARGS, "--out", str(run), "--resume" if find_latest(run / "checkpoints") else "--overwrite"]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "unet" / "diffusion_pytorch_model.safetensors")


def losses(run: Path) -> list[tuple[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return [(r["step"], r["loss"]) for r in csv.DictReader(f)]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_killed_at_any_moment_resumed_with_nothing_lost(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    zygote = Zygote(env)
    straight, run, fuzzed = tmp_path / "straight", tmp_path / "run", tmp_path / "fuzzed"
    argv = [*ARGS, "--out", str(run), "--resume"]
    try:
        finish(zygote, [*ARGS, "--out", str(tmp_path / "warm-up")], tmp_path / "warm-up.log")  # first-use costs
        started = time.monotonic()
        finish(zygote, [*ARGS, "--out", str(straight)], tmp_path / "straight.log")
        whole_run = time.monotonic() - started

        for index, (moment, expected) in enumerate(KILLS):
            kill_at(zygote, restart(run), moment, run, tmp_path, index)
            check_after_kill(run, expected, index)
        finish(zygote, argv, tmp_path / "finish.log")
        # resumed once more, it rewrites the model: killed while the old one is moved aside
        kill_at(zygote, argv, ("pause", "model:moved-aside"), run, tmp_path, len(KILLS))
        check_after_kill(run, STEPS, len(KILLS))
        assert not (run / "model").exists() and (run / ".model.previous").is_dir()

        rng, killed = random.Random(0), 0
        for index in range(RANDOM_KILLS):
            # a random time, up to about two steps long, after one of the next three steps is logged
            latest = find_latest(fuzzed / "checkpoints")
            start = int(latest.name.removeprefix("step_")) if latest else 0
            moment = ("logged", min(start + rng.randrange(1, 4), STEPS - 2), rng.uniform(0, 2 * whole_run / STEPS))
            killed += kill_at(zygote, restart(fuzzed), moment, fuzzed, tmp_path, 100 + index, may_finish=True)
            check_after_kill(fuzzed, None, 100 + index)
        assert killed >= RANDOM_KILLS // 2
        finish(zygote, restart(fuzzed), tmp_path / "fuzzed.log")
    finally:
        zygote.close()

    finished = subprocess.run([sys.executable, "-m", "difflab", *argv], env=env, capture_output=True, text=True,
                              timeout=180)
    assert finished.returncode == 0, finished.stderr
    for other in (run, fuzzed, tmp_path / "warm-up"):  # and two uninterrupted runs agree
        assert json.loads((other / "checkpoints" / "step_00000012" / "state.json").read_text())["step"] == STEPS
        assert json.loads((other / "model" / "difflab.json").read_text())["training"]["steps"] == STEPS
        a, b = weights(straight), weights(other)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert losses(other) == losses(straight) and [int(s) for s, _ in losses(straight)] == list(range(1, STEPS + 1))
        leftovers = [p.relative_to(other) for p in other.rglob(".*")]
        assert leftovers == [], leftovers


# ---- every kind of run resumes bit-exactly: the VAE stage of a text run, and DreamBooth --------------------

TEXT_ARGS = ["-q", "train", "--data", "shapes:n=48", "--image-size", "16", "--conditioning", "text", "--model", "tiny",
             "--batch-size", "8", "--precision", "no", "--vae-steps", "6", "--vae-batch-size", "8", "--steps", "4",
             "--warmup-steps", "2", "--checkpoint-every", "2", "--keep-checkpoints", "2", "--log-every", "1",
             "--sample-every", "0", "--sample-count", "2", "--sample-steps", "2"]
# (moment, run sub-folder whose metrics a "logged" moment watches, the newest VAE checkpoint expected)
VAE_KILLS = [
    (("pause", "step_00000002:model-written"), "vae", None),   # the stage's first checkpoint, one file of four
    (("pause", "step_00000004:renamed"), "vae", 4),            # in place; `latest` not yet updated
    (("logged", 5), "vae", 4),                                 # training the VAE, between checkpoints
    (("pause", "model:assembled"), "vae", 6),                  # the stage's VAE, not yet moved into place
    (("logged", 1), ".", 6),                                   # the UNet's first step, after the finished stage
]


def unet_and_vae(run: Path) -> dict[str, torch.Tensor]:
    vae = load_file(run / "vae" / "model" / "diffusion_pytorch_model.safetensors")
    return {**{f"unet.{k}": v for k, v in weights(run).items()}, **{f"vae.{k}": v for k, v in vae.items()}}


def text_restart(run: Path) -> str:
    """--resume once the run or its VAE stage has something to resume from, else --overwrite."""
    vae = run / "vae"
    started = find_latest(run / "checkpoints") or find_latest(vae / "checkpoints") or (vae / "model").is_dir()
    return "--resume" if started else "--overwrite"


def same_run(a: Path, b: Path, tensors) -> None:
    x, y = tensors(a), tensors(b)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert losses(a) == losses(b)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_text_run_killed_in_its_vae_stage_resumes_bit_exactly(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    zygote = Zygote(env)
    straight, run = tmp_path / "straight", tmp_path / "run"
    try:
        finish(zygote, [*TEXT_ARGS, "--out", str(straight)], tmp_path / "straight.log")
        for index, (moment, watched, expected) in enumerate(VAE_KILLS):
            kill_at(zygote, [*TEXT_ARGS, "--out", str(run), text_restart(run)], moment, run / watched, tmp_path, index)
            check_after_kill(run / "vae", expected, index, ema=False)
        finish(zygote, [*TEXT_ARGS, "--out", str(run), "--resume"], tmp_path / "finish.log")
    finally:
        zygote.close()
    same_run(straight, run, unet_and_vae)
    with open(run / "vae" / "metrics.csv", newline="") as f:  # each VAE step logged once: later rows were dropped
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows if r["loss"]] == list(range(1, 7))
    assert [r["step"] for r in rows if r["psnr_eval"]] == ["6"]  # the finished stage measured once
    assert losses(straight)[-1][0] == "4"


DREAMBOOTH_ARGS = ["-q", "dreambooth", "--instance-prompt", "a sks shape", "--prior-preservation", "--class-prompt",
                   "a shape", "--num-class-images", "4", "--steps", "6", "--checkpoint-every", "2",
                   "--keep-checkpoints", "2", "--log-every", "1", "--sample-every", "0", "--sample-count", "2",
                   "--sample-steps", "2", "--precision", "no"]
DREAMBOOTH_KILLS = [
    (("pause", "step_00000002:optimizer-written"), None),  # the first checkpoint, half written
    (("logged", 3), 2),                                     # training, between checkpoints
    (("pause", "step_00000004:renamed"), 4),                # in place; `latest` not yet updated
    (("pause", "model:assembled"), 6),                      # the model, not yet moved into place
]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_dreambooth_run_killed_at_any_moment_resumes_bit_exactly(tmp_path):
    from PIL import Image

    from difflab.training.trainer import train
    from test_text_training import text_config

    train(text_config(steps=2, vae_steps=2, data="shapes:n=48"), tmp_path / "base")
    instances = tmp_path / "instances"
    instances.mkdir()
    for i in range(3):
        Image.new("RGB", (16, 16), (40 * i, 80, 220)).save(instances / f"{i}.png")
    common = [*DREAMBOOTH_ARGS, "--model", str(tmp_path / "base" / "model"), "--instance-data", str(instances)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    zygote = Zygote(env)
    straight, run = tmp_path / "straight", tmp_path / "run"
    try:
        finish(zygote, [*common, "--out", str(straight)], tmp_path / "straight.log")
        for index, (moment, expected) in enumerate(DREAMBOOTH_KILLS):
            again = "--resume" if find_latest(run / "checkpoints") else "--overwrite"
            kill_at(zygote, [*common, "--out", str(run), again], moment, run, tmp_path, index)
            check_after_kill(run, expected, index, ema=False)  # DreamBooth keeps no moving average
        finish(zygote, [*common, "--out", str(run), "--resume"], tmp_path / "finish.log")
    finally:
        zygote.close()
    same_run(straight, run, weights)
    assert [int(s) for s, _ in losses(run)] == list(range(1, 7))
    with open(run / "metrics.csv", newline="") as f:  # the prior group is logged apart, as in the straight run
        assert "loss_prior" in next(csv.DictReader(f))
