"""MoEE as an MTEB v2 model: `mteb.evaluate(MoEEModel(encoder, variant="sum"), tasks)`.

MoEEModel implements mteb's EncoderProtocol, so MTEB's own tasks, evaluators and wrappers
(CompressionWrapper) run unchanged: encode returns a variant's vectors, and similarity scores them
as the variant defines. For "sum", MTEB's generic cosine of the vectors is
(cos_HS + alpha cos_RW) / (1 + alpha), which ranks exactly as MoEE(sum); `similarity` returns
cos_HS + alpha cos_RW itself.

Results are filed as mteb files any model's: under `<name>/<revision>/`, where the name carries
the variant, alpha, prompt and instructions (`allenai/OLMoE-1B-7B-0924-MoEE-sum-alpha1`, see
`moee_model_name`) and the revision is the checkpoint's. Only options that reproduce the authors'
released code rather than the paper's definitions (reference_exact, rw_source="logits",
standardize, max_length) are mteb experiments, in `<name>/<revision>/experiments/<options>/`.
"""

from __future__ import annotations

import copy
import glob
import hashlib
import json
import os
import re
from collections.abc import Mapping
from typing import Any

try:
    import mteb
    from mteb.models import CompressionWrapper
    from mteb.models.model_meta import ModelMeta, ScoringFunction
    from mteb.types import OutputDType
except ImportError as exc:  # mteb is an optional extra
    raise ImportError("moee_fast.mteb needs MTEB v2: pip install moee-fast[mteb]") from exc

import numpy as np
import torch

from . import ops
from .checks import VARIANTS, check_alpha, check_positive_int, check_rw_source, check_variant
from .embeddings import MoEEmbeddings, Standardizer
from .encoder import MoEEncoder
from .prompts import PRESETS, Prompt, build_prompt
from .similarity import cosine_matrix, cosine_pairwise

# The e5 instruction set, as the paper's evaluation used it, for the tasks it reports.
E5_INSTRUCTIONS: dict[str, str] = {
    "EmotionClassification": "Classify the emotion expressed in the given Twitter message into one of the six emotions: anger, fear, joy, love, sadness, and surprise",
    "ToxicConversationsClassification": "Classify the given comments as either toxic or not toxic",
    "TweetSentimentExtractionClassification": "Classify the sentiment of a given tweet as either positive, negative, or neutral",
    "MedrxivClusteringS2S": "Identify the main category of Medrxiv papers based on the titles",
    "TwentyNewsgroupsClustering": "Identify the topic or theme of the given news articles",
    "TwitterSemEval2015": "Retrieve tweets that are semantically similar to the given tweet",
    "TwitterURLCorpus": "Retrieve tweets that are semantically similar to the given tweet",
    "AskUbuntuDupQuestions": "Retrieve duplicate questions from AskUbuntu forum",
    "SciDocsRR": "Given a title of a scientific paper, retrieve the titles of other relevant papers",
    "StackOverflowDupQuestions": "Retrieve duplicate questions from StackOverflow forum",
    **{
        name: "Retrieve semantically similar text."
        for name in ("STS12", "STS13", "STS14", "STS15", "STS16", "BIOSSES", "SICK-R", "STSBenchmark")
    },
    "SummEval": "Given a news summary, retrieve other semantically similar summaries",
}

# The paper's MTEB task list (`moee mteb --paper`).
PAPER_TASKS: tuple[str, ...] = tuple(E5_INSTRUCTIONS)

# Later MTEB versions of a task keep its instruction.
_TASK_ALIASES = {"SummEvalSummarization": "SummEval"}

STANDARDIZE_CHOICES = (None, "per_batch")

# The settings that name a model (the paper's MoEE(sum) with alpha 1, PromptEOL, e5 instructions).
DEFAULT_VARIANT, DEFAULT_ALPHA, DEFAULT_PROMPT = "sum", 1.0, "prompteol"

# What mteb passes through encode_kwargs and MoEEModel.encode honours.
ENCODE_KWARGS = ("batch_size", "show_progress_bar", "precision")

# Most texts per forward when `moee mteb` is given no --batch-size: above what any token budget
# fills with real texts, so the budget decides (mteb's own default would be 32).
MTEB_BATCH_SIZE = 4096

NO_REVISION = "no_revision_available"

CITATION = """@inproceedings{li2025moee,
  title={Your Mixture-of-Experts {LLM} Is Secretly an Embedding Model for Free},
  author={Li, Ziyue and Zhou, Tianyi},
  booktitle={The Thirteenth International Conference on Learning Representations},
  year={2025}
}"""

# One instruction for every input of a task, or one per MTEB prompt type ("query", "document").
Instruction = str | Mapping[str, str]


class MoEEModel:
    """An MTEB v2 EncoderProtocol model over a MoEEncoder.

    variant: "hs", "rw", "concat" or "sum" (see `MoEEmbeddings.vectors`); alpha weighs cos_RW in "sum".
    prompt: a preset name (see prompts.PRESETS), a template with `{text}`, or None (text verbatim).
    instructions: True -> the paper's e5 instructions (E5_INSTRUCTIONS) for the tasks that have
        one; False -> none; or a mapping task name -> instruction (a string, or a mapping from
        "query"/"document" to strings).
    reference_exact: reproduce the authors' prompt strings byte for byte (see prompts.Prompt).
    rw_source: "scores" (RW as the paper defines it) or "logits" (raw router logits, as the
        authors' released code took for OLMoE, Qwen and Mixtral).
    standardize: None; "per_batch" (the authors' z-scores over each `standardize_batch_size`
        consecutive texts of one encode call: batch-dependent, for reproducing their numbers);
        or a Standardizer fitted on a corpus (`MoEEmbeddings.fit_standardizer`).
    batch_size: most texts per forward when mteb's encode_kwargs give none; max_length: passed to
        `MoEEncoder.encode`.
    model_name, revision: the name and revision results are filed under (default: see
        `moee_model_name`, and the checkpoint's commit).

    `mteb_model_meta` is a plain attribute (mteb's wrappers replace it), built by `model_meta`.
    """

    def __init__(
        self,
        encoder: MoEEncoder,
        variant: str = DEFAULT_VARIANT,
        alpha: float = DEFAULT_ALPHA,
        prompt: str | None = DEFAULT_PROMPT,
        instructions: bool | Mapping[str, Instruction] = True,
        reference_exact: bool = False,
        rw_source: str = "scores",
        standardize: str | Standardizer | None = None,
        standardize_batch_size: int = 128,
        batch_size: int | None = None,
        max_length: int | None = None,
        model_name: str | None = None,
        revision: str | None = None,
    ):
        self.encoder = encoder
        self.variant = check_variant(variant)
        self.alpha = check_alpha(alpha)
        if prompt is not None:
            build_prompt(prompt)  # fail now, not at the first task
        self.prompt = prompt
        self.instructions = _check_instructions(instructions)
        self.reference_exact = bool(reference_exact)
        self.rw_source = check_rw_source(rw_source)
        if not (standardize in STANDARDIZE_CHOICES or isinstance(standardize, Standardizer)):
            raise ValueError(f"standardize must be None, 'per_batch' or a Standardizer, got {standardize!r}")
        if isinstance(standardize, Standardizer) and standardize.shape_key != self._shape_key:
            raise ValueError(f"the standardizer was fitted on shape {standardize.shape_key}, this model has {self._shape_key}")
        self.standardize = standardize
        self.standardize_batch_size = check_positive_int("standardize_batch_size", standardize_batch_size)
        self.batch_size = check_positive_int("batch_size", batch_size, allow_none=True)
        self.max_length = check_positive_int("max_length", max_length, allow_none=True)
        self.model_name = model_name or moee_model_name(
            _mteb_model_name(encoder.name), self.variant, self.alpha, self.prompt, self.instructions
        )
        self.revision = revision or getattr(encoder.model.config, "_commit_hash", None) or NO_REVISION
        self.mteb_model_meta: ModelMeta = model_meta(self)

    @property
    def _shape_key(self) -> tuple[int, int, int]:
        return self.encoder.hidden_size, self.encoder.num_moe_layers, self.encoder.num_experts

    @property
    def embed_dim(self) -> int:
        return variant_dim(self.variant, *self._shape_key)

    # ------------------------------------------------------------------------------- prompts
    def instruction_for(self, task_name: str, prompt_type: Any = None) -> str | None:
        """This task's instruction for the given MTEB prompt type: None when the task has none,
        "" when it has one only for the other prompt type (a retrieval corpus, typically)."""
        base = re.sub(r"\.v\d+$", "", task_name)
        for name in (task_name, base, _TASK_ALIASES.get(base)):
            if name in self.instructions:
                instruction = self.instructions[name]
                if isinstance(instruction, Mapping):
                    return instruction.get(getattr(prompt_type, "value", prompt_type)) or ""
                return instruction
        return None

    def prompt_for(self, task_name: str, prompt_type: Any = None) -> Prompt | None:
        """The Prompt that turns this task's texts into model inputs (None: texts verbatim)."""
        instruction = self.instruction_for(task_name, prompt_type)
        if self.prompt is None and instruction is None:
            return None
        return build_prompt(self.prompt or "{text}", instruction=instruction, reference_exact=self.reference_exact)

    # -------------------------------------------------------------------------- the protocol
    def embed(self, texts: list[str], task_name: str = "", prompt_type: Any = None, show_progress_bar=None, batch_size=None) -> MoEEmbeddings:
        """Raw embeddings of `texts` as this model prepares them for a task, standardised if asked."""
        out = self.encoder.encode(
            texts,
            batch_size=self.batch_size if batch_size is None else batch_size,
            prompt=self.prompt_for(task_name, prompt_type),
            max_length=self.max_length,
            show_progress_bar=show_progress_bar,
            rw_source=self.rw_source,
        )
        if self.standardize == "per_batch":
            return out.standardized_per_batch(self.standardize_batch_size)
        if isinstance(self.standardize, Standardizer):
            return out.standardized(self.standardize)
        return out

    def encode(
        self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None,
        batch_size: int | None = None, show_progress_bar: bool | None = None, precision: str | None = None, **unknown,
    ) -> np.ndarray:
        """[N, embed_dim]: the variant's vectors of every text the DataLoader yields, float32, or
        quantized as mteb's CompressionWrapper does when `precision` (mteb's encode kwarg) names
        another OutputDType. batch_size: most texts per forward; show_progress_bar: the encoder's bar."""
        if unknown:
            raise TypeError(f"MoEEModel.encode got encode_kwargs it does not use: {', '.join(sorted(unknown))}; it takes {', '.join(ENCODE_KWARGS)}")
        batch_size = check_positive_int("encode_kwargs batch_size", batch_size, allow_none=True)
        output_dtype = OutputDType.from_str(precision) if precision is not None else OutputDType.FLOAT32
        if output_dtype is OutputDType.BINARY and self.variant == "rw" and self.rw_source == "scores":
            raise ValueError("precision='binary' keeps only signs, and RW scores are probabilities: every rw vector would be all ones")
        texts = [text for batch in inputs for text in batch["text"]]
        out = self.embed(texts, task_metadata.name, prompt_type, show_progress_bar, batch_size)
        vectors = out.vectors(self.variant, self.alpha)
        if output_dtype is OutputDType.FLOAT32:
            return vectors.numpy()
        quantizer = CompressionWrapper(_Precomputed(vectors, self.mteb_model_meta), output_dtype)
        return np.asarray(quantizer.encode(None, task_metadata=task_metadata, hf_split=hf_split, hf_subset=hf_subset))

    def similarity(self, embeddings1, embeddings2) -> torch.Tensor:
        """[N1, N2] scores of vectors from `encode`: cos_HS + alpha cos_RW for "sum", else cosine."""
        x, y = _as_matrix(embeddings1), _as_matrix(embeddings2)
        if self.variant != "sum":
            return cosine_matrix(x, y)
        # The HS and RW parts of "sum" vectors are unit HS and sqrt(alpha) * unit RW: their cosines
        # are cos_HS and cos_RW whatever the scale, so combined_cosine recovers the score exactly.
        hidden = self.encoder.hidden_size
        return ops.combined_cosine(x[:, :hidden], x[:, hidden:], y[:, :hidden], y[:, hidden:], alpha=self.alpha)

    def similarity_pairwise(self, embeddings1, embeddings2) -> torch.Tensor:
        """[N] score of embeddings1[i] against embeddings2[i], as `similarity` gives it."""
        x, y = _as_matrix(embeddings1), _as_matrix(embeddings2)
        if self.variant != "sum":
            return cosine_pairwise(x, y)
        hidden = self.encoder.hidden_size
        return cosine_pairwise(x[:, :hidden], y[:, :hidden]) + self.alpha * cosine_pairwise(x[:, hidden:], y[:, hidden:])

    # ------------------------------------------------------------------------------ settings
    @property
    def naming_settings(self) -> dict[str, Any]:
        """The settings the model name carries, as MoEEModel (and the loader) take them."""
        return {"variant": self.variant, "alpha": self.alpha, "prompt": self.prompt, "instructions": _instructions_setting(self.instructions)}

    @property
    def experiment_kwargs(self) -> dict[str, Any]:
        """The reproduction options that differ from the paper's definitions: mteb files these
        results as an experiment of the model, and passes them back to the loader."""
        options: dict[str, Any] = {}
        if self.reference_exact:
            options["reference_exact"] = True
        if self.rw_source != "scores":
            options["rw_source"] = self.rw_source
        if self.standardize == "per_batch":
            options.update(standardize="per_batch", standardize_batch_size=self.standardize_batch_size)
        elif isinstance(self.standardize, Standardizer):
            options["standardize"] = "fitted-" + _short_hash(str(self.standardize.to_dict()))
        if self.max_length is not None:
            options["max_length"] = self.max_length
        return options

    def __repr__(self) -> str:
        settings = {**self.naming_settings, **self.experiment_kwargs}
        settings["instructions"] = _instructions_label(self.instructions) or "e5"
        return f"MoEEModel({self.model_name}, {', '.join(f'{k}={v!r}' for k, v in settings.items())})"


class _Precomputed:
    """Vectors already encoded, behind the encoder protocol, so mteb's CompressionWrapper
    quantizes them exactly as it quantizes any model's."""

    def __init__(self, vectors: torch.Tensor, meta: ModelMeta):
        self.vectors, self.mteb_model_meta = vectors, meta

    def encode(self, inputs, **kwargs) -> torch.Tensor:
        return self.vectors


def variant_dim(variant: str, hidden: int, layers: int, experts: int) -> int:
    """Dimensions of a variant's vectors: H for hs, L*E for rw, H + L*E for concat and sum."""
    return {"hs": hidden, "rw": layers * experts}.get(variant, hidden + layers * experts)


def _check_instructions(instructions) -> Mapping[str, Instruction]:
    if instructions is True:
        return E5_INSTRUCTIONS
    if instructions is False or instructions is None:
        return {}
    if isinstance(instructions, Mapping):
        return E5_INSTRUCTIONS if instructions == E5_INSTRUCTIONS else dict(instructions)
    raise TypeError(f"instructions must be True, False or a mapping of task name to instruction, got {instructions!r}")


def _instructions_setting(instructions: Mapping[str, Instruction]) -> bool | dict:
    """How the loader takes these instructions back: True (e5), False (none) or the mapping."""
    if instructions is E5_INSTRUCTIONS:
        return True
    return {name: dict(value) if isinstance(value, Mapping) else value for name, value in instructions.items()} or False


def _instructions_label(instructions: Mapping[str, Instruction]) -> str:
    if instructions is E5_INSTRUCTIONS:
        return ""
    if not instructions:
        return "noinstructions"
    return "instructions-" + _short_hash(json.dumps(_instructions_setting(instructions), sort_keys=True))


def moee_model_name(base: str, variant: str, alpha: float, prompt: str | None, instructions: Mapping[str, Instruction]) -> str:
    """The name MoEE results are filed under: `<base>-MoEE-<variant>`, then `-alpha<alpha>` for
    "sum", then the prompt unless it is PromptEOL (`-<preset>`, `-verbatim` or `-template-<hash>`),
    then the instructions unless they are the paper's e5 ones (`-noinstructions` or
    `-instructions-<hash>`). E.g. `allenai/OLMoE-1B-7B-0924-MoEE-sum-alpha1`."""
    parts = [base, "MoEE", variant]
    if variant == "sum":
        parts.append(f"alpha{alpha:.12g}")  # 1.0 -> alpha1, 0.25 -> alpha0.25
    if prompt != DEFAULT_PROMPT:
        parts.append("verbatim" if prompt is None else prompt if prompt in PRESETS else "template-" + _short_hash(prompt))
    parts.append(_instructions_label(instructions))
    return "-".join(part for part in parts if part)


# ------------------------------------------------------------------------------------ metadata
def model_meta(model: MoEEModel) -> ModelMeta:
    """mteb's ModelMeta of `model`: sizes counted from the checkpoint's config, memory from its
    weight files, license/languages/release date from its model card when it has one, and a loader
    (`load_moee_model`) that rebuilds the model from the name's settings and the experiment's."""
    encoder = model.encoder
    config = encoder.model.config
    counts = parameter_counts(type(encoder.model), config)
    folder = checkpoint_folder(encoder.name, model.revision)
    return _moee_meta(
        model.model_name, model.revision, encoder.name, model.naming_settings, counts,
        embed_dim=model.embed_dim,
        max_tokens=getattr(config, "max_position_embeddings", None),
        memory_usage_mb=_memory_usage_mb(folder, counts[0], config),
        card=_model_card(folder),
        experiment_kwargs=model.experiment_kwargs,
    )


def _moee_meta(name: str, revision: str, checkpoint: str, naming_settings: dict[str, Any], counts: tuple[int, int, int], *,
               embed_dim: int, max_tokens: int | None, memory_usage_mb: float, card: dict[str, Any],
               experiment_kwargs: dict[str, Any] | None = None) -> ModelMeta:
    """The ModelMeta of a MoEE model of `checkpoint`; counts: (all, active, embedding) parameters."""
    is_hub_id = _mteb_model_name(checkpoint) == checkpoint
    return ModelMeta(
        loader=load_moee_model,
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


def _memory_usage_mb(folder: str | None, n_parameters: int, config) -> float:
    """MB of the checkpoint's safetensors weights, or n_parameters at the config's dtype."""
    files = glob.glob(os.path.join(folder, "*.safetensors")) if folder else []
    if files:
        return round(sum(os.path.getsize(f) for f in files) / 2**20, 1)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return round(n_parameters * dtype.itemsize / 2**20, 1)


def _model_card(folder: str | None) -> dict[str, Any]:
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


def load_moee_model(model_name: str, revision: str | None = None, *, checkpoint: str, device: str | None = None,
                    dtype: str | torch.dtype | None = None, embed_dim: int | None = None, **settings) -> MoEEModel:
    """mteb's loader for MoEE models (`ModelMeta.load_model`, `mteb.get_model`): loads `checkpoint`
    at `revision` and wraps it with `settings` (MoEEModel's arguments), named `model_name`."""
    hub_revision = None if revision in (None, NO_REVISION) or os.path.isdir(checkpoint) else revision
    encoder = MoEEncoder.from_pretrained(checkpoint, device=device, dtype=dtype, **({"revision": hub_revision} if hub_revision else {}))
    model = MoEEModel(encoder, model_name=model_name, revision=revision, **settings)
    if embed_dim is not None and embed_dim != model.embed_dim:
        raise ValueError(
            f"{model_name}: the {model.variant} variant has {model.embed_dim} dimensions, not {embed_dim}; "
            "MoEE vectors cannot be truncated"
        )
    return model


def _as_matrix(x) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float()
    return x.unsqueeze(0) if x.dim() == 1 else x


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _mteb_model_name(name: str) -> str:
    """MTEB wants "organization/model": a Hub id is kept, a local checkpoint is named by its folder."""
    if name and not os.path.exists(name) and name.count("/") == 1:
        return name
    return "moee-fast/" + (os.path.basename(os.path.normpath(name)) or "model")


# ---------------------------------------------------------------------------------- registry
# The checkpoints the MoEE paper and its released code evaluate, known to mteb by the names of their
# default settings in each variant (`mteb.get_model("allenai/OLMoE-1B-7B-0924-MoEE-sum-alpha1")`).
# Revisions: the Hub commits of their published snapshots. Counts (all, active, embedding
# parameters of the base model) as `parameter_counts` gives them for the published configs; shape:
# (hidden size, MoE layers, experts); memory: their bf16 weights, LM head included.
PAPER_CHECKPOINTS: dict[str, dict[str, Any]] = {
    "allenai/OLMoE-1B-7B-0924": dict(
        revision="6d84c48581ece794365f2b8e9cfb043c68ade9c5", counts=(6816139264, 1075972096, 103022592),
        shape=(2048, 16, 64), max_tokens=4096,
        card={"license": "apache-2.0", "languages": ["eng-Latn"], "release_date": "2024-09-03"},
    ),
    "Qwen/Qwen1.5-MoE-A2.7B": dict(
        revision="1a758c50ecb6350748b9ce0a99d2352fd9fc11c9", counts=(14004619264, 2066843648, 311164928),
        shape=(2048, 24, 60), max_tokens=8192,
        card={"license": "https://huggingface.co/Qwen/Qwen1.5-MoE-A2.7B/blob/main/LICENSE", "languages": ["eng-Latn"], "release_date": "2024-03-28"},
    ),
    "deepseek-ai/deepseek-moe-16b-base": dict(
        revision="521d2bc4fb69a3f3ae565310fcc3b65f97af2580", counts=(16166012928, 2409220096, 209715200),
        shape=(2048, 27, 64), max_tokens=4096,
        card={"license": "https://github.com/deepseek-ai/DeepSeek-MoE/blob/main/LICENSE-MODEL", "languages": ["eng-Latn", "zho-Hans"], "release_date": "2024-01-11"},
    ),
    "mistralai/Mixtral-8x7B-v0.1": dict(
        revision="fc7ac94680e38d7348cfa806e51218e6273104b0", counts=(46571720704, 12617781248, 131072000),
        shape=(4096, 32, 8), max_tokens=32768,
        card={"license": "apache-2.0", "languages": ["deu-Latn", "eng-Latn", "fra-Latn", "ita-Latn", "spa-Latn"], "release_date": "2023-12-11"},
    ),
}


def _register_paper_models() -> None:
    """Add each paper checkpoint's four variants, at their default settings, to mteb's registry."""
    from mteb.models.model_implementations import MODEL_REGISTRY

    for checkpoint, known in PAPER_CHECKPOINTS.items():
        for variant in VARIANTS:
            settings = {"variant": variant, "alpha": DEFAULT_ALPHA, "prompt": DEFAULT_PROMPT, "instructions": True}
            name = moee_model_name(checkpoint, variant, DEFAULT_ALPHA, DEFAULT_PROMPT, E5_INSTRUCTIONS)
            MODEL_REGISTRY.setdefault(name, _moee_meta(
                name, known["revision"], checkpoint, settings, known["counts"],
                embed_dim=variant_dim(variant, *known["shape"]),
                max_tokens=known["max_tokens"],
                memory_usage_mb=round((known["counts"][0] + known["counts"][2]) * 2 / 2**20, 1),
                card=known["card"],
            ))


_register_paper_models()


# ---------------------------------------------------------------------------------- running
def get_tasks(task_names: list[str]) -> list:
    """MTEB's task objects for these names."""
    return list(mteb.get_tasks(tasks=list(task_names)))


def evaluate(model: MoEEModel, tasks: list, output_dir: str | os.PathLike | None = None, overwrite: bool = False,
             encode_kwargs: dict[str, Any] | None = None):
    """Run MTEB tasks (names or task objects) with `model`, writing MTEB's result files under
    `output_dir` (see `results_folder`; mteb's default cache when None). encode_kwargs: mteb's
    (batch_size defaults to the model's, else MTEB_BATCH_SIZE: the token budget decides).
    Returns mteb's ModelResult."""
    tasks = [get_tasks([task])[0] if isinstance(task, str) else task for task in tasks]
    cache = mteb.ResultCache(output_dir) if output_dir is not None else mteb.ResultCache()
    encode_kwargs = {"batch_size": model.batch_size or MTEB_BATCH_SIZE, **(encode_kwargs or {})}
    return mteb.evaluate(
        model, tasks, cache=cache, encode_kwargs=encode_kwargs, overwrite_strategy="always" if overwrite else "only-missing"
    )


def results_folder(model: MoEEModel, output_dir: str | os.PathLike | None = None, precision: str | None = None):
    """The folder where `evaluate(model, ..., output_dir)` writes its task files:
    `<output_dir>/results/<name with / as __>/<revision>/`, then `experiments/<options>/` when
    the model has reproduction options (`MoEEModel.experiment_kwargs`) or a `precision` is asked
    (mteb adds it as `output_dtypes`)."""
    cache = mteb.ResultCache(output_dir) if output_dir is not None else mteb.ResultCache()
    meta = model.mteb_model_meta
    if precision is not None:
        options = {**(meta.experiment_kwargs or {}), "output_dtypes": OutputDType.from_str(precision).value}
        meta = meta.model_copy(update={"experiment_kwargs": options})
    return cache.get_task_result_path("task", meta).parent


__all__ = [
    "E5_INSTRUCTIONS", "MoEEModel", "PAPER_CHECKPOINTS", "PAPER_TASKS", "VARIANTS", "evaluate", "get_tasks", "load_moee_model",
    "model_meta", "moee_model_name", "parameter_counts", "results_folder",
]
