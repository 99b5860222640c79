"""Property-based: for arbitrary unicode texts, batch sizes, token budgets, prompts and token
limits, `encode` equals transformers' eager forward of each text alone (fp32, 1e-5 relative),
or raises a ValueError that names the offending text's index."""

import re
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import relative_error, save_checkpoint
from moee_fast import MoEEncoder
from moee_fast.prompts import resolve_prompt, tokenize

WORDS = "the model routes every token to experts café 東京 🙂 👩‍🔬 naïve don't 3.14".split()

# Whatever a careless caller passes: any unicode, lone surrogates (which st.text never draws),
# blanks, emoji, combining marks, control characters, and long passages.
ANY_CHARACTER = st.characters(exclude_categories=())
LONE_SURROGATE = st.integers(0xD800, 0xDFFF).map(chr)
TEXTS = st.one_of(
    st.text(ANY_CHARACTER, max_size=24),
    st.tuples(st.text(ANY_CHARACTER, max_size=6), LONE_SURROGATE, st.text(ANY_CHARACTER, max_size=6)).map("".join),
    st.text(st.sampled_from(" \t\n\r\x0b\x0c\u00a0\u2028\u3000"), max_size=6),
    st.text(st.sampled_from("🙂🚀👩‍🔬\u200d\ufe0f\U0001f3fdé\u0301\u0308\u20dda\x00\x07\x1b\x7f\u202e"), max_size=12),
    st.lists(st.sampled_from(WORDS), min_size=10, max_size=120).map(" ".join),
    st.text(ANY_CHARACTER, min_size=40, max_size=300),
)
PROMPTS = st.sampled_from([None, "prompteol", "Q: {text}\nA:"])


@pytest.fixture(scope="module")
def olmoe(tmp_path_factory, tokenizer_corpus):
    """The encoder and transformers' own causal LM, eager attention, of one tiny checkpoint whose
    96 positions long texts exceed (so a forward stays short)."""
    from transformers import AutoModelForCausalLM

    path = save_checkpoint(tmp_path_factory.mktemp("olmoe-96"), "olmoe", tokenizer_corpus, max_position_embeddings=96)
    reference = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    return MoEEncoder.from_pretrained(path, device="cpu"), reference


@torch.no_grad()
def eager_alone(model, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """HS and RW (fp32 softmax of each router's last row) of one token sequence run alone."""
    out = model(torch.tensor([ids]), output_hidden_states=True, output_router_logits=True)
    return out.hidden_states[-1][0, -1], torch.stack([torch.softmax(r[-1].float(), dim=-1) for r in out.router_logits])


def named_index(error: ValueError, count: int) -> int:
    found = re.search(r"texts\[(\d+)\]", str(error))
    assert found, f"the error names no text: {error}"
    index = int(found.group(1))
    assert 0 <= index < count
    return index


def check_refusal(enc, texts, template, max_length, error: ValueError) -> None:
    """The named text really is one the encoder must refuse: a lone surrogate, or (all texts
    valid unicode) one whose tokens exceed the context or whose template exceeds max_length."""
    index = named_index(error, len(texts))
    surrogates = [i for i, t in enumerate(texts) if re.search("[\ud800-\udfff]", t)]
    if surrogates:
        assert index == surrogates[0] and "surrogate" in str(error)
        return
    formatted = texts[index] if template is None else template.format(texts[index])
    length = len(enc.tokenizer(formatted)["input_ids"])
    if max_length is None:
        assert length > enc.context_length and "context" in str(error)
    else:
        assert template is not None and "shorter than the prompt template" in str(error)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    texts=st.lists(TEXTS, max_size=6),
    batch_size=st.none() | st.integers(1, 8),
    token_budget=st.sampled_from([1, 16, 64, 2048]),
    prompt=PROMPTS,
    max_length=st.none() | st.integers(1, 96),
)
def test_encode_equals_each_text_alone_or_names_the_bad_text(olmoe, texts, batch_size, token_budget, prompt, max_length):
    enc, reference = olmoe
    enc.token_budget = token_budget  # the planner splits by this budget; a text above it runs alone
    template = resolve_prompt(prompt)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # truncation warnings
            out = enc.encode(texts, batch_size=batch_size, prompt=prompt, max_length=max_length)
    except ValueError as error:
        check_refusal(enc, texts, template, max_length, error)
        return
    finally:
        enc.token_budget = 2048
    assert out.hs.shape == (len(texts), enc.hidden_size) and out.rw.shape[0] == len(texts)
    if not texts:
        return
    ids, _ = tokenize(enc.tokenizer, texts, template, max_length)
    expected = [eager_alone(reference, seq) for seq in ids]
    assert relative_error(out.hs, torch.stack([hs for hs, _ in expected])).max() <= 1e-5
    assert relative_error(out.rw, torch.stack([rw for _, rw in expected])).max() <= 1e-5
