"""Captions from metadata files, sidecar files, dataset columns and templates; they travel with their
images through batches, splits, flips, the stream from disk and resumption."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from conftest import solid
from difflab.data import BatchStream, StreamedImages, open_dataset
from difflab.errors import DataError


def numbered_folder(root, n=12, sub=""):
    """Images whose grey level encodes their number (i*20), so a caption can be checked against its image."""
    (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        solid((i * 20,) * 3, size=(8, 8)).save(root / sub / f"{i:02d}.png")
    return root


def number_of(image: torch.Tensor) -> int:
    return round(((image.float().mean().item() + 1) * 127.5) / 20)


def test_metadata_jsonl_captions_follow_their_images_through_splits_and_batches(tmp_path):
    root = numbered_folder(tmp_path / "data")
    lines = [json.dumps({"file_name": f"{i:02d}.png", "text": f"  image\nnumber {i} "}) for i in range(12)]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n\n")
    for split, expected in (("train", [i for i in range(12) if i != 9]), ("test", [9])):
        data = open_dataset(str(root), split=split)
        assert data.has_captions and data.captions == [f"image number {i}" for i in expected]
    data = open_dataset(str(root), split="all")
    batch = data.batch(torch.tensor([5, 2, 11]))
    assert batch["captions"] == ["image number 5", "image number 2", "image number 11"]
    assert [number_of(x) for x in batch["images"]] == [5, 2, 11]


def test_nested_metadata_csv_and_sidecar_files(tmp_path):
    root = numbered_folder(tmp_path / "data", 4, "a")
    numbered_folder(root, 4, "b")
    (root / "metadata.csv").write_text("file_name,text\na/00.png,from the top csv\nb/00.png,top\n")
    (root / "b" / "metadata.csv").write_text("file_name,text\n00.png,nearest wins\n")
    (root / "a" / "00.txt").write_text("the metadata entry wins")
    (root / "a" / "01.txt").write_bytes("\ufeffa sidecar with a BOM, ünïcode\n".encode("utf-8"))
    (root / "a" / "02.caption").write_text("kohya's other extension")
    (root / "a" / "03.txt").write_text("a sidecar")
    (root / "b" / "01.txt").write_text("b one")
    (root / "b" / "02.txt").write_text("b two")
    (root / "b" / "03.txt").write_text("b three")
    data = open_dataset(str(root), split="all")
    assert data.class_names == ["a", "b"]  # labels as before
    assert data.captions == ["from the top csv", "a sidecar with a BOM, ünïcode", "kohya's other extension",
                             "a sidecar", "nearest wins", "b one", "b two", "b three"]


def test_uncaptioned_images_are_counted_and_named_or_refused_when_strict(tmp_path, caplog):
    root = numbered_folder(tmp_path / "data", 5)
    (root / "01.txt").write_text("one")
    (root / "03.txt").write_text("three")
    with caplog.at_level(logging.WARNING, logger="difflab"):
        data = open_dataset(str(root), split="all")
    assert data.captions == ["", "one", "", "three", ""]
    assert "3 of the 5 images" in caplog.text and "00.png, 02.png, 04.png" in caplog.text
    with pytest.raises(DataError, match=r"3 of the 5 images .* have no caption \(00.png, 02.png, 04.png\)"):
        open_dataset(str(root), split="all", strict=True)


def test_folders_without_captions_are_as_before(tmp_path, caplog):
    root = numbered_folder(tmp_path / "data", 5)
    with caplog.at_level(logging.WARNING, logger="difflab"):
        data = open_dataset(str(root), split="all", strict=True)
    assert not data.has_captions and "captions" not in data.batch(torch.arange(3)) and not caplog.text
    digits = open_dataset("digits", image_size=8, split="test")
    assert not digits.has_captions and set(digits.batch(torch.arange(2))) == {"images", "labels"}


@pytest.mark.parametrize("write, message", [
    (lambda root: (root / "01.txt").write_text(" \n\t"), r"caption file .*01\.txt is empty"),
    (lambda root: (root / "02.txt").write_bytes("caf\xe9".encode("latin-1")),
     r"caption file .*02\.txt is not UTF-8 text \(byte 0xe9 at offset 3\)"),
    (lambda root: (root / "metadata.jsonl").write_text('{"file_name": "00.png", "text": "fine"}\n'
                                                       '{"file_name": "01.png", text}\n'),
     r"metadata.jsonl line 2 is not JSON"),
    (lambda root: (root / "metadata.jsonl").write_text('{"file_name": "00.png", "text": "fine"}\n'
                                                       '{"file_name": "01.png", "text": " "}'),
     r"metadata.jsonl line 2: the caption \(text\) of 01.png is empty"),
], ids=["empty caption file", "caption file not utf-8", "metadata line not json", "empty caption in metadata"])
def test_a_bad_caption_is_named(tmp_path, write, message):
    root = numbered_folder(tmp_path / "data", 3)
    write(root)
    with pytest.raises(DataError, match=message):
        open_dataset(str(root), split="all")


def test_a_named_caption_column_in_metadata(tmp_path):
    root = numbered_folder(tmp_path / "data", 2)
    rows = [{"file_name": f"0{i}.png", "text": "ignored", "caption_de": f"Bild {i}"} for i in range(2)]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert open_dataset(str(root), split="all", caption_column="caption_de").captions == ["Bild 0", "Bild 1"]
    assert open_dataset(str(root), split="all").captions == ["ignored", "ignored"]
    with pytest.raises(DataError, match=r"has no column 'caption_fr' \(it has: file_name, text, caption_de\)"):
        open_dataset(str(root), split="all", caption_column="caption_fr")


def test_a_caption_column_on_data_without_columns_is_refused():
    with pytest.raises(DataError, match="--caption-column is for folders with metadata files"):
        open_dataset("digits", caption_column="text")


def test_a_hugging_face_dataset_with_a_caption_column(tmp_path):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "prompt": datasets.Value("string"),
                                  "text": datasets.Value("string")})
    rows = {"image": [solid((v, 0, 0)) for v in (0, 100, 200)], "prompt": ["dark", None, "bright"],
            "text": ["t0", "t1", "t2"]}
    (tmp_path / "data").mkdir()
    datasets.Dataset.from_dict(rows, features=features).to_parquet(tmp_path / "data" / "train-00000-of-00001.parquet")
    assert open_dataset(f"hf:{tmp_path}", image_size=8, split="all").captions == ["t0", "t1", "t2"]  # found by name
    data = open_dataset(f"hf:{tmp_path}", image_size=8, split="all", caption_column="prompt")
    assert data.captions == ["dark", "", "bright"]
    assert data.batch(torch.tensor([2]))["captions"] == ["bright"]
    with pytest.raises(DataError, match=r"1 of the 3 images .* have no caption \(row 1\)"):
        open_dataset(f"hf:{tmp_path}", image_size=8, split="all", caption_column="prompt", strict=True)
    with pytest.raises(DataError, match=r"has no column 'caption' for captions \(text columns: prompt, text\)"):
        open_dataset(f"hf:{tmp_path}", image_size=8, caption_column="caption")


def test_imagefolder_metadata_through_the_datasets_library(tmp_path):
    root = numbered_folder(tmp_path / "data", 3)
    (root / "metadata.jsonl").write_text("\n".join(
        json.dumps({"file_name": f"0{i}.png", "text": f"number {i}"}) for i in range(3)))
    data = open_dataset(f"imagefolder:{root}", image_size=8, split="all")
    assert sorted(data.captions) == ["number 0", "number 1", "number 2"]
    assert all(number_of(data.batch(torch.tensor([i]))["images"][0]) == int(c[-1]) for i, c in enumerate(data.captions))


def test_caption_template_on_labelled_data(labelled_folder):
    digits = open_dataset("digits", image_size=8, split="test", caption_template="a photo of a {label}")
    assert digits.captions == [f"a photo of a {label}" for label in digits.labels.tolist()]
    folder = open_dataset(str(labelled_folder), image_size=8, split="all", caption_template="{label} {{square}}")
    assert set(folder.captions) == {"red {square}", "blue {square}"}


def test_caption_template_needs_labels_and_a_label_field(tmp_path):
    with pytest.raises(DataError, match="--caption-template needs labelled data"):
        open_dataset(str(numbered_folder(tmp_path / "data", 3)), split="all", caption_template="a {label}")
    with pytest.raises(DataError, match="has no {label}"):
        open_dataset("digits", caption_template="a photo of a digit")
    with pytest.raises(DataError, match="cannot be filled"):
        open_dataset("digits", caption_template="a {label} of {size}")


def test_captions_travel_through_the_stream_and_resume_from_memory_and_disk(tmp_path):
    root = numbered_folder(tmp_path / "data", 12)
    for i in range(12):
        (root / f"{i:02d}.txt").write_text(f"image number {i}")
    memory = open_dataset(str(root), split="all")
    disk = open_dataset(str(root), split="all", memory_limit_mb=0)
    assert isinstance(disk, StreamedImages) and disk.has_captions
    a, b = BatchStream(memory, 5, seed=2, flip=True), BatchStream(disk, 5, seed=2, flip=True)
    for _ in range(4):  # across an epoch boundary
        x, y = next(a), next(b)
        assert x["captions"] == y["captions"] and len(x["captions"]) == 5
        assert [f"image number {number_of(image)}" for image in x["images"]] == x["captions"]
    saved = a.state_dict()
    expected = [next(a)["captions"] for _ in range(4)]
    resumed = BatchStream(open_dataset(str(root), split="all", memory_limit_mb=0), 5, seed=2, flip=True)
    resumed.load_state_dict(saved)
    assert [next(resumed)["captions"] for _ in range(4)] == expected
    shards = [next(BatchStream(memory, 3, seed=4, rank=r, world_size=2))["captions"] for r in range(2)]
    assert shards[0] + shards[1] == next(BatchStream(memory, 6, seed=4))["captions"]
    b.close()
    resumed.close()
