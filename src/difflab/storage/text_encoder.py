"""A CLIP tokenizer and text encoder read from a folder (or a Hub id), checked to belong together."""

from __future__ import annotations

from pathlib import Path

from difflab.errors import ModelError

TOKENIZER_FILES = ("tokenizer.json", "vocab.json")  # a CLIP tokenizer is one or the other (with merges.txt)


def load_text_encoder(spec: str | Path, what: str | None = None):
    """A CLIP tokenizer and text encoder from a folder that holds them (a Stable Diffusion folder's
    tokenizer/ and text_encoder/, or one folder with both), or a Hub id. `what` names it in errors."""
    from transformers import CLIPTextModel, CLIPTokenizer

    path = Path(spec).expanduser()
    local = path.is_dir()
    if path.exists() and not local:
        raise ModelError(f"--text-encoder {spec} is a file; give the folder that holds the text encoder")
    nested = (path / "text_encoder").is_dir() if local else True
    if local:
        check_tokenizer_files(path / "tokenizer" if nested else path, what or spec)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # loading takes a moment; its bar is not the user's business
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(path if local else spec),
                                                  subfolder="tokenizer" if nested else "")
        text_encoder = CLIPTextModel.from_pretrained(str(path if local else spec),
                                                     subfolder="text_encoder" if nested else "", use_safetensors=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        from difflab.storage.damage import first_line, part_problem

        problem = None
        if local:  # name the part that does not load, and why (the libraries do not)
            parts = (("tokenizer", "CLIPTokenizer"), ("text_encoder", "CLIPTextModel"))
            problem = next((f"its {name}/ {p}" for name, cls in parts
                            if (p := part_problem(path / name if nested else path, "transformers", cls))), None)
        if problem:
            raise ModelError(f"cannot load the text encoder of {what or spec}: {problem}; the folder is damaged: save "
                             "or download it again") from None
        raise ModelError(f"cannot load a CLIP text encoder and tokenizer from {what or spec} ({first_line(e)}); give "
                         "a Stable Diffusion folder or a folder with tokenizer/ and text_encoder/") from None
    check_tokenizer_fits(tokenizer, text_encoder, what or spec)
    return tokenizer, text_encoder.eval()


def check_tokenizer_files(folder: Path, what) -> None:
    """A text encoder comes with the tokenizer it was trained with: transformers makes an empty one (two
    tokens, no length limit) from a folder that has none, which fails at the first prompt."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        where = "a tokenizer/ folder beside its text_encoder/" if folder.name == "tokenizer" else "its tokenizer files"
        raise ModelError(f"{what} has no tokenizer ({folder} holds no {' or '.join(TOKENIZER_FILES)}); give the "
                         f"folder with {where}: a text encoder reads only the tokens of the tokenizer it was "
                         "trained with")


def check_tokenizer_fits(tokenizer, text_encoder, what) -> None:
    """The tokenizer's ids and length fit the text encoder's embeddings."""
    config = text_encoder.config
    if len(tokenizer) > config.vocab_size:
        raise ModelError(f"the tokenizer of {what} has {len(tokenizer)} tokens and its text encoder embeds "
                         f"{config.vocab_size}: they do not belong together; give the text encoder's own tokenizer")
    if tokenizer.model_max_length > config.max_position_embeddings:
        if tokenizer.model_max_length < 10**6:  # a length set, and wrong
            raise ModelError(f"the tokenizer of {what} takes prompts of {tokenizer.model_max_length} tokens and its "
                             f"text encoder {config.max_position_embeddings}: give the text encoder's own tokenizer")
        tokenizer.model_max_length = config.max_position_embeddings  # unset in tokenizer_config.json
