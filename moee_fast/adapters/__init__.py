from . import families  # noqa: F401  (registers the known families)
from .registry import Adapter, adapter_for, register, supported_families

__all__ = ["Adapter", "adapter_for", "register", "supported_families"]
