"""The MTEB model wrapper: `mteb.evaluate(MoEEModel(encoder, variant="sum"), tasks)`.

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

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from mteb.models import CompressionWrapper
from mteb.models.model_meta import ModelMeta
from mteb.types import OutputDType

from .. import ops
from ..checks import check_alpha, check_pooling, check_positive_int, check_rw_source, check_variant
from ..embeddings import MoEEmbeddings, Standardizer
from ..encoder import MoEEncoder
from ..prompts import Prompt, build_prompt
from ..similarity import cosine_matrix, cosine_pairwise
from .data import _TASK_ALIASES, DEFAULT_ALPHA, DEFAULT_PROMPT, DEFAULT_VARIANT, NO_REVISION, Instruction
from .naming import (
    check_instructions, checkpoint_folder, instructions_label, instructions_setting, model_card, moee_meta,
    moee_model_name, mteb_model_name, parameter_counts, short_hash, variant_dim, weights_mb,
)

STANDARDIZE_CHOICES = (None, "per_batch")

# What mteb passes through encode_kwargs and MoEEModel.encode honours.
ENCODE_KWARGS = ("batch_size", "show_progress_bar", "precision")


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
    rw_pooling, hs_pooling: "last" (the paper's last token) or "mean" (over every token the model
        sees, prompt and special tokens included); part of the model's name.
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
        rw_pooling: str = "last",
        hs_pooling: str = "last",
    ):
        self.encoder = encoder
        self.variant = check_variant(variant)
        self.alpha = check_alpha(alpha)
        if prompt is not None:
            build_prompt(prompt)  # fail now, not at the first task
        self.prompt = prompt
        self.instructions = check_instructions(instructions)
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
        self.rw_pooling = check_pooling("rw_pooling", rw_pooling)
        self.hs_pooling = check_pooling("hs_pooling", hs_pooling)
        self.model_name = model_name or moee_model_name(
            mteb_model_name(encoder.name), self.variant, self.alpha, self.prompt, self.instructions,
            self.rw_pooling, self.hs_pooling,
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
            rw_pooling=self.rw_pooling,
            hs_pooling=self.hs_pooling,
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
        """The settings the model name carries, as MoEEModel (and the loader) take them (a pooling
        only where it is not the paper's last token and the variant uses its part)."""
        settings = {"variant": self.variant, "alpha": self.alpha, "prompt": self.prompt, "instructions": instructions_setting(self.instructions)}
        if self.rw_pooling != "last" and self.variant != "hs":
            settings["rw_pooling"] = self.rw_pooling
        if self.hs_pooling != "last" and self.variant != "rw":
            settings["hs_pooling"] = self.hs_pooling
        return settings

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
            options["standardize"] = "fitted-" + short_hash(str(self.standardize.to_dict()))
        if self.max_length is not None:
            options["max_length"] = self.max_length
        return options

    def __repr__(self) -> str:
        settings = {**self.naming_settings, **self.experiment_kwargs}
        settings["instructions"] = instructions_label(self.instructions) or "e5"
        return f"MoEEModel({self.model_name}, {', '.join(f'{k}={v!r}' for k, v in settings.items())})"


class _Precomputed:
    """Vectors already encoded, behind the encoder protocol, so mteb's CompressionWrapper
    quantizes them exactly as it quantizes any model's."""

    def __init__(self, vectors: torch.Tensor, meta: ModelMeta):
        self.vectors, self.mteb_model_meta = vectors, meta

    def encode(self, inputs, **kwargs) -> torch.Tensor:
        return self.vectors


# ------------------------------------------------------------------------------------ metadata
def model_meta(model: MoEEModel) -> ModelMeta:
    """mteb's ModelMeta of `model`: sizes counted from the checkpoint's config, memory from its
    weight files, license/languages/release date from its model card when it has one, and a loader
    (`load_moee_model`) that rebuilds the model from the name's settings and the experiment's."""
    encoder = model.encoder
    config = encoder.model.config
    counts = parameter_counts(type(encoder.model), config)
    folder = checkpoint_folder(encoder.name, model.revision)
    return moee_meta(
        model.model_name, model.revision, encoder.name, model.naming_settings, counts,
        loader=load_moee_model,
        embed_dim=model.embed_dim,
        max_tokens=getattr(config, "max_position_embeddings", None),
        memory_usage_mb=weights_mb(folder, counts[0], config),
        card=model_card(folder),
        experiment_kwargs=model.experiment_kwargs,
    )



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

