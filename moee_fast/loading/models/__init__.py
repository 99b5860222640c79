"""Native implementations of MoE families that transformers lacks.

NATIVE_LOADERS maps a config `model_type` to a loader
`(name_or_path, config, dtype, device, **hf_kwargs) -> base model` (no LM head).
Importing this package also registers those families' configs with transformers' AutoConfig,
so no checkpoint code is ever needed to read them.
"""

from .deepseek import DeepseekConfig, DeepseekModel, load_deepseek

NATIVE_LOADERS: dict = {"deepseek": load_deepseek}

__all__ = ["NATIVE_LOADERS", "DeepseekConfig", "DeepseekModel", "load_deepseek"]
