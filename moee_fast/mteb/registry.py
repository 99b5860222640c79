"""The paper's checkpoints in mteb's model registry, by the names of their default settings in each
variant, so that `mteb.get_model("allenai/OLMoE-1B-7B-0924-MoEE-sum-alpha1")` loads one. Registering
is an explicit call (`register_paper_models()`): importing the package changes nothing in mteb."""

from __future__ import annotations

from ..checks import VARIANTS
from .data import DEFAULT_ALPHA, DEFAULT_PROMPT, E5_INSTRUCTIONS, PAPER_CHECKPOINTS
from .model import load_moee_model
from .naming import moee_meta, moee_model_name, variant_dim


def register_paper_models() -> list[str]:
    """Add each paper checkpoint's four variants, at their default settings, to mteb's registry
    (an entry already there is kept). Returns the names."""
    from mteb.models.model_implementations import MODEL_REGISTRY

    names = []
    for checkpoint, known in PAPER_CHECKPOINTS.items():
        for variant in VARIANTS:
            settings = {"variant": variant, "alpha": DEFAULT_ALPHA, "prompt": DEFAULT_PROMPT, "instructions": True}
            name = moee_model_name(checkpoint, variant, DEFAULT_ALPHA, DEFAULT_PROMPT, E5_INSTRUCTIONS)
            MODEL_REGISTRY.setdefault(name, moee_meta(
                name, known["revision"], checkpoint, settings, known["counts"],
                loader=load_moee_model,
                embed_dim=variant_dim(variant, *known["shape"]),
                max_tokens=known["max_tokens"],
                memory_usage_mb=round((known["counts"][0] + known["counts"][2]) * 2 / 2**20, 1),
                card=known["card"],
            ))
            names.append(name)
    return names
