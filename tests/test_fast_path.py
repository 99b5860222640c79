"""The fast path against both baselines (the published evaluation loop and the careful
transformers loop); out of memory: test_out_of_memory.py."""

import pytest

from benchmarks.models import build_checkpoint, scaled_configs
from benchmarks.reference_path import careful_encode, load_careful_model, load_reference_model, reference_encode
from moee_fast import MoEEncoder
from conftest import random_texts, relative_error

FAMILIES = ["olmoe", "mixtral", "qwen2_moe", "deepseek"]


@pytest.fixture(scope="module")
def two_layer_checkpoint(tmp_path_factory):
    """The benchmark shapes per layer; two layers keep the tests quick."""
    root = str(tmp_path_factory.mktemp("bench-2-layers"))
    return lambda family: build_checkpoint(family, root, config=scaled_configs(num_hidden_layers=2)[family])


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_path_equals_the_reference_path_on_benchmark_configs(two_layer_checkpoint, family):
    path = two_layer_checkpoint(family)
    texts = random_texts(10, seed=21, max_words=90)
    ours = MoEEncoder.from_pretrained(path, device="cpu").encode(texts)
    model, tokenizer = load_reference_model(path)
    ref_hs, ref_rw = reference_encode(model, tokenizer, texts, batch_size=4)  # left-padded batches
    assert relative_error(ours.hs, ref_hs).max() <= 1e-4
    assert relative_error(ours.rw, ref_rw).max() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_careful_loop_equals_the_fast_path_in_input_order(two_layer_checkpoint, family):
    path = two_layer_checkpoint(family)
    texts = random_texts(11, seed=22, max_words=90)  # 11 texts, batches of 4: a short last batch
    ours = MoEEncoder.from_pretrained(path, device="cpu").encode(texts)
    model, tokenizer = load_careful_model(path)
    config = getattr(model, "config", None) or model.model.config  # DeepSeekMoE: the wrapped base model's
    assert config._attn_implementation == "sdpa" and getattr(model, "lm_head", None) is None
    hs, rw = careful_encode(model, tokenizer, texts, batch_size=4)
    assert hs.shape == ours.hs.shape and rw.shape == ours.rw.shape
    assert relative_error(hs, ours.hs).max() <= 1e-4
    assert relative_error(rw, ours.rw).max() <= 1e-4
    # Each text alone, unpadded: sorting and right padding change no row.
    alone_hs, alone_rw = careful_encode(model, tokenizer, texts[5:6], batch_size=1)
    assert relative_error(hs[5:6], alone_hs).max() <= 1e-5 and relative_error(rw[5:6], alone_rw).max() <= 1e-5

