"""How MoEE results are named and described to mteb: the model name from its settings, and the
ModelMeta fields (parameter counts from the config, memory from the weight files, the model card)."""

from __future__ import annotations

import copy
import glob
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from mteb.models.model_meta import ModelMeta, ScoringFunction

from ..prompts import PRESETS
from .data import CITATION, DEFAULT_PROMPT, E5_INSTRUCTIONS, NO_REVISION, Instruction


def variant_dim(variant: str, hidden: int, layers: int, experts: int) -> int:
    """Dimensions of a variant's vectors: H for hs, L*E for rw, H + L*E for concat and sum."""
    return {"hs": hidden, "rw": layers * experts}.get(variant, hidden + layers * experts)


def check_instructions(instructions) -> Mapping[str, Instruction]:
    if instructions is True:
        return E5_INSTRUCTIONS
    if instructions is False or instructions is None:
        return {}
    if isinstance(instructions, Mapping):
        return E5_INSTRUCTIONS if instructions == E5_INSTRUCTIONS else dict(instructions)
    raise TypeError(f"instructions must be True, False or a mapping of task name to instruction, got {instructions!r}")


def instructions_setting(instructions: Mapping[str, Instruction]) -> bool | dict:
    """How the loader takes these instructions back: True (e5), False (none) or the mapping."""
    if instructions is E5_INSTRUCTIONS:
        return True
    return {name: dict(value) if isinstance(value, Mapping) else value for name, value in instructions.items()} or False


def instructions_label(instructions: Mapping[str, Instruction]) -> str:
    if instructions is E5_INSTRUCTIONS:
        return ""
    if not instructions:
        return "noinstructions"
    return "instructions-" + short_hash(json.dumps(instructions_setting(instructions), sort_keys=True))


def moee_model_name(base: str, variant: str, alpha: float, prompt: str | None, instructions: Mapping[str, Instruction],
                    rw_pooling: str = "last", hs_pooling: str = "last") -> str:
    """The name MoEE results are filed under: `<base>-MoEE-<variant>`, then `-alpha<alpha>` for
    "sum", then `-rwmean` / `-hsmean` for a mean pooling of a part the variant uses, then the
    prompt unless it is PromptEOL (`-<preset>`, `-verbatim` or `-template-<hash>`), then the
    instructions unless they are the paper's e5 ones (`-noinstructions` or `-instructions-<hash>`).
    E.g. `allenai/OLMoE-1B-7B-0924-MoEE-sum-alpha1`, `...-MoEE-rw-rwmean`."""
    parts = [base, "MoEE", variant]
    if variant == "sum":
        parts.append(f"alpha{alpha:.12g}")  # 1.0 -> alpha1, 0.25 -> alpha0.25
    if rw_pooling != "last" and variant != "hs":
        parts.append("rw" + rw_pooling)
    if hs_pooling != "last" and variant != "rw":
        parts.append("hs" + hs_pooling)
    if prompt != DEFAULT_PROMPT:
        parts.append("verbatim" if prompt is None else prompt if prompt in PRESETS else "template-" + short_hash(prompt))
    parts.append(instructions_label(instructions))
    return "-".join(part for part in parts if part)



def moee_meta(name: str, revision: str, checkpoint: str, naming_settings: dict[str, Any], counts: tuple[int, int, int], *,
              loader: Callable, embed_dim: int, max_tokens: int | None, memory_usage_mb: float, card: dict[str, Any],
              experiment_kwargs: dict[str, Any] | None = None) -> ModelMeta:
    """The ModelMeta of a MoEE model of `checkpoint`; counts: (all, active, embedding) parameters;
    loader: the function that rebuilds the model from `naming_settings` (`load_moee_model`)."""
    is_hub_id = mteb_model_name(checkpoint) == checkpoint
    return ModelMeta(
        loader=loader,
        loader_kwargs={"checkpoint": checkpoint, **naming_settings},
        name=name,
        revision=revision,
        release_date=card.get("release_date"),
        languages=card.get("languages"),
        n_parameters=counts[0],
        n_active_parameters_override=counts[1],
        n_embedding_parameters=counts[2],
        memory_usage_mb=memory_usage_mb,
        max_tokens=max_tokens,
        embed_dim=embed_dim,
        license=card.get("license"),
        open_weights=True,
        public_training_code=None,
        public_training_data=None,
        framework=["PyTorch", "Transformers"],
        reference=f"https://huggingface.co/{checkpoint}" if is_hub_id else None,
        # For "sum" the cosine of the vectors is the MoEE(sum) score over (1 + alpha): cosine is how
        # every variant's vectors compare (MoEEModel.similarity returns the unscaled score).
        similarity_fn_name=ScoringFunction.COSINE,
        use_instructions=bool(naming_settings["instructions"]),
        training_datasets=None,  # no training beyond the checkpoint's own, whose data is not listed
        adapted_from=checkpoint if is_hub_id else None,
        citation=CITATION,
        experiment_kwargs=experiment_kwargs or None,
    )


def parameter_counts(model_class: type, config) -> tuple[int, int, int]:
    """(all, active per token, input embedding) parameters of `model_class` built from `config`,
    counted on the meta device (nothing is allocated). Active: everything but the input embedding,
    with each MoE layer's routed experts counted for the `num_experts_per_tok` a token runs."""
    config = copy.deepcopy(config)
    config.__dict__.pop("quantization_config", None)  # count the architecture, not a packed layout
    with torch.device("meta"):
        model = model_class._from_config(config)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    # Routed experts are stacked [experts, ...] weights of a module named "experts" in every family.
    stacked = [p for name, p in model.named_parameters() if "experts" in name.split(".") and p.dim() == 3]
    routed, experts = sum(p.numel() for p in stacked), {p.shape[0] for p in stacked}
    top_k = getattr(config, "num_experts_per_tok", None)
    if not routed or top_k is None or len(experts) != 1:
        return total, total - embedding, embedding
    return total, total - embedding - routed + routed * top_k // experts.pop(), embedding


def checkpoint_folder(name: str, revision: str | None = None) -> str | None:
    """The local folder holding the checkpoint's files: the directory itself, or the Hub cache's
    snapshot it was loaded from (never downloads); None when neither is there."""
    if os.path.isdir(name):
        return name
    from transformers.utils import cached_file

    try:
        config_file = cached_file(
            name, "config.json", revision=None if revision == NO_REVISION else revision,
            local_files_only=True, _raise_exceptions_for_missing_entries=False,
        )
    except (OSError, ValueError):
        return None
    return os.path.dirname(config_file) if config_file else None


def weights_mb(folder: str | None, n_parameters: int, config) -> float:
    """MB of the checkpoint's safetensors weights, or n_parameters at the config's dtype."""
    files = glob.glob(os.path.join(folder, "*.safetensors")) if folder else []
    if files:
        return round(sum(os.path.getsize(f) for f in files) / 2**20, 1)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return round(n_parameters * dtype.itemsize / 2**20, 1)


def model_card(folder: str | None) -> dict[str, Any]:
    """license, languages (mteb's ISO codes) and release_date from the checkpoint's README.md front
    matter, for the fields it has."""
    path = os.path.join(folder, "README.md") if folder else None
    if not path or not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8", errors="replace") as file:
        text = file.read()
    if not text.startswith("---"):
        return {}  # no front matter
    from huggingface_hub import ModelCard
    from mteb.languages.iso_mappings import _hf_langs_to_iso_lang_scripts

    data = ModelCard(text).data.to_dict()
    fields: dict[str, Any] = {}
    if isinstance(data.get("license"), str):
        fields["license"] = data["license"]
    languages = data.get("language")
    if languages:
        fields["languages"] = _hf_langs_to_iso_lang_scripts(languages)
    if data.get("release_date"):
        fields["release_date"] = str(data["release_date"])
    return fields


def short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def mteb_model_name(name: str) -> str:
    """MTEB wants "organization/model": a Hub id is kept, a local checkpoint is named by its folder."""
    if name and not os.path.exists(name) and name.count("/") == 1:
        return name
    return "moee-fast/" + (os.path.basename(os.path.normpath(name)) or "model")
