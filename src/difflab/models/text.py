"""Prompts to the sequence a text-conditioned UNet attends to: a tokenizer and a text encoder
(transformers' CLIP classes), used exactly as Stable Diffusion's pipelines use them."""

from __future__ import annotations

import logging

import torch

from difflab.errors import ModelError
from difflab.models.embeddings import expand_tokens

log = logging.getLogger("difflab")


class PromptEncoder:
    def __init__(self, tokenizer, text_encoder):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder

    @property
    def max_tokens(self) -> int:
        return self.tokenizer.model_max_length

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    def token_ids(self, prompts: list[str]) -> torch.Tensor:
        """Token ids padded to the tokenizer's length; what does not fit is dropped (as in diffusers),
        and said in a warning that names the dropped words."""
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.max_tokens, truncation=True,
                             return_tensors="pt").input_ids
        self.warn_truncated(prompts)
        return ids

    def warn_truncated(self, prompts: list[str]) -> None:
        for prompt in dict.fromkeys(prompts):
            full = self.tokenizer(prompt).input_ids
            if len(full) > self.max_tokens:
                dropped = full[self.max_tokens - 1:-1]  # the end-of-text token is kept
                words = self.tokenizer.decode(dropped).strip()
                log.warning("prompt %r is longer than the text encoder's %d tokens: %d tokens dropped (%r)",
                            _short(prompt), self.max_tokens, len(dropped), words)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Prompt embeddings [len(prompts), max_tokens, D], the text encoder's last hidden state."""
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ModelError("prompts must be a list of strings")
        prompts = expand_tokens(prompts, self.tokenizer)  # a textual inversion token of several vectors: all of them
        ids = self.token_ids(prompts).to(self.device)
        config = self.text_encoder.config
        mask = None
        if getattr(config, "use_attention_mask", False):
            mask = self.tokenizer(prompts, padding="max_length", max_length=self.max_tokens, truncation=True,
                                  return_tensors="pt").attention_mask.to(self.device)
        return self.text_encoder(ids, attention_mask=mask)[0].to(self.text_encoder.dtype)


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."
