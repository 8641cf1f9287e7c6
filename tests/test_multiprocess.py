"""Several processes: `accelerate launch --multi_gpu --num_processes 2 ... --device cpu` (two CPU
processes over gloo) trains, checkpoints and resumes without hanging; every rank holds the same
weights and moving average, the average is updated once per optimizer step, and only the main
process writes files. (`accelerate launch --cpu --num_processes 2` starts one process only: its
`--cpu` launcher spreads over processes only with an MPI hostfile.)

Each process reports digests of its weights and the files it wrote: the processes run difflab train
through tests/helpers/train_and_report.py, which records them (difflab itself installs no such hook).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from difflab.training.checkpoints import find_latest, load_checkpoint

REPORTING_TRAIN = Path(__file__).parent / "helpers" / "train_and_report.py"
ARGS = [str(REPORTING_TRAIN), "-q", "train", "--data", "digits", "--image-size", "8", "--model", "tiny",
        "--batch-size", "4", "--grad-accum", "2", "--steps", "4", "--warmup-steps", "2", "--checkpoint-every", "2",
        "--keep-checkpoints", "2", "--log-every", "1", "--sample-every", "2", "--sample-count", "2",
        "--sample-steps", "2", "--device", "cpu"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, report: Path, *extra: str) -> dict[int, dict]:
    report.mkdir()
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), *ARGS, "--out", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "DIFFLAB_TEST_REPORT_DIR": str(report)}
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)  # its own process group: a hang is killed whole
    try:
        _, stderr = launcher.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        _, stderr = launcher.communicate()
        pytest.fail(f"accelerate launch hung:\n{stderr[-3000:]}")
    assert launcher.returncode == 0, stderr[-3000:]
    reports = {int(p.stem.removeprefix("rank")): json.loads(p.read_text()) for p in report.glob("rank*.json")}
    assert sorted(reports) == [0, 1] and all(r["world_size"] == 2 for r in reports.values())
    return reports


def check_ranks(reports: dict[int, dict]) -> None:
    first, second = reports[0], reports[1]
    assert first["weights"] == second["weights"] and first["ema"] == second["ema"]  # the same model everywhere
    assert first["step"] == second["step"] == 4
    assert first["ema_step"] == second["ema_step"] == 4  # once per optimizer step, not per micro-batch
    assert second["writes"] == []  # only the main process writes
    assert any("checkpoints/" in w for w in first["writes"]) and any("model" in w for w in first["writes"])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_processes_train_checkpoint_and_resume_alike(tmp_path):
    first = launch(tmp_path / "run", tmp_path / "report")
    check_ranks(first)
    run = tmp_path / "run"
    _, state = load_checkpoint(find_latest(run / "checkpoints"))
    assert state["step"] == 4 and state["ema_step"] == 4 and state["train"]["images_seen"] == 4 * 4 * 2 * 2
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_000002.png", "step_000004.png"]

    # Resume a copy of the run from its step-2 checkpoint: both ranks must reach the same step-4 state.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(run / "config.toml", resumed)
    shutil.copytree(run / "checkpoints" / "step_00000002", resumed / "checkpoints" / "step_00000002")
    second = launch(resumed, tmp_path / "report-resumed", "--resume")
    check_ranks(second)
    assert second[0]["weights"] == first[0]["weights"] and second[0]["ema"] == first[0]["ema"]


def workers(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of the training processes under the launcher. torchrun starts each in a session of
    its own, so they are found through their parents (/proc), and their rank from their environment."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    below, found = {launcher_pid}, {}
    for _ in range(4):  # launcher -> (agent) -> workers
        below |= {pid for pid, parent in parents.items() if parent in below}
    for pid in below - {launcher_pid}:
        try:
            environ = dict(item.split(b"=", 1) for item in (Path(f"/proc/{pid}") / "environ").read_bytes().split(b"\0")
                           if b"=" in item)
            command = (Path(f"/proc/{pid}") / "cmdline").read_bytes()
        except OSError:
            continue
        if REPORTING_TRAIN.name.encode() in command and b"RANK" in environ:
            found[int(environ[b"RANK"])] = pid
    return found


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the workers through /proc")
def test_sigterm_to_one_process_stops_every_process_after_a_checkpoint(tmp_path):
    """A scheduler may signal one process: every process stops after the same step, through a checkpoint
    (rank 0 writes it, and it needs every rank), and nothing hangs."""
    run = tmp_path / "run"
    args = list(ARGS)
    args[args.index("--steps") + 1] = "100000"
    args[args.index("--checkpoint-every") + 1] = "0"
    args[args.index("--sample-every") + 1] = "0"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), *args, "--out", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    ranks: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 240
        while not ((run / "metrics.csv").is_file() and (run / "metrics.csv").read_text().count("\n") >= 3):
            assert launcher.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.1)
        ranks = workers(launcher.pid)
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], signal.SIGTERM)  # rank 1 only
        _, stderr = launcher.communicate(timeout=180)
    except (subprocess.TimeoutExpired, AssertionError) as e:
        for pid in [*ranks.values(), *workers(launcher.pid).values()]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
        _, stderr = launcher.communicate()
        pytest.fail(f"the processes did not stop ({e}):\n{stderr[-3000:]}")
    assert "received SIGTERM" in stderr and "Traceback" not in stderr.split("received SIGTERM")[0]
    latest = find_latest(run / "checkpoints")
    assert latest is not None, stderr[-3000:]
    last_row = (run / "metrics.csv").read_text().strip().splitlines()[-1]
    assert int(latest.name.removeprefix("step_")) == int(last_row.split(",")[0])  # the step both ranks stopped at
