"""Tiny DeepSeekMoE checkpoints in the published layout, and an independent float64 reference.

The reference reads the same safetensors files and follows the architecture's formulas with
explicit loops over tokens and experts; it shares no code with `moee_fast.loading.models.deepseek`
(its own RMSNorm, rotary embedding with linear scaling, attention and routing).
"""

from __future__ import annotations

import json
import math
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moee_fast.demo import build_tokenizer

TINY_DEEPSEEK = dict(
    hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, n_routed_experts=8, n_shared_experts=2,
    num_experts_per_tok=3, first_k_dense_replace=1, moe_layer_freq=1, norm_topk_prob=False,
    scoring_func="softmax", rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None,
    attention_bias=False, max_position_embeddings=4096,
)

# The keys of the published config.json that name the checkpoint's own code, which moee-fast
# never runs (the files are not written).
AUTO_MAP = {
    "AutoConfig": "configuration_deepseek.DeepseekConfig",
    "AutoModel": "modeling_deepseek.DeepseekModel",
    "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM",
}


def is_moe_layer(config: dict, i: int) -> bool:
    return config["n_routed_experts"] is not None and i >= config["first_k_dense_replace"] and i % config["moe_layer_freq"] == 0


def random_weights(config: dict, seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Every tensor of a DeepseekForCausalLM checkpoint (lm_head included), per-expert names."""
    gen = torch.Generator().manual_seed(seed)
    hidden, heads, kv_heads = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = hidden // heads

    def rand(*shape, std=0.08):
        return (torch.randn(*shape, generator=gen) * std).to(dtype)

    def norm_weight():
        return (1.0 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype)

    def mlp(prefix, width):
        return {
            f"{prefix}.gate_proj.weight": rand(width, hidden),
            f"{prefix}.up_proj.weight": rand(width, hidden),
            f"{prefix}.down_proj.weight": rand(hidden, width),
        }

    weights = {"model.embed_tokens.weight": rand(config["vocab_size"], hidden, std=1.0)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        weights.update({
            f"{p}.self_attn.q_proj.weight": rand(heads * head_dim, hidden, std=0.3),
            f"{p}.self_attn.k_proj.weight": rand(kv_heads * head_dim, hidden, std=0.3),
            f"{p}.self_attn.v_proj.weight": rand(kv_heads * head_dim, hidden),
            f"{p}.self_attn.o_proj.weight": rand(hidden, heads * head_dim),
            f"{p}.input_layernorm.weight": norm_weight(),
            f"{p}.post_attention_layernorm.weight": norm_weight(),
        })
        if is_moe_layer(config, i):
            weights[f"{p}.mlp.gate.weight"] = rand(config["n_routed_experts"], hidden, std=0.3)
            for j in range(config["n_routed_experts"]):
                weights.update(mlp(f"{p}.mlp.experts.{j}", config["moe_intermediate_size"]))
            if config["n_shared_experts"]:
                weights.update(mlp(f"{p}.mlp.shared_experts", config["moe_intermediate_size"] * config["n_shared_experts"]))
        else:
            weights.update(mlp(f"{p}.mlp", config["intermediate_size"]))
    weights["model.norm.weight"] = norm_weight()
    weights["lm_head.weight"] = rand(config["vocab_size"], hidden)
    return weights


def write_shards(path, weights: dict[str, torch.Tensor], num_shards: int) -> None:
    """`num_shards` safetensors files plus the index, split like save_pretrained does."""
    names = list(weights)
    per_shard = math.ceil(len(names) / num_shards)
    weight_map = {}
    for s in range(num_shards):
        file = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
        chunk = names[s * per_shard:(s + 1) * per_shard]
        save_file({n: weights[n].contiguous() for n in chunk}, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update({n: file for n in chunk})
    total = sum(t.numel() * t.element_size() for t in weights.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)


def write_config(path, config: dict) -> None:
    published = dict(
        config, model_type="deepseek", architectures=["DeepseekForCausalLM"], auto_map=AUTO_MAP,
        hidden_act="silu", aux_loss_alpha=0.001, seq_aux=True, torch_dtype="bfloat16", use_cache=True,
        tie_word_embeddings=False, pretraining_tp=1, initializer_range=0.02,
    )
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(published, f, indent=2)


def write_checkpoint(path, corpus, seed: int = 0, num_shards: int = 2, **overrides) -> str:
    """A tiny DeepSeekMoE checkpoint (config.json, two shards with an index, tokenizer)."""
    tokenizer = build_tokenizer(corpus, vocab_size=600, bos=True)
    config = dict(TINY_DEEPSEEK, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config.update(overrides)
    os.makedirs(path, exist_ok=True)
    write_config(path, config)
    write_shards(path, random_weights(config, seed), num_shards)
    tokenizer.save_pretrained(path)
    return str(path)


# ---------------------------------------------------------------------------------------------
# The float64 reference


def read_checkpoint(path) -> tuple[dict, dict[str, torch.Tensor]]:
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    weights = {}
    for file in files:
        with safe_open(os.path.join(path, file), "pt") as handle:
            weights.update({name: handle.get_tensor(name).double() for name in handle.keys()})
    return config, weights


def _rms_norm(x, weight, eps):
    return weight * x / torch.sqrt((x * x).mean() + eps)


def _rotate(x, position: int, config: dict):
    """Rotary embedding of one head vector at `position`: dimension i pairs with i + d/2, both
    turned by position * theta^(-2i/d); "linear" scaling divides the position by the factor."""
    d = x.shape[0]
    half = d // 2
    theta, scaling = config["rope_theta"], config.get("rope_scaling")
    pos = float(position)
    if scaling:
        assert scaling["type"] == "linear", scaling
        pos = pos / scaling["factor"]
    out = torch.empty_like(x)
    for i in range(half):
        angle = pos * theta ** (-2.0 * i / d)
        c, s = math.cos(angle), math.sin(angle)
        out[i] = x[i] * c - x[i + half] * s
        out[i + half] = x[i + half] * c + x[i] * s
    return out


def _gated_mlp(x, weights, prefix):
    gate = weights[f"{prefix}.gate_proj.weight"] @ x
    up = weights[f"{prefix}.up_proj.weight"] @ x
    return weights[f"{prefix}.down_proj.weight"] @ (gate * torch.sigmoid(gate) * up)


def reference_embedding(config: dict, weights: dict[str, torch.Tensor], ids: list[int]):
    """(HS [H], RW [num MoE layers, E]) of one text, float64."""
    hidden, heads, kv_heads = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim, eps, T = hidden // heads, config["rms_norm_eps"], len(ids)
    x = [weights["model.embed_tokens.weight"][t].clone() for t in ids]
    rw = []
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        normed = [_rms_norm(v, weights[f"{p}.input_layernorm.weight"], eps) for v in x]
        q = [(weights[f"{p}.self_attn.q_proj.weight"] @ v).view(heads, head_dim) for v in normed]
        k = [(weights[f"{p}.self_attn.k_proj.weight"] @ v).view(kv_heads, head_dim) for v in normed]
        v_ = [(weights[f"{p}.self_attn.v_proj.weight"] @ v).view(kv_heads, head_dim) for v in normed]
        q = [torch.stack([_rotate(q[t][h], t, config) for h in range(heads)]) for t in range(T)]
        k = [torch.stack([_rotate(k[t][h], t, config) for h in range(kv_heads)]) for t in range(T)]
        for t in range(T):
            heads_out = []
            for h in range(heads):
                g = h // (heads // kv_heads)
                scores = torch.tensor([float(q[t][h] @ k[s][g]) / math.sqrt(head_dim) for s in range(t + 1)], dtype=torch.float64)
                probs = torch.softmax(scores, dim=0)
                heads_out.append(sum(probs[s] * v_[s][g] for s in range(t + 1)))
            x[t] = x[t] + weights[f"{p}.self_attn.o_proj.weight"] @ torch.cat(heads_out)
        for t in range(T):
            h2 = _rms_norm(x[t], weights[f"{p}.post_attention_layernorm.weight"], eps)
            if not is_moe_layer(config, i):
                x[t] = x[t] + _gated_mlp(h2, weights, f"{p}.mlp")
                continue
            scores = torch.softmax(weights[f"{p}.mlp.gate.weight"] @ h2, dim=0)
            chosen = sorted(range(len(scores)), key=lambda e: -float(scores[e]))[: config["num_experts_per_tok"]]
            total = sum(float(scores[e]) for e in chosen)
            out = torch.zeros_like(h2)
            for e in chosen:
                weight = scores[e] / total if config["norm_topk_prob"] and len(chosen) > 1 else scores[e]
                out = out + weight * _gated_mlp(h2, weights, f"{p}.mlp.experts.{e}")
            if config["n_shared_experts"]:
                out = out + _gated_mlp(h2, weights, f"{p}.mlp.shared_experts")
            x[t] = x[t] + out
            if t == T - 1:
                rw.append(scores)
    hs = _rms_norm(x[-1], weights["model.norm.weight"], eps)
    return hs, torch.stack(rw)
