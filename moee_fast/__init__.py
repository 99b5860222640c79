"""moee-fast: Mixture-of-Experts LLMs as embedding models, no finetuning (MoEE: HS + RW)."""

from .openmp import bound_spin

bound_spin()  # before anything below imports torch (and with it OpenMP): see openmp.py

from .adapters import supported_families
from .corpus import encode_corpus, load_corpus
from .embeddings import VARIANTS, MoEEmbeddings, Standardizer
from .encoder import MoEEncoder
from .prompts import PRESETS, build_prompt
from .similarity import search, similarity, similarity_pairwise, tune_alpha

__version__ = "0.1.0"
__all__ = [
    "MoEEncoder",
    "MoEEmbeddings",
    "PRESETS",
    "Standardizer",
    "VARIANTS",
    "build_prompt",
    "encode_corpus",
    "load_corpus",
    "search",
    "similarity",
    "similarity_pairwise",
    "supported_families",
    "tune_alpha",
    "__version__",
]
