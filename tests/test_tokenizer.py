"""Tokenizers trained on captions load in plain transformers and give the captions back."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from difflab.data import open_dataset
from difflab.errors import DataError
from difflab.models.tokenizer import train_tokenizer


def test_the_tiny_tokenizer_loads_in_transformers_and_round_trips_captions(tiny_tokenizer):
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    captions = open_dataset("shapes:n=100,objects=2,seed=7", split="all").captions  # not those it was trained on
    for cls in (CLIPTokenizer, CLIPTokenizerFast):
        tokenizer = cls.from_pretrained(str(tiny_tokenizer))
        assert tokenizer.model_max_length == 32 and len(tokenizer) < 400
        for caption in captions:
            ids = tokenizer(caption).input_ids
            assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
            assert len(ids) == len(caption.split()) + 2  # every word of a shapes caption is one token
            assert tokenizer.decode(ids, skip_special_tokens=True) == caption
    tokens = tokenizer.tokenize("a red circle")
    assert tokens == ["a</w>", "red</w>", "circle</w>"]
    padded = tokenizer("a red circle", padding="max_length", max_length=32, truncation=True).input_ids
    assert len(padded) == 32 and padded[4:] == [tokenizer.pad_token_id] * 28
    assert tokenizer.pad_token == tokenizer.eos_token == tokenizer.unk_token == "<|endoftext|>"
    config = json.loads((tiny_tokenizer / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 32 and config["bos_token"] == "<|startoftext|>"


def test_new_words_and_capitals_encode_without_unknown_tokens(tiny_tokenizer):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(tiny_tokenizer))
    ids = tokenizer("A  Zebra-crossing, at 42!").input_ids
    assert tokenizer.unk_token_id not in ids[1:-1]
    assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == "azebra-crossing,at42!"


def test_the_plain_vocab_and_merges_files_load_alone(tiny_tokenizer, tmp_path):
    from transformers import CLIPTokenizer

    assert (tiny_tokenizer / "merges.txt").read_text().startswith("#version: 0.2\n")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):  # what older libraries read
        shutil.copy(tiny_tokenizer / name, tmp_path / name)
    caption = "a large purple triangle at the top right on a grey background"
    plain = CLIPTokenizer.from_pretrained(str(tmp_path))
    assert plain(caption).input_ids == CLIPTokenizer.from_pretrained(str(tiny_tokenizer))(caption).input_ids


def test_a_tokenizer_needs_captions(tmp_path):
    with pytest.raises(DataError, match="cannot train a tokenizer without captions"):
        train_tokenizer(["", "  "], tmp_path)


def test_the_same_captions_give_the_same_tokenizer_in_every_process(tmp_path):
    """The BPE trainer orders word-final characters by a hash map seeded anew in each process; the ids are
    given out in character order instead, so a run that learns its tokenizer again (after a crash, on
    another machine) is the same run."""
    learn = ("import sys; from difflab.data import open_dataset; from difflab.models.tokenizer import train_tokenizer; "
             "train_tokenizer(open_dataset('shapes:n=48', split='all').captions, sys.argv[1])")
    for name in ("a", "b"):  # two other processes, and this one: three hash seeds
        subprocess.run([sys.executable, "-c", learn, str(tmp_path / name)], check=True, env=os.environ.copy(),
                       timeout=120)
    exec(learn.replace("sys.argv[1]", repr(str(tmp_path / "c"))), {})
    vocabularies = [(tmp_path / name / "vocab.json").read_text() for name in ("a", "b", "c")]
    assert vocabularies[0] == vocabularies[1] == vocabularies[2]
