"""AUTOMATIC1111's prompt syntax, read into weighted pieces of text; and the blend specs.

`(word)` multiplies the weight of what it holds by 1.1, `[word]` divides it by 1.1, `(word:1.3)` sets
a factor of 1.3; groups nest and their factors multiply. `BREAK` (in capitals, a word of its own)
starts a new 75-token chunk. `\\(`, `\\)`, `\\[`, `\\]`, `\\:` and `\\\\` are the characters themselves.

The result is a list of segments (split at BREAK), each a list of `(text, weight)` pieces in which
neighbours of equal weight are joined, so `a (red:1) ball` is the one piece `("a red ball", 1.0)`.
compel turns the pieces into embeddings (models/text.py); its own parser reads another syntax
(`(word)1.3`, `word+`), which treats A1111's `(word:1.3)` as text — see docs/prompts.md.

Unlike A1111, which reads any text somehow, mistakes are one-line `InputError`s: a bracket never
closed or closed by the other kind, a weight that is not a number, a negative weight.
"""

from __future__ import annotations

import math
import re

from difflab.errors import InputError

UP = 1.1  # (word) and [word], as in A1111
BREAK = re.compile(r"\s*\bBREAK\b\s*")
ESCAPES = {"\\(": "(", "\\)": ")", "\\[": "[", "\\]": "]", "\\:": ":", "\\\\": "\\"}
TOKEN = re.compile(r"\\[()\[\]:\\]|[()\[\]]|[^()\[\]\\]+|\\")
# A weight: what follows the last colon of a (group:WEIGHT), when it is one word (a colon followed by
# words, as in "(style: oil on canvas)", is text).
WEIGHT = re.compile(r":\s*(\S+)\s*$")

Piece = tuple[str, float]


def parse_prompt(prompt: str) -> list[list[Piece]]:
    """`prompt` -> segments (split at BREAK) of `(text, weight)` pieces; raises InputError on bad syntax."""
    segments: list[list[Piece]] = [[]]
    stack: list[tuple[str, int, list]] = []  # open brackets: kind, position, the pieces inside
    pieces: list = []  # the innermost group's pieces: (text, weight) or a BREAK marker (None)
    position = 0
    for match in TOKEN.finditer(prompt):
        token, position = match.group(), match.start()
        if token in ESCAPES:
            pieces.append((ESCAPES[token], 1.0))
        elif token in "([":
            stack.append((token, position, pieces))
            pieces = []
        elif token in ")]":
            if not stack:
                raise InputError(f"prompt syntax: {token!r} at character {position + 1} closes nothing "
                                 f"({_around(prompt, position)}); write \\{token} for the character itself")
            kind, opened, outer = stack.pop()
            if (kind, token) not in (("(", ")"), ("[", "]")):
                raise InputError(f"prompt syntax: {kind!r} at character {opened + 1} is closed by {token!r} "
                                 f"({_around(prompt, position)})")
            factor = _group_factor(pieces, prompt, opened) if kind == "(" else 1 / UP
            outer.extend(piece if piece is None else (piece[0], piece[1] * factor) for piece in pieces)
            pieces = outer
        else:
            parts = BREAK.split(token)
            for i, part in enumerate(parts):
                if i:
                    pieces.append(None)
                if part:
                    pieces.append((part, 1.0))
    if stack:
        kind, opened, _ = stack[-1]
        raise InputError(f"prompt syntax: {kind!r} at character {opened + 1} is never closed "
                         f"({_around(prompt, opened)}); write \\{kind} for the character itself")
    for piece in pieces:
        if piece is None:
            segments.append([])
        else:
            segments[-1].append(piece)
    joined = [_join(segment) for segment in segments]
    return [segment for segment in joined if segment] or [[("", 1.0)]]


def _group_factor(pieces: list, prompt: str, opened: int) -> float:
    """(…) multiplies by 1.1; (…:W) by W, taken off the group's last piece of text."""
    if not pieces or pieces[-1] is None:
        return UP
    text, weight = pieces[-1]
    colon = text.rfind(":")
    found = WEIGHT.search(text[colon:]) if colon >= 0 else None
    if found is None:  # escaped colons are pieces of their own, never found here
        return UP
    value = found.group(1)
    try:
        factor = float(value)
    except ValueError:
        raise InputError(f"prompt syntax: the weight {value!r} in {_around(prompt, opened)} is not a number; "
                         "write (words:1.3)") from None
    if not math.isfinite(factor) or factor < 0:
        raise InputError(f"prompt syntax: the weight {value!r} in {_around(prompt, opened)} must be a finite "
                         "number, 0 or more (0 leaves the words out, 1 leaves them as they are)")
    head = text[:colon]
    if head:
        pieces[-1] = (head, weight)
    else:
        pieces.pop()
    return factor


def _join(pieces: list[Piece]) -> list[Piece]:
    joined: list[Piece] = []
    for text, weight in pieces:
        if joined and joined[-1][1] == weight:
            joined[-1] = (joined[-1][0] + text, weight)
        else:
            joined.append((text, weight))
    return [(text, weight) for text, weight in joined if text.strip()]


def escape(text: str) -> str:
    """`text` as a prompt that means itself: brackets and backslashes escaped (for captions, which are text)."""
    return re.sub(r"([\\()\[\]])", r"\\\1", text)


def plain_text(segments: list[list[Piece]]) -> str | None:
    """The prompt's text when it has no weight and no BREAK (what diffusers would encode), else None."""
    if len(segments) == 1 and len(segments[0]) == 1 and segments[0][0][1] == 1.0:
        return segments[0][0][0]
    return None


def _around(prompt: str, position: int, width: int = 24) -> str:
    start = max(0, position - width // 2)
    text = prompt[start:start + width]
    return repr(("…" if start else "") + text + ("…" if start + width < len(prompt) else ""))


def parse_blend(spec: str) -> tuple[str, float]:
    """'a leopard:0.5' -> ("a leopard", 0.5): a prompt mixed into the main one with a weight in (0, 1]."""
    if not isinstance(spec, str) or ":" not in spec:
        raise InputError(f"a blend is PROMPT:WEIGHT, as in \"a leopard:0.5\" (got {spec!r})")
    prompt, value = spec.rsplit(":", 1)
    try:
        weight = float(value)
    except ValueError:
        raise InputError(f"the blend weight {value.strip()!r} in {spec!r} is not a number; write PROMPT:0.5"
                         ) from None
    return prompt.strip(), check_blend_weight(weight, spec)


def check_blend_weight(weight: float, what: str) -> float:
    if not (math.isfinite(weight) and 0 < weight <= 1):
        raise InputError(f"the blend weight {weight:g} of {what!r} is outside (0, 1]: 0.5 is half of each, "
                         "1 all of the blended prompt")
    return float(weight)


def check_blends(blends: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """Blends as (prompt, weight) pairs whose weights add up to at most 1 (the rest is the main prompt's)."""
    checked = []
    for item in blends:
        if isinstance(item, str):
            checked.append(parse_blend(item))
            continue
        try:
            prompt, weight = item
            weight = float(weight)
        except (TypeError, ValueError):
            raise InputError(f"a blend is a (prompt, weight) pair or \"PROMPT:WEIGHT\" (got {item!r})") from None
        if not isinstance(prompt, str):
            raise InputError(f"a blend's prompt must be text (got {prompt!r})")
        checked.append((prompt, check_blend_weight(weight, prompt)))
    total = sum(weight for _, weight in checked)
    if total > 1 + 1e-9:
        raise InputError(f"the blend weights add up to {total:g}: at most 1 (the main prompt keeps 1 minus their sum)")
    return checked
