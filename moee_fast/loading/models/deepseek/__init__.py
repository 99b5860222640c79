"""DeepSeekMoE (v1), natively, without the checkpoint's own code: the config (config.py, registered
with AutoConfig on import), the base model (model.py) and the streaming, quantizing checkpoint
loader (loader.py)."""

from .config import DeepseekConfig
from .loader import checkpoint_plan, load_deepseek
from .model import DeepseekModel, DeepseekTopkRouter

__all__ = ["DeepseekConfig", "DeepseekModel", "DeepseekTopkRouter", "checkpoint_plan", "load_deepseek"]
