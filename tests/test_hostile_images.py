"""Hostile and broken files in a data folder: each is used correctly or skipped with a warning that
names it; none crashes or hangs loading, streaming or training."""

from __future__ import annotations

import io
import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

from difflab.cli import main
from difflab.data import BatchStream, StreamedImages, decode, open_dataset
from difflab.data.decode import read_image_array
from difflab.data.folder import list_images

SIZE = (12, 10)
NON_UTF8 = os.fsdecode(b"\xff\xfe-not-utf8.png")  # a name that is not valid UTF-8 (bytes on disk)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def handmade_png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG written byte by byte, for what Pillow will not write (16-bit RGB, absurd sizes)."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(rows))
            + png_chunk(b"IEND", b""))


def swapped_primaries_profile() -> bytes:
    """An RGB ICC profile whose red and blue primaries are swapped: pure red in it is sRGB blue."""
    data = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    count = struct.unpack(">I", data[128:132])[0]
    entries = {bytes(data[132 + 12 * i:136 + 12 * i]): 132 + 12 * i for i in range(count)}
    r, b = entries[b"rXYZ"], entries[b"bXYZ"]
    data[r + 4:r + 12], data[b + 4:b + 12] = data[b + 4:b + 12], data[r + 4:r + 12]
    return bytes(data)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def build_corpus(root: Path) -> tuple[dict[str, tuple[int, int, int]], dict[str, str]]:
    """Write the corpus; returns the good files with the colour each must give (RGB, ±8), and the
    bad files with (part of) the reason each must be skipped for."""
    root.mkdir()
    good, bad = {}, {}

    def add(name: str, data: bytes, colour=None, reason=None):
        (root / name).write_bytes(data)
        (good.__setitem__(name, colour) if reason is None else bad.__setitem__(name, reason))

    add("cmyk.jpg", encoded(Image.new("CMYK", SIZE, (0, 255, 255, 0)), "JPEG", quality=95), (255, 0, 0))
    deep = np.full(SIZE[::-1], 128 * 257, dtype=np.uint16)
    add("grey16.png", encoded(Image.fromarray(deep), "PNG"), (128, 128, 128))
    row = b"\x00" + struct.pack(">3H", 200 * 257, 20 * 257, 100 * 257) * SIZE[0]
    add("rgb16.png", handmade_png(*SIZE, 16, 2, row * SIZE[1]), (200, 20, 100))
    frames = [Image.new("RGB", SIZE, c).convert("P") for c in ((255, 0, 0), (0, 0, 255))]
    add("animated.gif", encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100),
        (255, 0, 0))  # the first frame
    add("la.png", encoded(Image.new("LA", SIZE, (0, 128)), "PNG"), (127, 127, 127))  # half black over white
    palette = Image.new("P", SIZE, 0)
    palette.putpalette([0, 0, 255] + [0] * 765)
    add("p_transparent.png", encoded(palette, "PNG", transparency=0), (255, 255, 255))
    add("icc.png", encoded(Image.new("RGB", SIZE, (255, 0, 0)), "PNG", icc_profile=swapped_primaries_profile()),
        (0, 0, 255))
    add("café_日本.png", encoded(Image.new("RGB", SIZE, (0, 200, 0)), "PNG"), (0, 200, 0))
    add(NON_UTF8, encoded(Image.new("RGB", SIZE, (200, 0, 200)), "PNG"), (200, 0, 200))
    add("jpeg_named.png", encoded(Image.new("RGB", SIZE, (255, 255, 0)), "JPEG", quality=95), (255, 255, 0))
    add("long_thin.png", handmade_png(4_000_000, 1, 8, 0, b"\x00" + bytes([77]) * 4_000_000), (77, 77, 77))

    add("empty.png", b"", reason="not an image file")
    whole = encoded(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)), "PNG")
    add("truncated.png", whole[:len(whole) // 2], reason="")
    whole = encoded(Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG")
    add("truncated.jpg", whole[:len(whole) // 2], reason="truncated")
    add("text.png", b"this is a text file, not an image\n", reason="not an image file")
    add("eps.png", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", reason="not an image file")
    add("bomb.png", handmade_png(100_000, 100_000, 8, 0, b""), reason="decompression bomb")
    add("bomb_warning.png", handmade_png(10_000, 10_000, 8, 0, b""), reason="decompression bomb")
    os.mkfifo(root / "fifo.png")  # reading it would wait for a writer forever
    bad["fifo.png"] = "not a regular file"
    os.symlink("loop_b.png", root / "loop_a.png")
    os.symlink("loop_a.png", root / "loop_b.png")
    bad["loop_a.png"] = bad["loop_b.png"] = "Too many levels of symbolic links"
    os.symlink("nowhere.png", root / "dangling.png")
    bad["dangling.png"] = "No such file or directory"
    os.symlink(".", root / "again")  # a folder loop: its images must not be listed twice
    return good, bad


def mean_colour(array: np.ndarray) -> tuple[int, ...]:
    return tuple(int(round(v)) for v in array.reshape(3, -1).mean(1))


@pytest.mark.timeout(120)  # a hang (the pipe) fails the test instead of blocking the suite
def test_every_hostile_file_is_used_correctly_or_skipped_by_name(tmp_path, caplog):
    good, bad = build_corpus(tmp_path / "corpus")
    root = tmp_path / "corpus"
    for name, colour in good.items():
        got = mean_colour(read_image_array(root / name, 8, 3))
        assert all(abs(a - b) <= 8 for a, b in zip(got, colour)), f"{name}: {got}, expected {colour}"

    listing = list_images(root)
    assert sorted(p.name for p in listing.files) == sorted([*good, *bad])  # each once, despite again/ -> .
    with caplog.at_level(logging.WARNING, logger="difflab"):
        data = open_dataset(str(root), image_size=8, channels=3, split="all")
    assert len(data) == len(good)
    reasons = {entry.split(" (", 1)[0]: entry for entry in data.skipped}
    assert sorted(reasons) == sorted(bad)
    for name, reason in bad.items():
        assert reason in reasons[name], reasons[name]
        assert name in caplog.text  # the one warning names every skipped file
    assert f"skipped {len(bad)} unreadable images" in caplog.text
    order = [p.name for p in listing.files if p.name in good]
    for name, image in zip(order, data.images):
        assert np.array_equal(image.numpy(), read_image_array(root / name, 8, 3)), name

    # The same files streamed from disk (worker processes) give the same batches, epoch after epoch.
    streamed = open_dataset(str(root), image_size=8, channels=3, split="all", memory_limit_mb=0)
    assert isinstance(streamed, StreamedImages) and streamed.skipped == data.skipped
    in_memory, from_disk = BatchStream(data, 4, seed=5, flip=True), BatchStream(streamed, 4, seed=5, flip=True)
    for _ in range(2 * len(good) // 4 + 1):
        assert torch.equal(next(in_memory)["images"], next(from_disk)["images"])


@pytest.mark.timeout(120)
def test_training_on_the_hostile_folder_runs_to_the_end(tmp_path, capsys):
    good, bad = build_corpus(tmp_path / "corpus")
    code = main(["train", "--data", str(tmp_path / "corpus"), "--image-size", "8", "--channels", "3", "--model",
                 "tiny", "--split", "all", "--steps", "2", "--batch-size", "4", "--sample-count", "1",
                 "--sample-steps", "2", "--memory-limit-mb", "0", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"skipped {len(bad)} unreadable images" in err and "fifo.png" in err
    assert (tmp_path / "run" / "model" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_strict_names_the_first_hostile_file(tmp_path):
    build_corpus(tmp_path / "corpus")
    with pytest.raises(Exception, match=r"cannot read .*: .*--strict"):
        open_dataset(str(tmp_path / "corpus"), image_size=8, channels=3, split="all", strict=True)


def test_a_long_thin_image_is_not_resized_whole(monkeypatch):
    sizes = []
    resize = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize",
                        lambda self, size, *a, **k: sizes.append(size) or resize(self, size, *a, **k))
    image = Image.new("L", (1, 3_000_000), 9)  # resized whole to 64 px wide, it would be 64 x 192 M pixels
    assert decode.resize_center_crop(image, 64).size == (64, 64)
    assert max(w * h for w, h in sizes) <= decode.MAX_RESIZED_PIXELS
    ordinary = Image.new("L", (40, 30), 9)  # ordinary images are still resized whole, then cropped
    sizes.clear()
    decode.resize_center_crop(ordinary, 16)
    assert sizes == [(21, 16)]


@pytest.mark.timeout(120)  # a hang (the pipe) fails the test instead of blocking the suite
def test_a_guidance_image_goes_through_the_same_decoder(tmp_path, tiny_clip):
    from difflab.diffusion.guidance import image_guidance, read_image_tensor
    from difflab.errors import GuidanceError
    from difflab.models.clip import load_clip

    good, bad = build_corpus(tmp_path / "corpus")
    root = tmp_path / "corpus"
    for name, colour in good.items():
        got = mean_colour(read_image_tensor(root / name).numpy() * 255)
        assert all(abs(a - b) <= 8 for a, b in zip(got, colour)), f"{name}: {got}, expected {colour}"
    for name, reason in bad.items():
        with pytest.raises(GuidanceError) as caught:
            read_image_tensor(root / name)
        message = str(caught.value)
        assert reason in message and f"guidance image {str(root / name)!r}" in message and "\n" not in message
    with pytest.raises(GuidanceError, match="decompression bomb"):
        image_guidance(root / "bomb.png", load_clip(str(tiny_clip)))
