"""Out of memory: the rest of the call is re-planned at the reduced budget, for that call only.

The allocator failure is injected by a forward pre-hook on the model that raises
torch.OutOfMemoryError above a token count, as CUDA would on a card that holds fewer tokens."""

import random

import pytest
import torch

from moee_fast import MoEEncoder
from conftest import random_texts, relative_error

ONE_TOKEN_WORDS = ["the", "a", "model", "token", "to", "experts"]


def _fail_above(enc, limit: int):
    """Make forwards of more than `limit` tokens fail; returns the list of attempted sizes."""
    attempts = []

    def hook(module, args, kwargs):
        tokens = kwargs["input_ids"].shape[1]
        attempts.append(tokens)
        if tokens > limit:
            raise torch.OutOfMemoryError(f"simulated: {tokens} tokens do not fit")

    return attempts, enc.model.register_forward_pre_hook(hook, with_kwargs=True)


def test_after_one_out_of_memory_the_rest_of_the_call_is_replanned_at_the_smaller_budget(checkpoint):
    """8 full batches against a card that holds 61% of one (32,768 tokens against 20k, scaled
    down 16x to keep the test quick): one forward fails, not eight."""
    enc = MoEEncoder.from_pretrained(checkpoint("olmoe"), device="cpu")
    enc.token_budget = 2048
    rng = random.Random(0)
    texts = [" ".join(rng.choice(ONE_TOKEN_WORDS) for _ in range(63)) for _ in range(256)]  # 64 tokens with BOS
    attempts, handle = _fail_above(enc, 1250)
    with pytest.warns(UserWarning, match="out of memory at 2048 tokens: the rest of this call runs batches of at most 1024") as warned:
        out = enc.encode(texts)
    handle.remove()
    assert len([w for w in warned if "out of memory" in str(w.message)]) == 1
    assert attempts == [2048] + [1024] * 16  # one failure, then every batch fits
    assert enc.token_budget == 2048  # the budget change was scoped to that call
    assert out.metadata["tokens"] == str(256 * 64) and not out.hs.isnan().any()
    sample = [0, 1, 200, 255]
    alone = enc.encode([texts[i] for i in sample], batch_size=1)
    assert relative_error(out.hs[sample], alone.hs).max() <= 1e-5
    assert relative_error(out.rw[sample], alone.rw).max() <= 1e-5


def test_out_of_memory_loses_no_text_and_a_single_text_that_does_not_fit_raises(checkpoint):
    enc = MoEEncoder.from_pretrained(checkpoint("olmoe"), device="cpu")
    texts = random_texts(23, seed=4)
    expected = enc.encode(texts)
    longest = max(len(enc.tokenizer(t)["input_ids"]) for t in texts)
    attempts, handle = _fail_above(enc, longest + 40)
    with pytest.warns(UserWarning, match="token_budget stays 2048"):
        out = enc.encode(texts)
    failed = [t for t in attempts if t > longest + 40]
    assert failed and sorted(failed, reverse=True) == failed  # each retry at a smaller budget
    assert sum(t for t in attempts if t <= longest + 40) == int(expected.metadata["tokens"])  # every text once
    assert relative_error(out.hs, expected.hs).max() <= 1e-5
    assert relative_error(out.rw, expected.rw).max() <= 1e-5
    handle.remove()

    attempts, handle = _fail_above(enc, 0)
    with pytest.raises(torch.OutOfMemoryError, match="simulated"):
        enc.encode(texts[:1])
    handle.remove()
    assert enc.token_budget == 2048
