"""A CLIP-style BPE tokenizer trained on a list of captions.

The `tokenizers` library learns byte-level BPE merges with CLIP's pipeline (NFC, white space runs to
one space, lowercase; CLIP's word-splitting pattern; words end in `</w>`); the result is saved the
way `transformers` saves a `CLIPTokenizer` (vocab.json, merges.txt, tokenizer_config.json with
`model_max_length`, and tokenizer.json), so `CLIPTokenizer.from_pretrained(folder)` loads it with
plain transformers, and a Stable Diffusion folder can carry it.

Every letter, digit and ASCII punctuation mark is in the vocabulary, both inside and at the end of
a word, so any lowercase ASCII prompt encodes without unknown tokens, even in words the captions
never used; other characters the captions did not contain become `<|endoftext|>` (CLIP's unknown
token).
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable
from pathlib import Path

from difflab.errors import DataError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
SUFFIX = "</w>"
# CLIP's pattern (as transformers writes it): special tokens, contractions, letters, single digits, other marks
SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
BASE_CHARACTERS = string.ascii_lowercase + string.digits + string.punctuation
DEFAULT_VOCAB_SIZE = 320
DEFAULT_MAX_LENGTH = 77  # CLIP's; Stable Diffusion pads every prompt to it


def _pipeline():
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    tokenizer = Tokenizer(BPE(unk_token=EOS, continuing_subword_prefix="", end_of_word_suffix=SUFFIX))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tokenizer(captions: Iterable[str], folder: str | Path, vocab_size: int = DEFAULT_VOCAB_SIZE,
                    model_max_length: int = DEFAULT_MAX_LENGTH):
    """Learn BPE merges from `captions` until the vocabulary has about `vocab_size` tokens (fewer when
    the captions need fewer), save a CLIPTokenizer in `folder` and return it."""
    from tokenizers.trainers import BpeTrainer
    from transformers import CLIPTokenizer

    captions = [c for c in captions if c and c.strip()]
    if not captions:
        raise DataError("cannot train a tokenizer without captions; give the data captions first")
    tokenizer = _pipeline()
    trainer = BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS], end_of_word_suffix=SUFFIX,
                         continuing_subword_prefix="", initial_alphabet=list(BASE_CHARACTERS), show_progress=False)
    tokenizer.train_from_iterator(captions, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    # The trainer numbers the word-final characters it saw in an order that changes from process to process
    # (ties broken by a randomly seeded hash map): they keep their ids, given out in character order, so
    # that the same captions give the same tokenizer, hence the same run, in every process.
    ends = [t for t in vocab if len(t) == 1 + len(SUFFIX) and t.endswith(SUFFIX)]
    vocab.update(zip(sorted(ends), sorted(vocab[t] for t in ends)))
    vocab = dict(sorted(vocab.items(), key=lambda item: item[1]))
    for c in BASE_CHARACTERS:  # every base character at a word's end, too (the trainer adds only those it saw)
        vocab.setdefault(c + SUFFIX, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length).save_pretrained(str(folder))
    _write_plain_files(folder, vocab, merges)
    return CLIPTokenizer.from_pretrained(str(folder))


def _write_plain_files(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """vocab.json and merges.txt, which CLIP tokenizers everywhere read (transformers 5 writes only
    tokenizer.json)."""
    if not (folder / "vocab.json").is_file():
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    if not (folder / "merges.txt").is_file():
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                             encoding="utf-8")
