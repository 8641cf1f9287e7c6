"""Every data source and image mode, the batch stream, and bad data."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import solid, write_idx
from difflab.data import BatchStream, open_dataset
from difflab.data.decode import UnreadableImage, open_image, read_image_array
from difflab.errors import DataError

# ---- built-in digits ----------------------------------------------------------------------------

def test_digits_are_resized_grey_images_with_labels():
    data = open_dataset("digits", split="all")
    assert data.images.shape == (1797, 1, 16, 16) and data.images.dtype == torch.uint8
    assert data.class_names == [str(d) for d in range(10)]
    assert sorted(data.labels.unique().tolist()) == list(range(10))
    assert data.images.max() > 200 and data.images.min() == 0


def test_digits_in_rgb_at_another_size():
    data = open_dataset("digits", image_size=32, channels=3)
    assert data.images.shape[1:] == (3, 32, 32)
    assert torch.equal(data.images[:, 0], data.images[:, 2])


def test_splits_hold_out_every_tenth_image():
    train, test = open_dataset("digits", split="train"), open_dataset("digits", split="test")
    assert len(train) + len(test) == 1797 and len(test) == 179
    everything = open_dataset("digits", split="all").images
    assert torch.equal(test.images[0], everything[9])


# ---- image modes ---------------------------------------------------------------------------------

def test_grey_and_rgb_conversions(tmp_path):
    solid(100, mode="L").save(tmp_path / "grey.png")
    solid((255, 0, 0)).save(tmp_path / "red.jpg", quality=100)
    assert read_image_array(tmp_path / "grey.png", 8, 3).tolist() == np.full((3, 8, 8), 100).tolist()
    red_as_grey = read_image_array(tmp_path / "red.jpg", 8, 1)
    assert red_as_grey.shape == (1, 8, 8) and abs(int(red_as_grey.mean()) - 76) <= 2  # ITU-R 601 luma of red


def test_transparency_is_composited_over_white(tmp_path):
    img = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    img.putpixel((0, 0), (0, 0, 0, 255))
    img.save(tmp_path / "a.png")
    array = read_image_array(tmp_path / "a.png", 8, 3)
    assert array[:, 0, 0].tolist() == [0, 0, 0] and array[:, 4, 4].tolist() == [255, 255, 255]
    Image.new("LA", (8, 8), (0, 0)).save(tmp_path / "la.png")
    assert read_image_array(tmp_path / "la.png", 8, 1).min() == 255


def test_palette_and_sixteen_bit_images(tmp_path):
    palette = Image.new("P", (8, 8))
    palette.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    palette.paste(1, (0, 0, 8, 8))
    palette.save(tmp_path / "p.gif")
    assert read_image_array(tmp_path / "p.gif", 8, 3)[:, 0, 0].tolist() == [0, 200, 0]
    deep = np.full((8, 8), 128 * 257, dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert open_image(tmp_path / "deep.png").mode.startswith("I")
    assert read_image_array(tmp_path / "deep.png", 8, 1).max() == 128


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), "white")
    img.paste((0, 0, 0), (0, 0, 20, 20))  # left half black
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    img.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    shown = open_image(tmp_path / "rotated.jpg")
    assert shown.size == (20, 40)
    array = np.asarray(shown.convert("L"))
    assert array[:15].mean() < 60 and array[25:].mean() > 200  # the black half is now on top


def test_every_extension_is_found(tmp_path):
    for ext in ("png", "jpg", "jpeg", "webp", "bmp", "gif"):
        solid((10, 200, 10)).save(tmp_path / f"im.{ext}")
    (tmp_path / "notes.txt").write_text("not an image")
    data = open_dataset(str(tmp_path), image_size=8, split="all")
    assert len(data) == 6 and data.channels == 3 and data.labels is None


# ---- folders ---------------------------------------------------------------------------------------

def test_folder_labels_come_from_first_level_sub_folders(labelled_folder):
    data = open_dataset(str(labelled_folder), split="all")
    assert data.class_names == ["blue", "red"]
    assert len(data) == 14 and data.labels.tolist().count(0) == 7  # deeper/ counts for its top folder
    red = data.images[data.labels == 1].float().mean(dim=(0, 2, 3))
    assert red[0] > 200 and red[2] < 40
    assert data.image_size == 10  # the shorter side of the 12x10 images


def test_folder_loads_in_parallel_workers_like_in_process(labelled_folder, monkeypatch):
    from difflab.data import folder

    serial = open_dataset(str(labelled_folder), image_size=8, split="all")
    monkeypatch.setattr(folder, "PARALLEL_FROM", 1)
    parallel = open_dataset(str(labelled_folder), image_size=8, split="all")
    assert torch.equal(serial.images, parallel.images) and torch.equal(serial.labels, parallel.labels)


def test_unreadable_images_are_skipped_with_a_warning_that_names_them(labelled_folder, caplog):
    (labelled_folder / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    (labelled_folder / "red" / "empty.jpg").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="difflab"):
        data = open_dataset(str(labelled_folder), image_size=8, split="all")
    assert len(data) == 14 and len(data.skipped) == 2
    assert "skipped 2 unreadable images" in caplog.text
    assert "broken.png" in caplog.text and "empty.jpg" in caplog.text


def test_strict_stops_at_the_first_unreadable_image(labelled_folder):
    (labelled_folder / "red" / "text.png").write_text("hello")
    with pytest.raises(DataError, match=r"cannot read .*text\.png: not an image file.*--strict"):
        open_dataset(str(labelled_folder), image_size=8, split="all", strict=True)


def test_truncated_png_is_unreadable(tmp_path):
    solid((1, 2, 3), size=(64, 64)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableImage):
        open_image(tmp_path / "cut.png")


# ---- MNIST idx files ------------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_files(tmp_path, gz):
    images = np.random.default_rng(0).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    write_idx(tmp_path, "train", images, np.arange(7) % 10, gz)
    write_idx(tmp_path, "t10k", images[:3], np.arange(3), gz)
    train = open_dataset(f"mnist:{tmp_path}")
    assert train.images.shape == (7, 1, 28, 28) and torch.equal(train.images[:, 0], torch.from_numpy(images))
    assert train.labels.tolist() == list(range(7)) and train.class_names[3] == "3"
    assert len(open_dataset(f"mnist:{tmp_path}", split="test")) == 3
    assert len(open_dataset(f"mnist:{tmp_path}", split="all")) == 10
    fashion = open_dataset(f"fashion-mnist:{tmp_path}", image_size=32, channels=3)
    assert fashion.images.shape == (7, 3, 32, 32) and fashion.class_names[9] == "Ankle boot"


def test_mnist_missing_or_truncated_files(tmp_path):
    with pytest.raises(DataError, match="no train-images-idx3-ubyte"):
        open_dataset(f"mnist:{tmp_path}")
    write_idx(tmp_path, "train", np.zeros((5, 4, 4)), np.zeros(5), gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated"):
        open_dataset(f"mnist:{tmp_path}")


# ---- the datasets library ---------------------------------------------------------------------------

def test_imagefolder_through_the_datasets_library(tmp_path):
    for name, colour in (("cat", (200, 120, 0)), ("dog", (0, 90, 200))):
        (tmp_path / name).mkdir()
        for i in range(3):
            solid(colour).save(tmp_path / name / f"{i}.png")
    data = open_dataset(f"imagefolder:{tmp_path}", image_size=8, split="all")
    assert len(data) == 6 and data.channels == 3 and data.class_names == ["cat", "dog"]
    assert data.images[data.labels == 1, 2].float().mean() > 180  # dogs are blue


def test_a_hub_style_dataset_repository(tmp_path):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["dark", "light"])})
    rows = {"image": [solid((v, v, v), mode="RGB") for v in (0, 250, 10, 240)], "label": [0, 1, 0, 1]}
    (tmp_path / "data").mkdir()
    datasets.Dataset.from_dict(rows, features=features).to_parquet(tmp_path / "data" / "train-00000-of-00001.parquet")
    data = open_dataset(f"hf:{tmp_path}", image_size=8)
    assert data.class_names == ["dark", "light"] and data.channels == 1  # grey content is detected
    assert data.images[data.labels == 1].float().mean() > 200


def test_unreachable_hub_dataset_is_a_clear_error():
    with pytest.raises(DataError, match="could not load dataset 'nobody/no-such-dataset'"):
        open_dataset("nobody/no-such-dataset")


# ---- bad specs ---------------------------------------------------------------------------------------

def test_unknown_specs_and_empty_folders(tmp_path):
    with pytest.raises(DataError, match="unknown data spec 'cifar'; use a folder of images"):
        open_dataset("cifar")
    with pytest.raises(DataError, match="does not exist"):
        open_dataset(str(tmp_path / "missing" / "images.png"))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match="no images in"):
        open_dataset(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="unknown split"):
        open_dataset("digits", split="validation")


# ---- the batch stream ---------------------------------------------------------------------------------

def test_stream_visits_every_image_once_per_epoch_and_resumes_exactly():
    data = open_dataset("digits", image_size=8, split="test")  # 179 images
    stream = BatchStream(data, 32, seed=3)
    seen = torch.cat([stream.next_indices()[0] for _ in range(5)])  # 160 of 179
    assert len(seen.unique()) == 160 and stream.epoch == 0
    saved = stream.state_dict()
    expected = [stream.next_indices()[0] for _ in range(4)]  # crosses into epoch 1
    assert stream.epoch == 1
    resumed = BatchStream(data, 32, seed=3)
    resumed.load_state_dict(saved)
    assert all(torch.equal(a, resumed.next_indices()[0]) for a in expected)


def test_stream_shards_batches_between_processes_and_flips_on_request():
    data = open_dataset("digits", image_size=8, split="test")
    whole = BatchStream(data, 8, seed=1).next_indices()[0]
    shards = [BatchStream(data, 4, seed=1, rank=r, world_size=2).next_indices()[0] for r in range(2)]
    assert torch.equal(torch.cat(shards), whole)
    plain = next(BatchStream(data, 64, seed=1))["images"]
    flipped = next(BatchStream(data, 64, seed=1, flip=True))["images"]
    mirrored = [i for i in range(64) if not torch.equal(plain[i], flipped[i])]
    assert 10 < len(mirrored) < 54
    assert all(torch.equal(flipped[i], plain[i].flip(-1)) for i in mirrored)
    assert plain.min() >= -1 and plain.max() <= 1
