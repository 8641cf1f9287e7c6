"""Textual inversion: learnt tokens (`<birb-style>`) as new rows of the text encoder's token embedding.

`load_embedding(model, spec)` reads an embedding file and adds its token(s) to the tokenizer and its
vectors to the text encoder exactly as diffusers' `load_textual_inversion` does: the embedding matrix
resized to the tokenizer's length plus the new tokens, one added token per vector (`<tok>`, `<tok>_1`,
... for an embedding of several vectors), each row set to its vector. Prompts then name the token, and
`expand_tokens` (diffusers' own `maybe_convert_prompt`) writes a token of several vectors out as all of
them, as diffusers' pipelines do before they tokenize.

The files diffusers reads: `learned_embeds.safetensors` ({token: vectors}), A1111/civitai embeddings
(`emb_params` in a .safetensors file, `string_to_param` in a .pt), a bare tensor; a folder or run folder
holding learned_embeds.safetensors. A pickle (.pt/.bin) loads only with `allow_pickle`, through
`torch.load(weights_only=True)`. Everything is checked before the model is touched, and bad input is a
one-line `ModelError`: a missing, empty or damaged file, vectors of another width, NaN or infinite
values, a token the tokenizer already has.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from difflab.errors import ModelError
from difflab.layout import EMBEDDING_FILE, EMBEDDING_PICKLE, PICKLE_SUFFIXES, RUN_MODEL, Kind, what_is_at

A1111_KEY = "emb_params"  # the one tensor of an A1111/civitai .safetensors embedding


@dataclass(frozen=True)
class Embedding:
    """An embedding read from a file: the token it is used by, and its vectors [N, D]."""

    source: Path
    token: str
    vectors: torch.Tensor

    @property
    def tokens(self) -> list[str]:
        """The tokens added for it, one per vector: `<tok>`, `<tok>_1`, ... (diffusers' names)."""
        return [self.token] + [f"{self.token}_{i}" for i in range(1, len(self.vectors))]


def split_spec(spec: str | Path) -> tuple[Path, str | None]:
    """`FILE[:TOKEN]` -> (FILE, TOKEN or None). A path that exists is a file even if it holds a colon."""
    text = str(spec)
    if Path(text).expanduser().exists() or ":" not in text:
        return Path(text).expanduser(), None
    path, token = text.rsplit(":", 1)
    if not token.strip():
        raise ModelError(f"--embedding {spec}: the token after ':' is empty; give FILE or FILE:TOKEN")
    return Path(path).expanduser(), token.strip()


def embedding_file(path: Path, allow_pickle: bool = False) -> Path:
    """The embedding file at `path`: the file itself, or learned_embeds.safetensors in a folder (a run
    folder's model/)."""
    if path.is_dir():
        folder = path / RUN_MODEL if what_is_at(path) in (Kind.RUN, Kind.LORA_RUN) else path
        for name in (EMBEDDING_FILE, EMBEDDING_PICKLE):
            if (folder / name).is_file():
                return folder / name
        raise ModelError(f"{path} holds no {EMBEDDING_FILE}; give the embedding file itself")
    if not path.is_file():
        raise ModelError(f"embedding {path} does not exist; give a textual inversion file ({EMBEDDING_FILE}, an "
                         "A1111 .safetensors) or the run folder that saved one")
    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise ModelError(f"{path} is a pickle, and unpickling can run code hidden in it: convert it to safetensors, or "
                         "pass --allow-pickle to load it with torch.load(weights_only=True)")
    return path


def read_embedding(spec: str | Path, token: str | None = None, *, allow_pickle: bool = False) -> Embedding:
    """The embedding at `spec` (`FILE[:TOKEN]`, or a folder), under `token` when given (else the file's
    own token; an A1111 file's is its file name, as A1111 names it)."""
    path, given = split_spec(spec)
    token = token or given
    path = embedding_file(path, allow_pickle)
    if path.stat().st_size == 0:
        raise ModelError(f"embedding {path} is empty (0 bytes): download or save it again")
    state = read_pickle(path) if path.suffix.lower() in PICKLE_SUFFIXES else read_safetensors(path)
    found, vectors = tensor_of(state, path)
    token = token or (path.stem if found in (A1111_KEY, None) else found)
    if vectors.dim() == 1:
        vectors = vectors[None]
    if vectors.dim() != 2 or vectors.shape[0] < 1:
        raise ModelError(f"embedding {path} holds a tensor of shape {list(vectors.shape)}, not vectors [count, width]")
    bad = int((~torch.isfinite(vectors.float())).sum())
    if bad:
        raise ModelError(f"embedding {path} is damaged: {bad} of its {vectors.numel()} values are NaN or infinite; "
                         "download or train it again")
    return Embedding(path, token, vectors.detach())


def read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelError(f"cannot read the embedding {path} ({_one_line(e)}): the file is damaged or not "
                         "safetensors") from None


def read_pickle(path: Path):
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise ModelError(f"cannot read the embedding {path} with torch.load(weights_only=True) ({_one_line(e)}); "
                         "it is damaged, or holds more than tensors") from None


def tensor_of(state, path: Path) -> tuple[str | None, torch.Tensor]:
    """(the name the file gives its token, the vectors), as diffusers' `_retrieve_tokens_and_embeddings`
    reads the formats: a bare tensor; one {token: tensor}; A1111's {"name", "string_to_param": {"*"}}."""
    if isinstance(state, torch.Tensor):
        return None, state
    if not isinstance(state, dict) or not state:
        raise ModelError(f"embedding {path} holds no tensor")
    if "string_to_param" in state:  # A1111's .pt
        param = state["string_to_param"]
        if not isinstance(param, dict) or not isinstance(param.get("*"), torch.Tensor):
            raise ModelError(f"embedding {path} has an A1111 string_to_param without its '*' tensor")
        name = state.get("name")
        return (name if isinstance(name, str) and name else None), param["*"]
    if "string_to_param.*" in state:  # the same, flattened into a .safetensors file
        return None, state["string_to_param.*"]
    if len(state) == 1:
        key, value = next(iter(state.items()))
        if isinstance(value, torch.Tensor):
            return key, value
    names = ", ".join(sorted(map(str, state))[:4]) + (", ..." if len(state) > 4 else "")
    sdxl = " (an SDXL embedding, for two text encoders?)" if {"clip_l", "clip_g"} <= set(state) else ""
    raise ModelError(f"embedding {path} holds {len(state)} entries ({names}){sdxl}, not one token's vectors; "
                     "difflab reads diffusers' learned_embeds files and A1111 embeddings")


# ---- the model's side ---------------------------------------------------------------------------------

def check_fits(embedding: Embedding, prompts) -> None:
    """Its vectors have the text encoder's width, and none of its tokens is in the tokenizer yet."""
    if prompts is None:
        raise ModelError(f"embedding {embedding.source}: this model has no text encoder; textual inversion "
                         "embeddings are for text-to-image models")
    width = prompts.text_encoder.get_input_embeddings().weight.shape[-1]
    if embedding.vectors.shape[-1] != width:
        raise ModelError(f"embedding {embedding.source} has vectors {embedding.vectors.shape[-1]} wide and this "
                         f"model's text encoder takes {width}: it was made for another model (Stable Diffusion 1.x "
                         "takes 768, 2.x 1024)")
    vocabulary = prompts.tokenizer.get_vocab()
    taken = [t for t in embedding.tokens + [f"{embedding.token}_1"] if t in vocabulary]
    if taken:
        raise ModelError(f"token {taken[0]!r} of embedding {embedding.source} is already in the tokenizer; give it "
                         f"another with {embedding.source}:<other-token>")


def add_token_rows(prompts, tokens: list[str], rows: torch.Tensor) -> list[int]:
    """Add `tokens` to the tokenizer and `rows` [len(tokens), D] to the text encoder's embedding, as
    diffusers does (the matrix resized to the tokenizer's length, each row set); returns the new ids."""
    tokenizer, encoder = prompts.tokenizer, prompts.text_encoder
    weight = encoder.get_input_embeddings().weight
    device, dtype = weight.device, weight.dtype
    # Every new row is set below: transformers' mean resizing (a covariance of the whole matrix, with a note
    # in the log) would be work thrown away, and the new matrix's random start must not move the caller's
    # global generator (loading an embedding changes no later random draw).
    with torch.random.fork_rng(devices=[weight.device.index or 0] if weight.is_cuda else []):
        encoder.resize_token_embeddings(len(tokenizer) + len(tokens), mean_resizing=False)
    weight = encoder.get_input_embeddings().weight
    ids = []
    for token, row in zip(tokens, rows):
        tokenizer.add_tokens(token)
        ids.append(tokenizer.convert_tokens_to_ids(token))
        weight.data[ids[-1]] = row.to(device, dtype)
    return ids


def load_embedding(model, spec: str | Path, token: str | None = None, *, allow_pickle: bool = False) -> list[str]:
    """Load a textual inversion embedding onto `model` (see the module's text); returns its tokens, the
    first of which prompts use."""
    embedding = read_embedding(spec, token, allow_pickle=allow_pickle)
    check_fits(embedding, model.prompts)
    add_token_rows(model.prompts, embedding.tokens, embedding.vectors)
    return embedding.tokens


def load_embeddings(model, specs, *, allow_pickle: bool = False) -> list[str]:
    """`--embedding FILE[:TOKEN]`, repeated: each loaded in order; returns the token prompts use for each."""
    return [load_embedding(model, spec, allow_pickle=allow_pickle)[0] for spec in specs or []]


def expand_tokens(prompts: list[str], tokenizer) -> list[str]:
    """Each token of several vectors written out as all of them (`<tok>` -> `<tok> <tok>_1 <tok>_2`), by
    diffusers' own `maybe_convert_prompt`: what its pipelines do to every prompt before tokenizing."""
    from diffusers.loaders.textual_inversion import TextualInversionLoaderMixin

    return TextualInversionLoaderMixin().maybe_convert_prompt(list(prompts), tokenizer)


def learned_tokens(tokenizer) -> list[str]:
    """The textual inversion tokens a tokenizer holds (added, not special; without the `_N` extra vectors)."""
    added = [t.content for t in tokenizer.added_tokens_decoder.values() if not t.special]
    return [t for t in added if not (t.rsplit("_", 1)[-1].isdigit() and t.rsplit("_", 1)[0] in added)]


def _one_line(error: Exception, limit: int = 200) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


__all__ = ["Embedding", "load_embedding", "load_embeddings", "read_embedding", "expand_tokens", "add_token_rows",
           "learned_tokens"]
