"""Shared fixtures: tiny configs, image folders made on the fly, one small trained model per session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # its notes on torchvision and tiny test vocabularies
# Tests use tiny tensors: one thread is as fast as two, and two are slowed many times over when other
# work shares the CPU (a busy 2-core machine: the whole suite in 551 s with two threads, 60 s with one).
# With pytest -n, each worker is one such process. Set before torch loads.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import gzip  # noqa: E402
import struct  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from difflab.config import TrainConfig  # noqa: E402


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Evaluation classifiers are cached per test session, never in the user's cache."""
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def tiny_sd_folders(tmp_path_factory):
    """Tiny Stable Diffusion folders by kind (text, inpaint, depth, upscale), each built once per session.
    Read-only: a test that changes one works on a copy."""
    import tiny_sd

    built = {}

    def folder(kind: str) -> Path:
        if kind not in built:
            built[kind] = tiny_sd.build(tmp_path_factory.mktemp(f"tiny-sd-{kind}"), kind)
        return built[kind]

    return folder


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A tiny random CLIPModel and a CLIPTokenizer over single letters, saved as a folder."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    import tiny_sd

    folder = tmp_path_factory.mktemp("clip")
    text = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1,
            "vocab_size": 60, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1,
              "image_size": 32, "patch_size": 8}
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(folder)
    tiny_sd.tokenizer(folder, max_length=77).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    """A CLIP tokenizer trained on 300 `shapes` captions (one or two shapes each; a few hundred tokens,
    every caption a word per token), saved as a folder that `CLIPTokenizer.from_pretrained` loads;
    model_max_length 32 (the longest caption takes 23)."""
    from difflab.data import open_dataset
    from difflab.models.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(open_dataset("shapes:n=300,objects=2", split="all").captions, folder, model_max_length=32)
    return folder


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium (tests that use it are marked helpers.web.needs_chromium)."""
    from helpers.web import chromium

    with chromium(tmp_path / "chromium-profile") as driver:
        yield driver


TINY_READER = {"train_images": 800, "test_images": 200, "steps": 120}  # the shapes attribute reader at 16x16: seconds


@pytest.fixture(scope="session")
def shapes_reader(tmp_path_factory):
    """The attribute reader of prompt adherence, trained small at 16x16."""
    from difflab.metrics.attributes import load_or_train_attributes

    with pytest.MonkeyPatch.context() as patch:  # session-scoped: set up before the autouse private_cache
        patch.setenv("DIFFLAB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        return load_or_train_attributes(16, **TINY_READER)


def tiny_config(steps: int = 30, **run) -> TrainConfig:
    """A tiny model on the built-in digits: a few seconds of training."""
    config = TrainConfig()
    config.data.spec = "digits"
    config.data.image_size = 8
    config.model.preset = "tiny"
    config.optim.batch_size = 16
    config.optim.warmup_steps = 5
    config.optim.precision = "no"  # exact arithmetic; bf16 has its own test
    config.run.steps = steps
    config.run.sample_every = 0
    config.run.checkpoint_every = 0
    config.run.sample_count = 4
    config.run.sample_steps = 4
    config.run.log_every = 5
    for key, value in run.items():
        setattr(config.run, key, value)
    return config


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory) -> Path:
    """A tiny model trained for a few steps on digits (8x8, grey); its model folder."""
    from difflab.training.trainer import train

    return train(tiny_config(steps=20), tmp_path_factory.mktemp("runs") / "tiny")


def conditional_config(method: str = "embedding", steps: int = 30, **run) -> TrainConfig:
    config = tiny_config(steps, **run)
    config.model.conditioning = "class"
    config.model.class_method = method
    return config


@pytest.fixture(scope="session")
def conditional_model(tmp_path_factory) -> Path:
    """A tiny class-conditional model (label embedding) trained briefly on digits; its model folder."""
    from difflab.training.trainer import train

    return train(conditional_config(steps=40), tmp_path_factory.mktemp("runs") / "conditional")


def write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool) -> None:
    """Write images and labels in the MNIST idx format."""
    folder.mkdir(parents=True, exist_ok=True)
    n, h, w = images.shape
    blobs = {
        f"{prefix}-images-idx3-ubyte": struct.pack(">HBBIII", 0, 8, 3, n, h, w) + images.astype(np.uint8).tobytes(),
        f"{prefix}-labels-idx1-ubyte": struct.pack(">HBBI", 0, 8, 1, n) + labels.astype(np.uint8).tobytes(),
    }
    for name, blob in blobs.items():
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(blob))
        else:
            (folder / name).write_bytes(blob)


def solid(colour, size=(12, 10), mode="RGB") -> Image.Image:
    return Image.new(mode, size, colour)


@pytest.fixture
def labelled_folder(tmp_path) -> Path:
    """red/ and blue/ sub-folders of small RGB images, one nested a level deeper."""
    root = tmp_path / "shapes"
    for name, colour in (("red", (220, 20, 20)), ("blue", (20, 20, 220))):
        (root / name / "deeper").mkdir(parents=True)
        for i in range(6):
            solid(colour).save(root / name / f"{i}.png")
        solid(colour).save(root / name / "deeper" / "x.jpg")
    return root
