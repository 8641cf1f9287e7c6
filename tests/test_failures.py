"""Training that cannot go on: a diverging loss or gradients, a full disk, a folder that cannot be
written. Each stops with one line that names what happened, keeps the last checkpoint intact and
the run folder sound, and `--resume` then finishes the run as if nothing had happened."""

from __future__ import annotations

import builtins
import csv
import errno
import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from conftest import tiny_config
from difflab.cli import main
from difflab.errors import RunFolderError, TrainingError
from difflab.training import checkpoints
from difflab.training.checkpoints import find_latest, load_checkpoint, verify
from difflab.training.run_folder import MetricsLog
from difflab.training.trainer import Trainer, train

STEPS = 9


def config(**run):
    return tiny_config(steps=STEPS, checkpoint_every=3, **run)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "unet" / "diffusion_pytorch_model.safetensors")


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The weights of the run, never interrupted."""
    return weights(train(config(), tmp_path_factory.mktemp("straight") / "run").parent)


def assert_sound(run: Path, last_good: int) -> None:
    """The run folder after a failure: the last good checkpoint is the newest, is intact and finite,
    nothing half-written is visible, and the settings and metrics still read."""
    root = run / "checkpoints"
    assert [p.name for p in sorted(root.glob("step_*"))][-1] == f"step_{last_good:08d}"
    assert all(verify(p) is not None for p in root.glob("step_*"))
    assert find_latest(root).name == f"step_{last_good:08d}"
    assert not list(root.glob(".*.partial")) and not list(run.glob(".model.partial"))
    tensors, state = load_checkpoint(root / f"step_{last_good:08d}")
    assert state["step"] == last_good and all(torch.isfinite(t).all() for g in tensors.values() for t in g.values())
    assert (run / "config.toml").read_text().startswith("[data]")
    metrics = MetricsLog(run / "metrics.csv")
    assert all(int(r["step"]) >= 1 for r in metrics.rows) and not metrics.torn


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# ---- diverging loss and gradients --------------------------------------------------------------------

def test_a_loss_that_becomes_nan_stops_at_its_step_and_resume_finishes_the_run(tmp_path, straight):
    run = tmp_path / "run"
    trainer = Trainer(config(), run)
    # the prediction of step 5 blows up, as when weights diverge
    trainer.model.denoiser.register_forward_hook(
        lambda module, args, out: out * float("nan") if trainer.state.step == 4 else out)
    with pytest.raises(TrainingError) as error:
        trainer.fit()
    assert one_line(error).startswith("the loss became nan at step 5 and training stopped; the last good checkpoint, "
                                      "step_00000003, is intact: lower --lr")
    assert_sound(run, 3)
    assert same(weights(train(config(), run, resume=True).parent), straight)


def test_gradients_that_overflow_stop_the_run_before_they_reach_a_checkpoint(tmp_path, straight):
    run = tmp_path / "run"
    trainer = Trainer(config(), run)
    # step 6's gradients overflow while its loss is still finite; its checkpoint would hold NaN weights
    trainer.params[0].register_hook(lambda grad: grad * float("inf") if trainer.state.step == 5 else grad)
    with pytest.raises(TrainingError) as error:
        trainer.fit()
    assert "the gradients' norm became" in one_line(error) and "at step 6 " in one_line(error)
    assert not (run / "checkpoints" / "step_00000006").exists()
    assert_sound(run, 3)
    assert same(weights(train(config(), run, resume=True).parent), straight)


def test_a_real_divergence_from_the_command_line_then_resume_with_a_lower_learning_rate(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--data", "digits", "--image-size", "8", "--model", "tiny", "--batch-size", "8",
            "--steps", "8", "--checkpoint-every", "3", "--log-every", "1", "--sample-count", "2",
            "--sample-steps", "2", "--warmup-steps", "10", "--out", str(run)]
    assert main([*args, "--lr", "30"]) == 2
    err = re.findall(r"difflab: [^\r\n]*", capsys.readouterr().err)  # not the progress bars
    assert len(err) == 1 and "the loss became nan at step" in err[0] and "then run again with --resume" in err[0]
    last = find_latest(run / "checkpoints")
    assert last is not None and f"the last good checkpoint, {last.name}, is intact" in err[0]
    assert main([*args, "--lr", "0.001", "--resume"]) == 0  # the learning rate may change on resume
    with open(run / "metrics.csv", newline="") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert 'lr = 0.001' in (run / "config.toml").read_text()


# ---- writes that fail ------------------------------------------------------------------------------------

def refuse_writes(monkeypatch, under: Path, code: int) -> None:
    """Make every write under `under` fail with OSError(code), as on a full disk (ENOSPC) or in a
    read-only folder (EACCES); root ignores file modes, so the failure is simulated at the calls."""
    under = os.path.abspath(under)

    def check(path) -> None:
        if isinstance(path, (str, os.PathLike)):
            path = os.path.abspath(os.fspath(path))
            if path == under or path.startswith(under + os.sep):
                raise OSError(code, os.strerror(code), path)

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir
    real_replace, real_rename, real_save = os.replace, os.rename, checkpoints.save_file

    def open_(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            check(file)
        return real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            check(path)
        return real_os_open(path, flags, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        check(path)
        return real_mkdir(path, *args, **kwargs)

    def moving(real):
        return lambda src, dst, *args, **kwargs: (check(src), check(dst), real(src, dst, *args, **kwargs))[-1]

    def save_file(tensors, path, *args, **kwargs):  # safetensors writes from Rust, out of Python's reach
        try:
            check(path)
        except OSError as e:
            raise SafetensorError(f"Error while serializing: I/O error: {e.strerror} (os error {e.errno})") from None
        return real_save(tensors, path, *args, **kwargs)

    for module, name, replacement in [(builtins, "open", open_), (io, "open", open_), (os, "open", os_open),
                                      (os, "mkdir", mkdir), (os, "replace", moving(real_replace)),
                                      (os, "rename", moving(real_rename)), (checkpoints, "save_file", save_file)]:
        monkeypatch.setattr(module, name, replacement)


def test_a_full_disk_while_writing_a_checkpoint(tmp_path, monkeypatch, straight):
    run = tmp_path / "run"
    trainer = Trainer(config(), run)
    refuse_writes(monkeypatch, run / "checkpoints" / ".step_00000006.partial" / "optimizer.safetensors", errno.ENOSPC)
    with pytest.raises(TrainingError) as error:
        trainer.fit()
    assert one_line(error) == (
        f"could not write checkpoint {run / 'checkpoints' / 'step_00000006'} (No space left on device); the last good "
        f"checkpoint, step_00000003, is intact: free some disk space or make {run / 'checkpoints'} writable, "
        "then run again with --resume")
    assert_sound(run, 3)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    monkeypatch.undo()
    assert same(weights(train(config(), run, resume=True).parent), straight)


def test_a_read_only_samples_folder(tmp_path, monkeypatch, straight):
    run = tmp_path / "run"
    trainer = Trainer(config(sample_every=3), run)
    refuse_writes(monkeypatch, run / "samples", errno.EACCES)
    with pytest.raises(TrainingError) as error:
        trainer.fit()
    assert one_line(error).startswith(f"could not write {run / 'samples' / 'step_000003.png'} (Permission denied); "
                                      "the last good checkpoint, step_00000003, is intact")
    assert_sound(run, 3)
    monkeypatch.undo()
    assert same(weights(train(config(sample_every=3), run, resume=True).parent), straight)


def test_a_full_disk_while_writing_the_model_leaves_the_old_model(tmp_path, monkeypatch, straight):
    run = tmp_path / "run"
    train(config(), run)
    before = weights(run)
    trainer = Trainer(config(), run, resume=True)  # at the end already: it only writes the model again
    refuse_writes(monkeypatch, run / ".model.partial" / "unet", errno.ENOSPC)
    with pytest.raises(TrainingError) as error:
        trainer.fit()
    assert one_line(error).startswith(f"could not write {run / 'model'} (No space left on device)")
    assert_sound(run, STEPS)
    assert same(weights(run), before) and same(before, straight)


def test_a_metrics_file_that_cannot_be_appended_to(tmp_path, monkeypatch):
    run = tmp_path / "run"
    trainer = Trainer(config(), run)
    refuse_writes(monkeypatch, run / "metrics.csv", errno.ENOSPC)
    with pytest.raises(TrainingError, match=r"could not write .*metrics\.csv \(No space left on device\); the last "
                                            r"good checkpoint, step_00000003, is intact"):
        trainer.fit()  # the first row is due at step 5


def test_a_run_folder_that_cannot_be_written_at_all(tmp_path, monkeypatch):
    refuse_writes(monkeypatch, tmp_path / "run", errno.EROFS)
    with pytest.raises(RunFolderError) as error:
        Trainer(config(), tmp_path / "run")
    assert one_line(error).startswith(f"cannot write the run folder {tmp_path / 'run'} (Read-only file system)")


def test_a_torn_metrics_row_is_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("step,loss\n1,0.5\n2,0.4\n3,0.")  # cut short by a crash or a full disk
    metrics = MetricsLog(path)
    assert [r["step"] for r in metrics.rows] == ["1", "2"]
    metrics.truncate_after(2)
    assert path.read_text() == "step,loss\n1,0.5\n2,0.4\n"
    path.write_text("step,loss\n1,0.5\n2\n")
    assert [r["step"] for r in MetricsLog(path).rows] == ["1"]
    path.write_text("step,loss\n1,0.5\n2,0.4\n3")
    assert [r["step"] for r in MetricsLog(path).rows] == ["1", "2"]


# ---- a real full disk (a small tmpfs; needs root) -----------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                                                       capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_real_full_disk(small_disk):
    run = small_disk / "run"  # one checkpoint of the tiny model (2.6 MB) fits in 4 MB; two do not
    with pytest.raises(TrainingError) as error:
        train(tiny_config(steps=6, checkpoint_every=2), run)
    assert one_line(error).startswith(f"could not write checkpoint {run / 'checkpoints' / 'step_00000004'} "
                                      "(No space left on device); the last good checkpoint, step_00000002, is intact")
    assert_sound(run, 2)
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    train(tiny_config(steps=6, checkpoint_every=2), run, resume=True)
    assert load_checkpoint(find_latest(run / "checkpoints"))[1]["step"] == 6
