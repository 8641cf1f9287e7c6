"""Folders too large for memory are read from disk by worker processes as training goes, with the
same batches, the same resumption and the same weights as the in-memory path."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import tiny_config
from difflab.config import TrainConfig
from difflab.data import BatchStream, ImageDataset, StreamedImages, open_dataset, streaming
from difflab.errors import ConfigError, DataError
from difflab.training.trainer import train


@pytest.fixture
def folder(tmp_path) -> Path:
    """Two classes of 20 small noisy RGB images."""
    rng = np.random.default_rng(0)
    for name, base in (("dark", 40), ("light", 200)):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(20):
            pixels = np.clip(base + rng.normal(0, 30, (10, 12, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / name / f"{i:02d}.png")
    return tmp_path / "images"


def test_the_memory_limit_decides(folder):
    assert isinstance(open_dataset(str(folder), image_size=8), ImageDataset)  # 36 x 3 x 8 x 8 bytes
    assert isinstance(open_dataset(str(folder), image_size=8, memory_limit_mb=1), ImageDataset)
    assert isinstance(open_dataset(str(folder), image_size=8, memory_limit_mb=0), StreamedImages)
    with pytest.raises(ConfigError, match="--memory-limit-mb must be 0 or more"):
        config = TrainConfig()
        config.data.memory_limit_mb = -1
        config.validate()


def test_streamed_batches_equal_in_memory_batches_and_resume_alike(folder, tmp_path, monkeypatch):
    decoded_by = tmp_path / "pids"
    read = streaming.read_image_array

    def read_and_note(*args):  # inherited by the forked workers
        with open(decoded_by, "a") as f:
            f.write(f"{os.getpid()}\n")
        return read(*args)

    monkeypatch.setattr(streaming, "read_image_array", read_and_note)
    memory = open_dataset(str(folder), image_size=8)
    disk = open_dataset(str(folder), image_size=8, memory_limit_mb=0)
    assert len(disk) == len(memory) == 36 and disk.class_names == memory.class_names and disk.workers >= 1
    a, b = BatchStream(memory, 5, seed=3, flip=True), BatchStream(disk, 5, seed=3, flip=True)
    for _ in range(10):  # across epoch boundaries
        x, y = next(a), next(b)
        assert torch.equal(x["images"], y["images"]) and torch.equal(x["labels"], y["labels"])
        assert x["images"].is_contiguous() and y["images"].is_contiguous()  # the same layout, too
    saved = b.state_dict()
    expected = [next(a) for _ in range(8)]
    resumed = BatchStream(open_dataset(str(folder), image_size=8, memory_limit_mb=0), 5, seed=3, flip=True)
    resumed.load_state_dict(saved)
    assert all(torch.equal(e["images"], next(resumed)["images"]) for e in expected)
    pids = set(decoded_by.read_text().split())
    assert pids and str(os.getpid()) not in pids  # decoded by worker processes only


def test_training_from_disk_gives_the_same_weights(folder, tmp_path):
    def run(name: str, memory_limit_mb: int) -> dict[str, torch.Tensor]:
        config = tiny_config(steps=6)
        config.data.spec, config.data.flip, config.data.memory_limit_mb = str(folder), True, memory_limit_mb
        config.optim.batch_size = 8
        return load_file(train(config, tmp_path / name) / "unet" / "diffusion_pytorch_model.safetensors")

    memory, disk = run("memory", 2048), run("disk", 0)
    assert all(torch.equal(memory[k], disk[k]) for k in memory)


def test_a_file_that_disappears_during_training_is_named(folder):
    data = open_dataset(str(folder), image_size=8, memory_limit_mb=0)
    stream = BatchStream(data, 36, seed=0)
    next(stream)
    (folder / "dark" / "07.png").unlink()
    with pytest.raises(DataError, match=r"cannot read .*dark/07\.png \(No such file or directory\) although it was "
                                        r"readable when training started; put it back, then run again with --resume"):
        for _ in range(10):  # the next few batches may have been read ahead already
            next(stream)
