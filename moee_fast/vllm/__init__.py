"""MoEE inside vLLM: pooling models of the supported families that return HS and RW from vLLM's
own forward, and an engine with MoEEncoder's `encode` surface.

Installed with moee-fast, the plugin (`vllm.general_plugins` entry point `register`) registers one
architecture per family, "MoEE" + vLLM's causal-LM class name. A model runs as MoEE when its
config names that architecture, e.g. through `hf_overrides` (`engine_kwargs` builds them):

    LLM(path, runner="pooling", hf_overrides={"architectures": ["MoEEOlmoeForCausalLM"]}).embed(texts)

Its embedding is [HS; RW] ("concat"), or [HS/|HS|; sqrt(alpha) RW/|RW|] with
hf_overrides {"moee_output": "sum", "moee_alpha": alpha}.
"""

from __future__ import annotations

# model_type -> (the vLLM causal-LM class the MoEE model extends (moee_fast.vllm.models),
#                the config field that counts routed experts).
FAMILIES = {
    "olmoe": ("OlmoeForCausalLM", "num_experts"),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "num_experts"),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "num_experts"),
    "mixtral": ("MixtralForCausalLM", "num_local_experts"),
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


def register() -> None:
    """The vLLM plugin entry point: register the MoEE architectures (imported lazily by vLLM)."""
    from vllm import ModelRegistry

    for model_type in FAMILIES:
        name = architecture(model_type)
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, f"moee_fast.vllm.models:{name}")


def __getattr__(name):  # the engine adapter imports vllm only when asked for
    if name in ("VLLMEncoder", "engine_kwargs"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(name)
