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

from .families import FAMILIES, architecture, family_adapter  # noqa: F401  (the plugin's public names)


def register() -> None:
    """The vLLM plugin entry point: register the MoEE architectures (imported lazily by vLLM)."""
    from vllm import ModelRegistry

    # DeepSeekMoE v1's config has no transformers class (its checkpoints ship code, never run):
    # importing moee-fast's native models registers its own with AutoConfig, which vLLM then reads.
    from ..loading import models  # noqa: F401

    for model_type in FAMILIES:
        name = architecture(model_type)
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, f"moee_fast.vllm.models:{name}")


def __getattr__(name):  # the engine adapter imports vllm only when asked for
    if name in ("VLLMEncoder", "engine_kwargs"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(name)
