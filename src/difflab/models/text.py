"""Prompts to the sequence a text-conditioned UNet attends to: a tokenizer and a text encoder
(transformers' CLIP classes).

A plain prompt (no weights, no BREAK, within the tokenizer's limit) is encoded exactly as Stable
Diffusion's pipelines encode it. A prompt in AUTOMATIC1111's syntax (`(word:1.3)`, `(word)`, `[word]`,
`BREAK`; read by models/prompt_syntax.py), or one longer than the limit, is encoded by compel: split
into chunks of the tokenizer's length (75 tokens between the start and end tokens), each chunk
through the text encoder, the chunks concatenated — a sequence the UNet's cross-attention takes
whole — and each token's embedding weighted. See docs/prompts.md.
"""

from __future__ import annotations

import logging

import torch

from difflab.errors import ModelError
from difflab.models.embeddings import expand_tokens
from difflab.models.prompt_syntax import Piece, parse_prompt, plain_text

log = logging.getLogger("difflab")
SHOWN_WORDS = 6  # of the words a truncation drops, the warning shows these


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
        """Token ids padded to the tokenizer's length; what does not fit is dropped (as in diffusers)."""
        return self.tokenizer(prompts, padding="max_length", max_length=self.max_tokens, truncation=True,
                              return_tensors="pt").input_ids

    def length(self, prompt: str, long: bool = True) -> int:
        """How long the embedding sequence of `prompt` is: the tokenizer's length, or (with `long`)
        a multiple of it for a prompt of several chunks. Raises InputError on bad syntax."""
        segments = self.parse(prompt)
        if not long or self._fits(plain_text(segments)):
            return self.max_tokens
        provider = self._compel(long).conditioning_provider
        return sum(len(provider.get_token_ids_and_expand_weights([t for t, _ in segment], [w for _, w in segment],
                                                                device="cpu")[0]) for segment in segments)

    def parse(self, prompt: str) -> list[list[Piece]]:
        """`prompt` read in A1111's syntax, each textual inversion token of several vectors written out as
        all of them (as diffusers' pipelines do before tokenizing)."""
        return parse_prompt(expand_tokens([prompt], self.tokenizer)[0])

    def warn_truncated(self, prompts: list[str]) -> None:
        """One short line per prompt that the tokenizer's limit cuts (for models that take no longer
        context): how many tokens are dropped, and the first of their words."""
        for prompt in dict.fromkeys(prompts):
            text = " ".join(text for segment in self.parse(prompt) for text, _ in segment)
            ids = self.tokenizer(text, verbose=False).input_ids[1:-1]  # without the start and end tokens
            kept = self.max_tokens - 2
            if len(ids) <= kept:
                continue
            whole, before = self.tokenizer.decode(ids).strip(), self.tokenizer.decode(ids[:kept]).strip()
            mid_word = whole.startswith(before) and whole[len(before):len(before) + 1] not in ("", " ")
            words = self.tokenizer.decode(ids[kept:kept + 3 * SHOWN_WORDS]).split()
            more = len(words) > SHOWN_WORDS or len(ids) - kept > 3 * SHOWN_WORDS
            shown = "…" * mid_word + " ".join(words[:SHOWN_WORDS]) + " …" * more
            log.warning("prompt longer than the text encoder's %d tokens: %d tokens dropped, from %r",
                        self.max_tokens, len(ids) - kept, shown)

    @torch.no_grad()
    def encode(self, prompts: list[str], length: int | None = None, long: bool = True) -> torch.Tensor:
        """Prompt embeddings [len(prompts), L, D] from the text encoder's last hidden state. L is
        `length`, or the longest prompt's (the shorter are padded with the empty prompt's embeddings, as
        A1111 and compel pad). With `long` False, each prompt is cut to one chunk (as diffusers does)."""
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ModelError("prompts must be a list of strings")
        parsed = [self.parse(p) for p in prompts]
        texts = [plain_text(segments) for segments in parsed]
        plain = [i for i, text in enumerate(texts) if text is not None and (not long or self._fits(text))]
        out: list[torch.Tensor | None] = [None] * len(prompts)
        if plain:
            for i, embedding in zip(plain, self._encode_plain([texts[i] for i in plain])):
                out[i] = embedding[None]
        if len(plain) < len(prompts):
            compel = self._compel(long)
            for i, segments in enumerate(parsed):
                if out[i] is None:
                    out[i] = self._encode_weighted(compel, segments if long else [sum(segments, [])])
        length = length or max(e.shape[1] for e in out)
        return torch.cat([self.pad(e, length) for e in out])

    def pad(self, embeddings: torch.Tensor, length: int) -> torch.Tensor:
        """`embeddings` [B, L, D] padded to `length` with the empty prompt's embeddings, chunk after chunk."""
        have = embeddings.shape[1]
        if have > length:
            raise ModelError(f"prompt embeddings of {have} tokens cannot be padded to {length}")
        if have == length:
            return embeddings
        empty = self._encode_plain([""]).to(embeddings.dtype)
        chunks = -(-(length - have) // self.max_tokens)
        fill = empty.repeat(embeddings.shape[0], chunks, 1)[:, :length - have]
        return torch.cat([embeddings, fill], dim=1)

    def _fits(self, text: str | None) -> bool:
        return text is not None and len(self.tokenizer(text, verbose=False).input_ids) <= self.max_tokens

    def _encode_plain(self, texts: list[str]) -> torch.Tensor:
        """As diffusers' pipelines encode prompts."""
        ids = self.token_ids(texts).to(self.device)
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = self.tokenizer(texts, padding="max_length", max_length=self.max_tokens, truncation=True,
                                  return_tensors="pt").attention_mask.to(self.device)
        return self.text_encoder(ids, attention_mask=mask)[0].to(self.text_encoder.dtype)

    def _compel(self, long: bool):
        # Made for each call: compel keeps the empty prompt's embeddings, which a LoRA changes.
        from compel import Compel, SplitLongTextMode

        # compel tokenizes a long prompt whole before it chunks it; transformers' warning that such a
        # sequence would overflow the text encoder is not true here.
        told = getattr(self.tokenizer, "deprecation_warnings", {})
        told["sequence-length-is-longer-than-the-specified-maximum"] = True
        return Compel(tokenizer=self.tokenizer, text_encoder=self.text_encoder, truncate_long_prompts=not long,
                      split_long_text_mode=SplitLongTextMode.PHRASES, device=self.device)

    def _encode_weighted(self, compel, segments: list[list[Piece]]) -> torch.Tensor:
        """One prompt's segments (split at BREAK) each chunked and weighted by compel, concatenated."""
        from compel.prompt_parser import Conjunction, FlattenedPrompt

        conjunction = Conjunction([FlattenedPrompt([(text, float(weight)) for text, weight in segment])
                                   for segment in segments])
        embeddings, _ = compel.build_conditioning_tensor_for_conjunction(conjunction)
        return embeddings.to(self.text_encoder.dtype)


def mix(embeddings: torch.Tensor, blends: list[tuple[torch.Tensor, float]]) -> torch.Tensor:
    """(1 − Σw)·embeddings + Σ w·other: prompts' embeddings blended (the Deep Dive's mouse and leopard)."""
    mixed = (1 - sum(weight for _, weight in blends)) * embeddings
    for other, weight in blends:
        mixed = mixed + weight * other
    return mixed
