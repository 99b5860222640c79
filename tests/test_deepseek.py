"""DeepSeekMoE (v1) loaded natively from the published checkpoint layout, and DeepSeek-V2
through transformers' own model, both through MoEEncoder.from_pretrained."""

import json
import os
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import random_texts, relative_error, save_checkpoint
from deepseek_reference import read_checkpoint, reference_embedding, write_checkpoint
from moee_fast import MoEEncoder
from moee_fast.loading.models import NATIVE_LOADERS, DeepseekConfig, DeepseekModel

VARIANTS = {
    "published": {},  # deepseek-moe-16b's structure: layer 0 dense, shared experts, no top-k renorm
    "every-other-layer-renormalised-linear-rope": dict(
        first_k_dense_replace=0, moe_layer_freq=2, norm_topk_prob=True, rope_scaling={"type": "linear", "factor": 4.0},
    ),
}


@pytest.fixture(scope="module")
def deepseek_checkpoint(tmp_path_factory, tokenizer_corpus):
    built = {}

    def make(variant: str) -> str:
        if variant not in built:
            path = tmp_path_factory.mktemp(f"deepseek-{variant}")
            built[variant] = write_checkpoint(path, tokenizer_corpus, seed=len(built), **VARIANTS[variant])
        return built[variant]

    return make


def reference(path, tokenizer, texts):
    config, weights = read_checkpoint(path)
    pairs = [reference_embedding(config, weights, tokenizer(text)["input_ids"]) for text in texts]
    return torch.stack([hs for hs, _ in pairs]), torch.stack([rw for _, rw in pairs])


def assert_matches_in_any_batching(enc, texts, ref_hs, ref_rw, seed):
    """Batches of 1, 3 and all texts, in a shuffled order: each row within 1e-5 relative of the
    reference computed for that text alone."""
    rng = random.Random(seed)
    for batch_size in (1, 3, None):
        order = list(range(len(texts)))
        rng.shuffle(order)
        out = enc.encode([texts[i] for i in order], batch_size=batch_size)
        assert relative_error(out.hs, ref_hs[order]).max() <= 1e-5
        assert relative_error(out.rw, ref_rw[order]).max() <= 1e-5


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_float64_reference(deepseek_checkpoint, variant):
    path = deepseek_checkpoint(variant)
    assert not any(name.endswith(".py") for name in os.listdir(path))  # the auto_map's code files are absent
    enc = MoEEncoder.from_pretrained(path, device="cpu")
    assert isinstance(enc.model, DeepseekModel) and enc.adapter.family == "DeepSeekMoE"
    config = enc.model.config
    assert enc.num_moe_layers == sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))

    texts = random_texts(8, seed=3, max_words=20)
    ref_hs, ref_rw = reference(path, enc.tokenizer, texts)
    assert_matches_in_any_batching(enc, texts, ref_hs, ref_rw, seed=variant)


def test_experts_implementations_agree(deepseek_checkpoint):
    """transformers' experts kernels run the stacked expert weights: all give the same embeddings."""
    path = deepseek_checkpoint("published")
    texts = random_texts(6, seed=11, max_words=30)
    default = MoEEncoder.from_pretrained(path, device="cpu")
    assert default.model.config._experts_implementation == "moee_sorted"  # the CPU default
    expected = default.encode(texts)
    for implementation in ("eager", "batched_mm", "grouped_mm"):
        enc = MoEEncoder.from_pretrained(path, device="cpu", experts_implementation=implementation)
        assert enc.model.config._experts_implementation == implementation
        out = enc.encode(texts)
        assert relative_error(out.hs, expected.hs).max() <= 1e-5
        assert relative_error(out.rw, expected.rw).max() <= 1e-5


def test_config_loads_without_checkpoint_code(deepseek_checkpoint):
    from transformers import AutoConfig

    path = deepseek_checkpoint("every-other-layer-renormalised-linear-rope")
    config = AutoConfig.from_pretrained(path)
    assert type(config) is DeepseekConfig
    assert config.rope_parameters["rope_type"] == "linear" and config.rope_parameters["factor"] == 4.0
    assert [config.is_moe_layer(i) for i in range(4)] == [True, False, True, False]
    with pytest.raises(ValueError, match="never runs code"):
        MoEEncoder.from_pretrained(path, trust_remote_code=True)


def test_lm_head_is_not_loaded(deepseek_checkpoint):
    path = deepseek_checkpoint("published")
    model = NATIVE_LOADERS["deepseek"](path, dtype=torch.bfloat16, device="cpu")
    names = dict(model.named_parameters())
    assert not any("lm_head" in name for name in names) and all(p.dtype == torch.bfloat16 for p in names.values())
    assert not any(p.is_meta for p in names.values())


# --- bad input --------------------------------------------------------------------------------


def copy_checkpoint(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


def test_missing_shard_is_named(deepseek_checkpoint, tmp_path):
    path = copy_checkpoint(deepseek_checkpoint("published"), tmp_path / "ckpt")
    os.remove(os.path.join(path, "model-00002-of-00002.safetensors"))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        MoEEncoder.from_pretrained(path, device="cpu")


def test_wrong_shape_names_tensor_and_shapes(deepseek_checkpoint, tmp_path):
    path = copy_checkpoint(deepseek_checkpoint("published"), tmp_path / "ckpt")
    shard = os.path.join(path, "model-00001-of-00002.safetensors")
    tensors = load_file(shard)
    name = next(n for n in tensors if n.endswith("experts.3.up_proj.weight"))
    tensors[name] = tensors[name][:-1].clone()
    save_file(tensors, shard)
    with pytest.raises(ValueError, match=rf"{name}.*\(23, 64\).*\(24, 64\)"):
        MoEEncoder.from_pretrained(path, device="cpu")


def test_missing_tensor_is_named(deepseek_checkpoint, tmp_path):
    path = copy_checkpoint(deepseek_checkpoint("published"), tmp_path / "ckpt")
    index_path = os.path.join(path, "model.safetensors.index.json")
    with open(index_path) as f:
        index = json.load(f)
    del index["weight_map"]["model.norm.weight"]
    with open(index_path, "w") as f:
        json.dump(index, f)
    with pytest.raises(ValueError, match="model.norm.weight"):
        MoEEncoder.from_pretrained(path, device="cpu")


def test_unknown_scoring_func_is_named(deepseek_checkpoint, tmp_path):
    path = copy_checkpoint(deepseek_checkpoint("published"), tmp_path / "ckpt")
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["scoring_func"] = "sparsemixer"
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="sparsemixer"):
        MoEEncoder.from_pretrained(path, device="cpu")


def test_pickle_only_checkpoint_needs_opt_in(deepseek_checkpoint, tmp_path):
    src = deepseek_checkpoint("published")
    path = copy_checkpoint(src, tmp_path / "ckpt")
    state = {}
    for file in sorted(os.listdir(path)):
        if file.startswith("model"):
            if file.endswith(".safetensors"):
                state.update(load_file(os.path.join(path, file)))
            os.remove(os.path.join(path, file))
    torch.save(state, os.path.join(path, "pytorch_model.bin"))
    with pytest.raises(ValueError, match="allow_pickle=True"):
        MoEEncoder.from_pretrained(path, device="cpu")
    texts = random_texts(4, seed=5, max_words=25)
    from_pickle = MoEEncoder.from_pretrained(path, device="cpu", allow_pickle=True).encode(texts)
    from_safetensors = MoEEncoder.from_pretrained(src, device="cpu").encode(texts)
    assert torch.equal(from_pickle.hs, from_safetensors.hs) and torch.equal(from_pickle.rw, from_safetensors.rw)


# --- DeepSeek-V2 (transformers' own model) ----------------------------------------------------


def test_deepseek_v2_matches_transformers_eager(tmp_path, tokenizer_corpus):
    """DeepSeek-V2 runs transformers' own model; here with DeepSeek-V2's group-limited top-k and
    routed_scaling_factor (greedy top-k, V2-Lite's, is covered with the other families)."""
    from conftest import reference_embeddings

    path = save_checkpoint(tmp_path, "deepseek_v2", tokenizer_corpus, topk_method="group_limited_greedy", n_group=4,
                           topk_group=2, routed_scaling_factor=2.5, num_experts_per_tok=3)
    texts = random_texts(10, seed=9, max_words=40)
    ref_hs, ref_rw = reference_embeddings(path, texts)
    enc = MoEEncoder.from_pretrained(path, device="cpu")  # sdpa attention, the encoder's default
    assert enc.adapter.family == "DeepSeek-V2" and enc.num_moe_layers == 2
    assert_matches_in_any_batching(enc, texts, ref_hs, ref_rw, seed="v2")
