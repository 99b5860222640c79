"""The fast path against the reference path (the published evaluation loop), and its OOM retry."""

import os
import sys

import pytest
import torch

from moee_fast import MoEEncoder
from moee_fast.encoder import DEFAULT_TOKEN_BUDGET
from conftest import random_texts, relative_error

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
from models import build_checkpoint, scaled_configs  # noqa: E402
from reference_path import load_reference_model, reference_encode  # noqa: E402


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "qwen2_moe", "deepseek"])
def test_fast_path_equals_the_reference_path_on_benchmark_configs(tmp_path, family):
    # The benchmark shapes per layer; two layers keep the test quick.
    config = scaled_configs(num_hidden_layers=2)[family]
    path = build_checkpoint(family, str(tmp_path), config=config)
    enc = MoEEncoder.from_pretrained(path, device="cpu")
    texts = random_texts(10, seed=21, max_words=90)
    ours = enc.encode(texts)
    model, tokenizer = load_reference_model(path)
    ref_hs, ref_rw = reference_encode(model, tokenizer, texts, batch_size=4)  # left-padded batches
    assert relative_error(ours.hs, ref_hs).max() <= 1e-4
    assert relative_error(ours.rw, ref_rw).max() <= 1e-4


def test_out_of_memory_splits_batches_and_loses_no_text(checkpoint, monkeypatch):
    enc = MoEEncoder.from_pretrained(checkpoint("olmoe"), device="cpu")
    texts = random_texts(23, seed=4)
    expected = enc.encode(texts)
    real_forward, seen = enc._forward, []

    def forward_that_fails_above_four_rows(input_ids, position_ids, layout):
        if layout.batch_size > 4:
            raise torch.OutOfMemoryError("simulated allocator failure")
        seen.append(layout.batch_size)
        return real_forward(input_ids, position_ids, layout)

    monkeypatch.setattr(enc, "_forward", forward_that_fails_above_four_rows)
    with pytest.warns(UserWarning, match="out of memory") as warned:
        out = enc.encode(texts)
    assert len([w for w in warned if "out of memory" in str(w.message)]) == 1
    assert sum(seen) == len(texts)  # every text ran exactly once
    assert relative_error(out.hs, expected.hs).max() <= 1e-5
    assert relative_error(out.rw, expected.rw).max() <= 1e-5
    assert enc.token_budget < DEFAULT_TOKEN_BUDGET["cpu"]  # later batches start from the smaller budget

    monkeypatch.setattr(enc, "_forward", lambda *a: (_ for _ in ()).throw(torch.OutOfMemoryError("one text too big")))
    with pytest.raises(torch.OutOfMemoryError):
        enc.encode(texts[:1])
