"""The encoder against transformers' own eager forward, one text at a time."""

import random
import weakref

import pytest
import torch
from safetensors import safe_open

from moee_fast import MoEEncoder, ops, supported_families
from moee_fast.fastpath import PARTS
from conftest import random_texts, reference_embeddings, relative_error

FAMILIES = ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "deepseek_v2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_transformers_eager_one_text_at_a_time(checkpoint, family):
    path = checkpoint(family)
    with safe_open(f"{path}/model.safetensors", "pt") as f:  # the per-expert layout of real checkpoints
        assert any(".experts.0." in key for key in f.keys())
    texts = random_texts(14, seed=7, max_words=245)
    texts[5] = ""  # BOS alone: one token
    ref_hs, ref_rw = reference_embeddings(path, texts)

    enc = MoEEncoder.from_pretrained(path, device="cpu")
    assert enc.num_moe_layers == ref_rw.shape[1]
    lengths = [len(enc.tokenizer(t)["input_ids"]) for t in texts]
    assert min(lengths) == 1 and 200 <= max(lengths) <= 320  # the range real corpora mix

    rng = random.Random(family)
    for batch_size in (1, 3, None):
        order = list(range(len(texts)))
        rng.shuffle(order)
        out = enc.encode([texts[i] for i in order], batch_size=batch_size)
        assert out.hs.dtype == out.rw.dtype == torch.float32
        assert relative_error(out.hs, ref_hs[order]).max() <= 1e-5
        assert relative_error(out.rw, ref_rw[order]).max() <= 1e-5


def test_qwen3_moe_uses_the_generic_adapter(checkpoint):
    enc = MoEEncoder.from_pretrained(checkpoint("qwen3_moe"), device="cpu")
    assert enc.adapter.family.startswith("generic")


def test_dense_layers_are_skipped_in_rw(checkpoint):
    enc = MoEEncoder.from_pretrained(checkpoint("qwen2_moe"), device="cpu")  # layer 1 is dense
    out = enc.encode(["one text"])
    assert out.rw.shape == (1, 2, 8)
    torch.testing.assert_close(out.rw.sum(-1), torch.ones(1, 2))


def test_batch_neighbours_do_not_change_a_text(checkpoint):
    enc = MoEEncoder.from_pretrained(checkpoint("olmoe"), device="cpu")
    texts = random_texts(12, seed=3)
    alone = enc.encode(texts[:1])
    for neighbours in (texts[1:4], texts[4:]):
        together = enc.encode(texts[:1] + neighbours)[0]
        assert relative_error(together.hs, alone.hs).max() <= 1e-5
        assert relative_error(together.rw, alone.rw).max() <= 1e-5


def test_only_the_needed_tensors(checkpoint, monkeypatch):
    enc = MoEEncoder.from_pretrained(checkpoint("mixtral"), device="cpu")
    # No LM head at all: the vocabulary-sized matmul can never run.
    assert not any("lm_head" in name for name, _ in enc.model.named_modules())

    # Each router's all-token logits die with their layer; what is kept has B rows.
    live, kept_shapes = [], []

    def watch(module, args, output):
        assert all(ref() is None for ref in live), "an earlier layer's router logits are still alive"
        live.append(weakref.ref(output[0]))

    for router in enc.routers:
        router.register_forward_hook(watch)
    real = ops.gather_router_softmax

    def spy(logits, rows, **kwargs):
        result = real(logits, rows, **kwargs)
        kept_shapes.append(tuple(result.shape))
        return result

    monkeypatch.setattr(ops, "gather_router_softmax", spy)
    texts = random_texts(5, seed=11, max_words=40)
    out = enc.encode(texts, batch_size=5)
    assert kept_shapes == [(5, 1, 8)] * enc.num_moe_layers
    assert out.rw.shape == (5, enc.num_moe_layers, 8)


def test_last_layer_trim_changes_nothing(checkpoint):
    path = checkpoint("qwen2_moe")
    texts = random_texts(9, seed=5)
    trimmed = MoEEncoder.from_pretrained(path, device="cpu").encode(texts)
    full = MoEEncoder.from_pretrained(path, device="cpu", fast_path=set(PARTS) - {"trim"}).encode(texts)
    assert relative_error(trimmed.hs, full.hs).max() <= 1e-6
    assert relative_error(trimmed.rw, full.rw).max() <= 1e-6


def test_prompt_template_and_truncation_keep_the_suffix(checkpoint):
    path = checkpoint("olmoe")
    enc = MoEEncoder.from_pretrained(path, device="cpu")
    template = 'This sentence : "{text}" means in one word:"'
    texts = random_texts(6, seed=9, max_words=100)
    full = enc.encode(texts, prompt=template)
    ref_hs, ref_rw = reference_embeddings(path, texts, prompt=template)
    assert relative_error(full.hs, ref_hs).max() <= 1e-5
    assert relative_error(full.rw, ref_rw).max() <= 1e-5

    with pytest.warns(UserWarning, match="truncated to max_length=40"):
        short = enc.encode(texts, prompt=template, max_length=40)
    suffix = enc.tokenizer('" means in one word:"', add_special_tokens=False)["input_ids"]
    for text in texts:
        ids = enc.tokenizer(template.replace("{text}", text))["input_ids"]
        if len(ids) > 40:
            from moee_fast.prompts import resolve_prompt, tokenize

            (cut,), n = tokenize(enc.tokenizer, [text], resolve_prompt(template), 40)
            assert n == 1 and len(cut) <= 40 and cut[-len(suffix):] == suffix
    long_ones = [i for i, t in enumerate(texts) if len(enc.tokenizer(template.replace("{text}", t))["input_ids"]) > 40]
    kept = [i for i in range(len(texts)) if i not in long_ones]
    assert long_ones and kept
    assert relative_error(short.hs[kept], full.hs[kept]).max() <= 1e-5

    with pytest.raises(ValueError, match=r"texts\[0\].*shorter than the prompt template"):
        enc.encode(["x"], prompt=template, max_length=3)


def test_bad_inputs(checkpoint, tmp_path):
    enc = MoEEncoder.from_pretrained(checkpoint("olmoe"), device="cpu")
    with pytest.raises(TypeError, match=r"texts\[2\] must be a string, got int"):
        enc.encode(["a", "b", 3, None])
    single, listed = enc.encode("a single string"), enc.encode(["a single string"])
    assert single.hs.shape == (1, 64) and single.rw.shape == (1, 3, 8)  # one string -> one row
    assert torch.equal(single.hs, listed.hs) and torch.equal(single.rw, listed.rw)
    empty = enc.encode([])
    assert empty.hs.shape == (0, 64) and empty.rw.shape == (0, 3, 8)
    assert enc.encode([""]).hs.shape == (1, 64)  # BOS gives the empty text one token

    no_bos = MoEEncoder.from_pretrained(checkpoint("olmoe", bos=False), device="cpu")
    with pytest.raises(ValueError, match=r"texts\[1\] is empty"):
        no_bos.encode(["fine", ""])
    assert no_bos.encode([""], prompt='"{text}"').hs.shape == (1, 64)

    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        MoEEncoder.from_pretrained(str(tmp_path / "no-such-dir"))
    with pytest.raises(ValueError, match="dtype"):
        MoEEncoder.from_pretrained(checkpoint("olmoe"), dtype="float33")


def test_dense_checkpoint_is_refused_naming_the_families(tmp_path, tokenizer_corpus):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a supported Mixture-of-Experts") as info:
        MoEEncoder.from_pretrained(str(tmp_path))
    for family in supported_families():
        assert family in str(info.value)


def test_weights_load_straight_onto_an_accelerator_unless_the_caller_placed_them():
    from moee_fast.loading.placement import placement

    assert placement(torch.device("cuda:1"), {}) == {"device_map": {"": torch.device("cuda:1")}}
    assert placement(torch.device("cuda"), {"device_map": "auto"}) == {}  # the caller's map stands
    assert placement(torch.device("cpu"), {}) == {}  # transformers loads on CPU anyway
