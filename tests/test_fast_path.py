"""The fast path against the reference path (the published evaluation loop); out of memory: test_out_of_memory.py."""

import os
import sys

import pytest

from moee_fast import MoEEncoder
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

