"""moee-fast: Mixture-of-Experts LLMs as embedding models, no finetuning (MoEE: HS + RW)."""

from .adapters import supported_families
from .embeddings import MoEEmbeddings
from .encoder import MoEEncoder

__version__ = "0.1.0"
__all__ = ["MoEEncoder", "MoEEmbeddings", "supported_families", "__version__"]
