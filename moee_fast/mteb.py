"""MoEE as an MTEB v2 model: `mteb.evaluate(MoEEModel(encoder, variant="sum"), tasks)`.

MoEEModel implements mteb's EncoderProtocol, so MTEB's own tasks and evaluators run unchanged:
encode returns a variant's vectors, and similarity scores them as the variant defines. For
"sum", MTEB's generic cosine of the vectors is (cos_HS + alpha cos_RW) / (1 + alpha), which ranks
exactly as MoEE(sum); `similarity` returns cos_HS + alpha cos_RW itself.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from typing import Any

try:
    import mteb
    from mteb.models.model_meta import ModelMeta
except ImportError as exc:  # mteb is an optional extra
    raise ImportError("moee_fast.mteb needs MTEB v2: pip install moee-fast[mteb]") from exc

import numpy as np
import torch

from . import ops
from .checks import VARIANTS, check_alpha, check_rw_source, check_variant
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
    batch_size, max_length: passed to `MoEEncoder.encode`.
    """

    def __init__(
        self,
        encoder: MoEEncoder,
        variant: str = "sum",
        alpha: float = 1.0,
        prompt: str | None = "prompteol",
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
        if instructions is True:
            self.instructions: Mapping[str, Instruction] = E5_INSTRUCTIONS
        elif instructions is False or instructions is None:
            self.instructions = {}
        elif isinstance(instructions, Mapping):
            self.instructions = dict(instructions)
        else:
            raise TypeError(f"instructions must be True, False or a mapping of task name to instruction, got {instructions!r}")
        self.reference_exact = bool(reference_exact)
        self.rw_source = check_rw_source(rw_source)
        if not (standardize in STANDARDIZE_CHOICES or isinstance(standardize, Standardizer)):
            raise ValueError(f"standardize must be None, 'per_batch' or a Standardizer, got {standardize!r}")
        if isinstance(standardize, Standardizer) and standardize.shape_key != self._shape_key:
            raise ValueError(f"the standardizer was fitted on shape {standardize.shape_key}, this model has {self._shape_key}")
        if standardize_batch_size < 1:
            raise ValueError(f"standardize_batch_size must be >= 1, got {standardize_batch_size}")
        self.standardize, self.standardize_batch_size = standardize, standardize_batch_size
        self.batch_size, self.max_length = batch_size, max_length
        self.model_name = model_name or _mteb_model_name(encoder.name)
        self.revision = revision or getattr(encoder.model.config, "_commit_hash", None) or "no_revision_available"
        self._meta: ModelMeta | None = None

    @property
    def _shape_key(self) -> tuple[int, int, int]:
        return self.encoder.hidden_size, self.encoder.num_moe_layers, self.encoder.num_experts

    @property
    def embed_dim(self) -> int:
        hidden, layers, experts = self._shape_key
        return {"hs": hidden, "rw": layers * experts}.get(self.variant, hidden + layers * experts)

    # ------------------------------------------------------------------------------- prompts
    def instruction_for(self, task_name: str, prompt_type: Any = None) -> str | None:
        """This task's instruction for the given MTEB prompt type, or None."""
        base = re.sub(r"\.v\d+$", "", task_name)
        for name in (task_name, base, _TASK_ALIASES.get(base)):
            if name in self.instructions:
                instruction = self.instructions[name]
                if isinstance(instruction, Mapping):
                    kind = getattr(prompt_type, "value", prompt_type)
                    return instruction.get(kind) or None
                return instruction or None
        return None

    def prompt_for(self, task_name: str, prompt_type: Any = None) -> Prompt | None:
        """The Prompt that turns this task's texts into model inputs (None: texts verbatim)."""
        instruction = self.instruction_for(task_name, prompt_type)
        if self.prompt is None and instruction is None:
            return None
        return build_prompt(self.prompt or "{text}", instruction=instruction, reference_exact=self.reference_exact)

    # -------------------------------------------------------------------------- the protocol
    def embed(self, texts: list[str], task_name: str = "", prompt_type: Any = None, show_progress_bar=None) -> MoEEmbeddings:
        """Raw embeddings of `texts` as this model prepares them for a task, standardised if asked."""
        out = self.encoder.encode(
            texts,
            batch_size=self.batch_size,
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

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None, **kwargs) -> np.ndarray:
        """float32 [N, embed_dim]: the variant's vectors of every text the DataLoader yields."""
        texts = [text for batch in inputs for text in batch["text"]]
        out = self.embed(texts, task_metadata.name, prompt_type, kwargs.get("show_progress_bar"))
        return out.vectors(self.variant, self.alpha).numpy()

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

    @property
    def experiment(self) -> dict[str, Any]:
        """What distinguishes this run's results from another's with the same checkpoint."""
        prompt = self.prompt if self.prompt in PRESETS or self.prompt is None else _short_hash(self.prompt)
        if isinstance(self.standardize, Standardizer):
            standardize = "fitted-" + _short_hash(str(self.standardize.to_dict()))
        elif self.standardize == "per_batch":
            standardize = f"per_batch{self.standardize_batch_size}"
        else:
            standardize = "none"
        if self.instructions is E5_INSTRUCTIONS:
            instructions = "e5"
        else:
            instructions = _short_hash(repr(sorted(self.instructions.items()))) if self.instructions else "none"
        return {
            "variant": self.variant,
            "alpha": self.alpha,
            "prompt": str(prompt),
            "instructions": instructions,
            "reference_exact": self.reference_exact,
            "rw_source": self.rw_source,
            "standardize": standardize,
        }

    @property
    def mteb_model_meta(self) -> ModelMeta:
        if self._meta is None:
            self._meta = ModelMeta(
                loader=None,
                name=self.model_name,
                revision=self.revision,
                release_date=None,
                languages=None,
                n_parameters=sum(p.numel() for p in self.encoder.model.parameters()),
                memory_usage_mb=None,
                max_tokens=self.max_length,
                embed_dim=self.embed_dim,
                license=None,
                open_weights=True,
                public_training_code=None,
                public_training_data=None,
                framework=["PyTorch"],
                similarity_fn_name=None,  # MTEB then scores with this model's similarity
                use_instructions=bool(self.instructions),
                training_datasets=None,
                experiment_kwargs=self.experiment,
            )
        return self._meta

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.experiment.items())
        return f"MoEEModel({self.model_name}, {settings})"


def _as_matrix(x) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float()
    return x.unsqueeze(0) if x.dim() == 1 else x


def _short_hash(text: str) -> str:
    return "custom-" + hashlib.sha256(text.encode()).hexdigest()[:8]


def _mteb_model_name(name: str) -> str:
    """MTEB wants "organization/model": a Hub id is kept, a local checkpoint is named by its folder."""
    if name and not os.path.exists(name) and name.count("/") == 1:
        return name
    return "moee-fast/" + (os.path.basename(os.path.normpath(name)) or "model")


def get_tasks(task_names: list[str]) -> list:
    """MTEB's task objects for these names."""
    return list(mteb.get_tasks(tasks=list(task_names)))


def evaluate(model: MoEEModel, tasks: list, output_dir: str | os.PathLike | None = None, overwrite: bool = False):
    """Run MTEB tasks (names or task objects) with `model`, writing MTEB's result files under
    `output_dir` (results/<model>/<revision>/experiments/<settings>/<task>.json). Returns mteb's
    ModelResult."""
    tasks = [get_tasks([task])[0] if isinstance(task, str) else task for task in tasks]
    cache = mteb.ResultCache(output_dir) if output_dir is not None else None
    return mteb.evaluate(model, tasks, cache=cache, overwrite_strategy="always" if overwrite else "only-missing")


def results_folder(model: MoEEModel, output_dir: str | os.PathLike):
    """The folder where `evaluate(model, ..., output_dir)` writes its task files."""
    return mteb.ResultCache(output_dir).get_task_result_path("task", model.mteb_model_meta).parent


__all__ = ["E5_INSTRUCTIONS", "MoEEModel", "PAPER_TASKS", "VARIANTS", "evaluate", "get_tasks", "results_folder"]
