"""The families the MoEE plugin runs in vLLM, and each one's architecture name and adapter."""

from __future__ import annotations

# model_type -> (the vLLM causal-LM class the MoEE model extends (moee_fast.vllm.models),
#                the config field that counts routed experts).
FAMILIES = {
    "olmoe": ("OlmoeForCausalLM", "num_experts"),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "num_experts"),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "num_experts"),
    "mixtral": ("MixtralForCausalLM", "num_local_experts"),
    "deepseek": ("DeepseekForCausalLM", "n_routed_experts"),  # DeepSeekMoE v1 (vLLM runs it with V2's code)
    "deepseek_v2": ("DeepseekV2ForCausalLM", "n_routed_experts"),
}


def architecture(model_type: str) -> str:
    """The MoEE architecture name registered for a model type."""
    if model_type not in FAMILIES:
        raise ValueError(f"model type {model_type!r} has no MoEE model in vLLM; supported: {', '.join(sorted(FAMILIES))}")
    return "MoEE" + FAMILIES[model_type][0]


def family_adapter(model_type: str):
    """moee-fast's adapter of a family, or the generic one (softmax scoring) for a family that
    MoEEncoder knows only through transformers' router recorder (Qwen3-MoE)."""
    from ..adapters import Adapter, adapter_for

    try:
        return adapter_for(model_type)
    except ValueError:
        return Adapter(family=f"generic ({model_type})", model_types=(model_type,))
