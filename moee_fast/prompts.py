"""Prompt templates and tokenization that never cuts the template.

The embedding is read at the last token, so a template's suffix (PromptEOL's `means in one
word:"`) must survive truncation: only the text inside the template is shortened.
"""

from __future__ import annotations

from dataclasses import dataclass

PLACEHOLDER = "{text}"


@dataclass(frozen=True)
class Prompt:
    prefix: str
    suffix: str

    def format(self, text: str) -> str:
        return self.prefix + text + self.suffix


def resolve_prompt(prompt: str | Prompt | None) -> Prompt | None:
    """None (text verbatim) or a template string containing `{text}` exactly once."""
    if prompt is None or isinstance(prompt, Prompt):
        return prompt
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be None or a template string, got {type(prompt).__name__}")
    if prompt.count(PLACEHOLDER) != 1:
        raise ValueError(f"a prompt template must contain {PLACEHOLDER} exactly once, got {prompt!r}")
    prefix, suffix = prompt.split(PLACEHOLDER)
    return Prompt(prefix, suffix)


def tokenize(tokenizer, texts: list[str], prompt: Prompt | None, max_length: int | None) -> tuple[list[list[int]], int]:
    """Token ids of every text (with the tokenizer's default special tokens, no padding) and how
    many texts were truncated to `max_length`."""
    strings = texts if prompt is None else [prompt.format(t) for t in texts]
    ids = tokenizer(strings, add_special_tokens=True)["input_ids"]
    if max_length is None:
        return ids, 0
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    truncated = 0
    for i, seq in enumerate(ids):
        if len(seq) <= max_length:
            continue
        truncated += 1
        if prompt is None:
            # Keep the head; the tokenizer re-adds its special tokens within the limit.
            ids[i] = tokenizer(strings[i], add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
        else:
            ids[i] = _truncate_inside(tokenizer, texts[i], prompt, max_length, index=i)
    return ids, truncated


def _truncate_inside(tokenizer, text: str, prompt: Prompt, max_length: int, index: int) -> list[int]:
    """Longest head of `text` whose templated tokenization fits in `max_length` (binary search
    over the character cut: token counts at a boundary need not be additive)."""

    def encode(cut: int) -> list[int]:
        return tokenizer(prompt.format(text[:cut]), add_special_tokens=True)["input_ids"]

    best = encode(0)
    if len(best) > max_length:
        raise ValueError(
            f"texts[{index}]: max_length={max_length} is shorter than the prompt template alone "
            f"({len(best)} tokens); the template's end must survive since the last token is read"
        )
    lo, hi = 0, len(text)  # encode(lo) fits, encode(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        candidate = encode(mid)
        if len(candidate) <= max_length:
            lo, best = mid, candidate
        else:
            hi = mid
    return best
