"""Native implementations of MoE families that transformers lacks.

NATIVE_LOADERS maps a config `model_type` to a loader
`(name_or_path, config, dtype, device, **hf_kwargs) -> base model` (no LM head).
"""

NATIVE_LOADERS: dict = {}
