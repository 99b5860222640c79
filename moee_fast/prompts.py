"""Prompt templates, the paper's prompt presets and task instructions, and tokenization that
never cuts the template.

The embedding is read at the last token, so a template's suffix (PromptEOL's `means in one
word:"`) must survive truncation: only the text inside the template is shortened.
"""

from __future__ import annotations

from dataclasses import dataclass

PLACEHOLDER = "{text}"

# The MoEE authors' prompts, with {text} where their code has `*sent 0*`.
PRESETS: dict[str, str] = {
    "none": '"{text}"',
    "prompteol": 'This sentence : "{text}" means in one word:"',
    "style": 'In one word, describe the style of the following sentence - "{text}" :"',
    "sentiment": 'In one word, describe the sentiment of the following sentence (positive, neutral, or negative) - "{text}" :',
    "tone": 'In one word, describe the tone of the following sentence - "{text}" (e.g., formal, informal, humorous, serious):',
    "intent": 'In one word, describe the intent behind the following sentence (e.g., request, suggestion, command) - "{text}" :',
    "complexity": 'In one word, rate the complexity of the following sentence (simple, moderate, complex) - "{text}" :',
    "subjectivity": 'In one word, describe whether the following sentence is subjective or objective - "{text}" :',
    "language_style": 'In one word, describe the language style of the following sentence (e.g., academic, conversational, literary) - "{text}" :',
    "grammar_structure": 'In one word, describe the grammatical structure of the following sentence (simple, compound, complex) - "{text}" :',
}

# GritLM's embedding-instruction format, which the paper's evaluation used; an empty instruction
# (in the authors' code, the corpus side of a retrieval task) still marks where the text begins.
INSTRUCTION_FORMAT = "<|user|>\n{instruction}\n<|embed|>\n"
EMPTY_INSTRUCTION_FORMAT = "<|embed|>\n"

_SENTENCE_ENDINGS = ".?!\"'"


@dataclass(frozen=True)
class Prompt:
    """How a text becomes the string that is tokenized: `format(text)` is the only way.

    prefix, suffix: around the text (an instruction, when given, ends the prefix).
    preprocess: the authors' text clean-up (see `preprocess_text`), applied by presets.
    reference_exact: the authors' code byte for byte: `inner_prefix` (their instruction) is joined
        to the text before clean-up, so it sits inside the quotes; every `_` of the result becomes
        a space and the result is stripped; an empty text stays empty (their empty-text check never
        fires, since `''.split(' ')` is `['']`).
    """

    prefix: str
    suffix: str
    preprocess: bool = False
    inner_prefix: str = ""
    reference_exact: bool = False

    def format(self, text: str) -> str:
        text = self.inner_prefix + text
        if self.preprocess:
            text = preprocess_text(text, empty_as_period=not self.reference_exact)
        formatted = self.prefix + text + self.suffix
        if self.reference_exact:
            formatted = formatted.replace("_", " ").strip()
        return formatted

    def __str__(self) -> str:
        flags = [name for name in ("preprocess", "reference_exact") if getattr(self, name)]
        template = self.prefix + self.inner_prefix + PLACEHOLDER + self.suffix
        return template + (f" [{', '.join(flags)}]" if flags else "")


def preprocess_text(text: str, empty_as_period: bool = True) -> str:
    """The MoEE authors' clean-up: an empty text becomes `.`; a text not ending in one of
    `.?!"'` gets a `.`; every `"` becomes `'` (so the text cannot close the template's quote)."""
    if not text:
        return "." if empty_as_period else text
    if text[-1] not in _SENTENCE_ENDINGS:
        text += "."
    return text.replace('"', "'")


def format_instruction(instruction: str, reference_exact: bool = False) -> str:
    """`<|user|>\\n{instruction}\\n<|embed|>\\n`, after trailing `:`, spaces and newlines are
    stripped from the instruction.

    reference_exact: as the authors' code did, strip those characters at both ends, and format an
    instruction left empty as `<|embed|>\\n`.
    """
    if not reference_exact:
        return INSTRUCTION_FORMAT.format(instruction=instruction.rstrip(": \n"))
    instruction = instruction.strip(": \n")
    return INSTRUCTION_FORMAT.format(instruction=instruction) if instruction else EMPTY_INSTRUCTION_FORMAT


def build_prompt(preset_or_template: str, instruction: str | None = None, reference_exact: bool = False) -> Prompt:
    """A Prompt from a preset name (see PRESETS) or a template containing `{text}` once.

    Presets apply the authors' text clean-up; plain templates use the text as given.
    instruction: a task instruction, formatted as INSTRUCTION_FORMAT and placed before the prompt
        (with reference_exact, inside the quotes before the text, as the authors' code did). None
        or "" adds nothing, except that with reference_exact "" adds `<|embed|>\\n` as theirs did.
    """
    if not isinstance(preset_or_template, str):
        raise TypeError(f"prompt must be a preset name or a template string, got {type(preset_or_template).__name__}")
    is_preset = preset_or_template in PRESETS
    template = PRESETS.get(preset_or_template, preset_or_template)
    if template.count(PLACEHOLDER) != 1:
        raise ValueError(
            f"prompt {preset_or_template!r} is neither a preset ({', '.join(PRESETS)}) nor a template "
            f"containing {PLACEHOLDER} exactly once"
        )
    prefix, suffix = template.split(PLACEHOLDER)
    wanted = instruction is not None and (instruction != "" or reference_exact)
    formatted_instruction = format_instruction(instruction, reference_exact) if wanted else ""
    if reference_exact:
        return Prompt(prefix, suffix, is_preset, inner_prefix=formatted_instruction, reference_exact=True)
    return Prompt(formatted_instruction + prefix, suffix, is_preset)


def resolve_prompt(prompt: str | Prompt | None) -> Prompt | None:
    """None (text verbatim), a Prompt, a preset name, or a template string containing `{text}`."""
    if prompt is None or isinstance(prompt, Prompt):
        return prompt
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be None, a preset name or a template string, got {type(prompt).__name__}")
    return build_prompt(prompt)


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


def token_ids(tokenizer, texts: list[str], prompt: Prompt | None, max_length: int | None, context: int | None) -> list[list[int]]:
    """`tokenize`, warning about truncated texts and refusing any text without a last token to
    read or with more tokens than the model's `context` positions."""
    import warnings

    from .checks import check_context

    ids, truncated = tokenize(tokenizer, texts, prompt, max_length)
    if truncated:
        warnings.warn(f"{truncated} of {len(texts)} texts were truncated to max_length={max_length} tokens", stacklevel=3)
    for i, seq in enumerate(ids):
        if not seq:
            raise ValueError(
                f"texts[{i}] is empty and this tokenizer adds no special token, so it has no last "
                "token to read; use a prompt template or drop the text"
            )
    check_context([len(seq) for seq in ids], context)
    return ids


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
