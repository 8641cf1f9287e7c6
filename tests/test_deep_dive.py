"""docs/stable-diffusion.md's "Stable Diffusion Deep Dive" section, run as written on tiny Stable
Diffusion components: tokenizer, text encoder, embeddings edited and mixed, the one loop by hand,
the VAE — and the same image through `generate`, from the mixed embeddings and from the blend."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import tiny_sd

DOC = Path(__file__).parent.parent / "docs" / "stable-diffusion.md"


def deep_dive_code() -> list[str]:
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## Stable Diffusion Deep Dive", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_deep_dive_runs_as_written_and_its_blend_is_the_blend_feature(tmp_path, monkeypatch):
    folder = tiny_sd.build(tmp_path / "sd", "text")
    blocks = deep_dive_code()
    assert len(blocks) >= 6 and "path/to/sd-folder" in blocks[0] and sum("steps=25" in b for b in blocks) == 2
    monkeypatch.chdir(tmp_path)
    names: dict = {}
    for block in blocks:
        code = block.replace("path/to/sd-folder", str(folder)).replace("steps=25", "steps=4")  # as written, shorter
        exec(compile(code, str(DOC), "exec"), names)
    model = names["model"]
    encode = model.prompts.encode
    assert names["tokens"][0] == "<|startoftext|>" and len(names["tokens"]) == tiny_sd.PROMPT_TOKENS
    assert names["token_vectors"].shape == (1, tiny_sd.PROMPT_TOKENS, tiny_sd.TEXT_WIDTH)
    assert torch.equal(names["mouse"], encode(["a mouse"]))
    assert not torch.equal(names["edited"], names["mouse"])  # the hook changed what the transformer saw
    assert torch.equal(encode(["a mouse"]), names["mouse"])  # and was removed
    by_hand = names["by_hand"]
    assert by_hand.shape == (1, 3, 16, 16) and torch.isfinite(by_hand).all()
    assert 0 <= by_hand.min() and by_hand.max() <= 1 and by_hand.std() > 0.01  # an image, not a constant
    assert torch.equal(names["from_embeddings"], by_hand)  # generate with the mixed embeddings = the loop by hand
    assert torch.equal(names["blended"], by_hand)  # and = the blend feature
    assert not torch.equal(names["edited_image"], by_hand)
    assert (tmp_path / "mouse-leopard.png").is_file()
