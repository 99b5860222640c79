"""Benchmark models: random-weight checkpoints with the real families' proportions.

Throughput does not depend on trained values, so each is built from its family's real config:
scaled down for a CPU (`scaled_configs`), at full size for a GPU (`full_size_configs`), or tiny
for smoke runs (`smoke_configs`). CPU checkpoints are saved with save_pretrained in
the real per-expert layout. Each "scaled" vocabulary is sized so the LM head is about 10% of
the forward's FLOPs, as in the full models; the tokenizer itself is small (ids stay below its
size), which changes no FLOP count.
"""

from __future__ import annotations

import json
import math
import os

import torch
from torch import nn

from benchmarks.helpers import randomize_
from benchmarks.reference_path import DeepseekCausalLM


def scaled_configs(num_hidden_layers: int | None = None) -> dict:
    """The CPU-sized benchmark configs; `num_hidden_layers` overrides every family's depth."""
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig

    from moee_fast.loading.models.deepseek import DeepseekConfig

    # OLMoE-1B-7B: H 2048, 16 layers, 16 heads, 64 experts, top-8, expert width H/2, vocab ~25H.
    olmoe = OlmoeConfig(
        hidden_size=256, intermediate_size=128, num_hidden_layers=num_hidden_layers or 16, num_attention_heads=4,
        num_key_value_heads=4, num_experts=64, num_experts_per_tok=8, vocab_size=7168,
        max_position_embeddings=4096,
    )
    # Mixtral-8x7B: H 4096, 8 experts, top-2, expert width 3.5H, GQA 32/8.
    mixtral = MixtralConfig(
        hidden_size=256, intermediate_size=896, num_hidden_layers=num_hidden_layers or 8, num_attention_heads=8,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, vocab_size=4096,
        max_position_embeddings=4096,
    )
    # Qwen1.5-MoE-A2.7B: H 2048, 60 experts, top-4, expert width 0.7H, shared expert 2.8H.
    qwen2_moe = Qwen2MoeConfig(
        hidden_size=256, intermediate_size=704, moe_intermediate_size=176, shared_expert_intermediate_size=704,
        num_hidden_layers=num_hidden_layers or 8, num_attention_heads=4, num_key_value_heads=4, num_experts=60,
        num_experts_per_tok=4, vocab_size=8192, max_position_embeddings=4096,
    )
    # DeepSeekMoE-16B: H 2048, first layer dense, 64 routed + 2 shared experts, top-6, width 0.69H.
    deepseek = DeepseekConfig(
        hidden_size=256, intermediate_size=1368, moe_intermediate_size=176, num_hidden_layers=num_hidden_layers or 8,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=64, n_shared_experts=2,
        num_experts_per_tok=6, first_k_dense_replace=1, moe_layer_freq=1, vocab_size=8192,
        max_position_embeddings=4096,
    )
    return {"olmoe": olmoe, "mixtral": mixtral, "qwen2_moe": qwen2_moe, "deepseek": deepseek}


def full_size_configs() -> dict:
    """The published configs' shapes (values that change no FLOP count, like rope scaling, too)."""
    from transformers import OlmoeConfig, Qwen2MoeConfig

    from moee_fast.loading.models.deepseek import DeepseekConfig

    return {
        "olmoe": OlmoeConfig(
            hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
            num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, vocab_size=50304,
            max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5, norm_topk_prob=False,
            tie_word_embeddings=False,
        ),
        "qwen2_moe": Qwen2MoeConfig(
            hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
            shared_expert_intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
            num_key_value_heads=16, num_experts=60, num_experts_per_tok=4, decoder_sparse_step=1,
            vocab_size=151936, max_position_embeddings=8192, rope_theta=1e6, rms_norm_eps=1e-6,
            norm_topk_prob=False, tie_word_embeddings=False,
        ),
        "deepseek": DeepseekConfig(
            hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=28,
            num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64, n_shared_experts=2,
            num_experts_per_tok=6, first_k_dense_replace=1, moe_layer_freq=1, vocab_size=102400,
            max_position_embeddings=4096, rms_norm_eps=1e-6, norm_topk_prob=False,
        ),
    }


def smoke_configs() -> dict:
    """Each family's traits (OLMoE's qk-norm, Qwen's shared expert, DeepSeek's dense first layer
    and shared experts) at a size a CPU runs in seconds."""
    from transformers import OlmoeConfig, Qwen2MoeConfig

    from moee_fast.loading.models.deepseek import DeepseekConfig

    common = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                  vocab_size=1024, max_position_embeddings=4096, eos_token_id=None, bos_token_id=None)
    return {
        "olmoe": OlmoeConfig(intermediate_size=32, num_experts=16, num_experts_per_tok=4, **common),
        "qwen2_moe": Qwen2MoeConfig(intermediate_size=128, moe_intermediate_size=48,
                                    shared_expert_intermediate_size=128, num_experts=15, num_experts_per_tok=4,
                                    **common),
        "deepseek": DeepseekConfig(intermediate_size=192, moe_intermediate_size=48, n_routed_experts=16,
                                   n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, **common),
    }



def build_causal_lm(config, device: torch.device, dtype: torch.dtype):
    """(causal LM for the reference path, its base model for moee-fast): one set of weights."""
    if config.model_type == "deepseek":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        from moee_fast.loading.models.deepseek import DeepseekModel

        with torch.device("meta"):
            base = DeepseekModel(config).to(dtype)  # no memory until to_empty: no fp32 copy
        base.to_empty(device=device)
        with torch.device(device):
            base.rotary_emb = LlamaRotaryEmbedding(config)  # fp32 frequencies, as the loader builds them
            lm = DeepseekCausalLM(base, nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype))
        base.config.dtype = dtype
    else:
        from transformers import AutoModelForCausalLM

        with torch.device(device):
            lm = AutoModelForCausalLM.from_config(config, dtype=dtype)
        if any(p.device.type != device.type for p in lm.parameters()):  # should from_config ignore the device context
            lm.to(device)
        base = lm.model
    randomize_(lm)
    return lm.eval().requires_grad_(False), base.eval()


def build_checkpoint(name: str, root: str, config=None) -> str:
    """Save a random-weight checkpoint of `name` (a key of scaled_configs) under `root`, once."""
    from moee_fast.demo import SAMPLE_TEXTS, build_tokenizer

    path = os.path.join(root, f"bench-{name}")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    config = config or scaled_configs()[name]
    tokenizer = build_tokenizer(SAMPLE_TEXTS * 20, vocab_size=600)
    config.pad_token_id, config.bos_token_id, config.eos_token_id = (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    )
    torch.manual_seed(0)
    save_random_causal_lm(config, path)
    tokenizer.save_pretrained(path)
    return path


def save_random_causal_lm(config, path: str) -> None:
    if config.model_type == "deepseek":
        save_random_checkpoint(config, path)
        return
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config)
    randomize_(model)
    model.save_pretrained(path)


def save_random_checkpoint(config: DeepseekConfig, path: str, std: float = 0.02, dtype: torch.dtype = torch.float32,
                           max_shard_bytes: int = 2 * 2**30) -> None:
    """Random weights (normal(0, std); norms at 1) in the published layout: per-expert tensors,
    an lm_head, safetensors shards with an index, and config.json. For benchmarks: throughput
    does not depend on trained values. Draws from torch's global generator."""
    from safetensors.torch import save_file

    from moee_fast.loading.checkpoint import SAFETENSORS_INDEX
    from moee_fast.loading.models.deepseek import DeepseekModel, checkpoint_plan

    with torch.device("meta"):
        model = DeepseekModel(config)
    shapes = {name: target.shape for name, target in checkpoint_plan(model).items()}
    shapes["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    groups, group, group_bytes = [], [], 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * dtype.itemsize
        if group and group_bytes + nbytes > max_shard_bytes:
            groups.append(group)
            group, group_bytes = [], 0
        group.append(name)
        group_bytes += nbytes
    groups.append(group)
    os.makedirs(path, exist_ok=True)
    weight_map = {}
    for number, names in enumerate(groups, start=1):  # one shard in memory at a time
        file = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: (torch.ones(shapes[n]) if len(shapes[n]) == 1 else torch.randn(shapes[n]) * std).to(dtype) for n in names}
        save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    with open(os.path.join(path, SAFETENSORS_INDEX), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    config.architectures = ["DeepseekForCausalLM"]
    config.save_pretrained(path)


def embedding_flops(model, lengths: list[int], every_layer_every_token: bool = False) -> float:
    """FLOPs the embedding needs for texts of these token lengths (no padding, no LM head): every
    layer for every token, except the last layer, which needs keys and values for every token
    but queries, output projection and MLP/MoE for the last token only. every_layer_every_token:
    what an engine that runs the last layer on every token computes (vLLM's pooling runner)."""
    config = model.config
    layers = model.layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv, q_o, mlp = [], [], []
    for layer in layers:
        linears = [(n, m) for n, m in layer.self_attn.named_modules() if isinstance(m, torch.nn.Linear)]
        kv.append(sum(2 * m.weight.numel() for n, m in linears if _is_key_value(n)))
        q_o.append(sum(2 * m.weight.numel() for n, m in linears if not _is_key_value(n)))
        mlp.append(_mlp_flops_per_token(layer.mlp, config))
    scores = 4 * heads * head_dim  # q.k and p.v per (query, key) pair
    total = 0.0
    for n in lengths:
        body = 0.0
        for i in range(len(layers) - 1):
            body += n * (kv[i] + q_o[i] + mlp[i]) + scores * n * (n + 1) / 2  # causal: p attends p+1 keys
        r = n if every_layer_every_token else 1  # the last layer's queries: the text's last r tokens
        total += body + n * kv[-1] + r * (q_o[-1] + mlp[-1]) + scores * (r * n - r * (r - 1) / 2)
    return total


def _is_key_value(name: str) -> bool:
    return any(part in name for part in ("k_proj", "v_proj", "kv_"))


def _mlp_flops_per_token(mlp, config) -> float:
    experts = getattr(mlp, "experts", None)
    flops = 0.0
    for name, module in mlp.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.startswith("experts"):
            flops += 2 * module.weight.numel()
    router = getattr(mlp, "gate", None)
    if router is not None and not isinstance(router, torch.nn.Linear):
        flops += 2 * router.weight.numel()
    if experts is not None:
        params = sum(p.numel() for p in experts.parameters())
        count = experts.gate_up_proj.shape[0]
        flops += 2 * config.num_experts_per_tok * params / count
    return flops
