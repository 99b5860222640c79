"""DeepSeekMoE (v1), natively, without the checkpoint's own code."""

from .model import DeepseekConfig, DeepseekModel, DeepseekTopkRouter, checkpoint_plan, load_deepseek

__all__ = ["DeepseekConfig", "DeepseekModel", "DeepseekTopkRouter", "checkpoint_plan", "load_deepseek"]
