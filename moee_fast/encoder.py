"""MoEEncoder: texts in, MoEE embeddings (HS and RW at each text's last token) out.

One packed forward per batch through the base model (no LM head), with forward hooks on the
routers that keep only what the embedding reads: each MoE router's row at the last tokens,
reduced to fp32 scores as its layer runs. Everything that makes the forward fast (packed
attention, fused ops, the last layer on the last tokens only) is moee_fast.fastpath, installed
by the constructor; `enc.fast_path` says what it applied.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from . import fastpath, loading, ops
from .adapters import Adapter, adapter_for
from .batching import Batch, plan_batches
from .checks import RW_SOURCES, check_rw_source  # noqa: F401  (RW_SOURCES re-exported)
from .checks import check_context, check_finite_rows, check_max_length, check_positive_int, check_unicode
from .embeddings import MoEEmbeddings
from .fastpath import attention, state
from .prompts import resolve_prompt, tokenize
from .quantize import avoid_unsupported_cpu_packing, run_int8_linears_on_rows, with_quantization

# Tokens per packed forward. On CPU (scaled OLMoE, packed batches) 1536-2048 measured best, 4096
# 5% and 8192 15% slower: more rows per expert no longer pay once activations leave L2. On CUDA
# larger batches fill the chip (gpu_report.py).
DEFAULT_TOKEN_BUDGET = {"cpu": 2048, "cuda": 32768}

# Keys of from_pretrained's **hf_kwargs that also apply to the config and tokenizer.
_SHARED_HF_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "subfolder")


class _RouterTap:
    """Forward hooks on the MoE routers: inside one of this encoder's forwards, each keeps its
    layer's rows at the last tokens, as fp32 scores, in that forward's state, so no all-token
    router tensor outlives its layer and concurrent forwards never share what they keep."""

    def __init__(self, routers: list[nn.Module], logits_index: int):
        self.logits_index = logits_index
        self.handles = [router.register_forward_hook(self._hook) for router in routers]

    def _hook(self, module, args, output):
        forward = state.current()
        if forward is None or forward.owner is not self:  # not one of this encoder's forwards
            return
        logits = output[self.logits_index] if isinstance(output, (tuple, list)) else output
        # A trimmed last layer routes only the B last tokens; every other layer routes N rows.
        if logits.shape[0] == forward.batch_size:
            rows = torch.arange(forward.batch_size, device=logits.device)
        else:
            rows = forward.last_on(logits.device)  # each router's own device under a device_map
        if forward.scoring == "softmax":
            forward.kept.append(ops.gather_router_softmax([logits], rows, check_rows=False)[:, 0])
        elif forward.scoring == "sigmoid":
            forward.kept.append(torch.sigmoid(logits.index_select(0, rows).float()))
        else:  # "logits": the raw router scores
            forward.kept.append(logits.index_select(0, rows).float())


class MoEEncoder:
    """Encode texts into MoEE embeddings with a Mixture-of-Experts decoder.

    >>> enc = MoEEncoder.from_pretrained("allenai/OLMoE-1B-7B-0924")
    >>> out = enc.encode(["A sentence.", "Another one."], prompt='This sentence : "{text}" means in one word:"')
    >>> out.hs.shape, out.rw.shape  # [2, 2048], [2, 16, 64]

    Thread safety: concurrent `encode` calls on one encoder are correct. Everything a call needs
    lives in objects it creates (its batch plan, and one `fastpath.state.ForwardState` per forward,
    which the hooks read through a context variable); the model is read-only in inference mode, so
    its forwards need no lock (tests/test_concurrency.py checks 8 threads bitwise against one).
    """

    def __init__(
        self, model: nn.Module, tokenizer, adapter: Adapter, name: str = "", token_budget: int | None = None,
        fast_path: str | Iterable[str] = "all",
    ):
        self.model = model.eval().requires_grad_(False)  # inference only, in every thread
        # Packed texts, fused ops, last-token trim: see moee_fast/fastpath and `self.fast_path`.
        self.fast_path = fastpath.install(model, fast_path)
        self.tokenizer = tokenizer
        self.adapter = adapter
        self.name = name
        self.device = _input_device(model)
        self.token_budget = token_budget or DEFAULT_TOKEN_BUDGET.get(self.device.type, 8192)
        self.routers = adapter.routers(model)
        self._tap = _RouterTap(self.routers, adapter.logits_position(model))
        # The padded SDPA fallback costs B x longest: then batch plans count padded slots.
        self._count_padding = "attention" in self.fast_path.parts and attention.runs_padded(model, self.device)

    # ----------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike, device=None, dtype=None, fast_path: str | Iterable[str] = "all",
        quantize: str | None = None, **hf_kwargs,
    ) -> MoEEncoder:
        """Load a Mixture-of-Experts checkpoint (local directory or Hub id) as an encoder.

        device: None -> CUDA when available, else CPU; weights load straight onto it. dtype: None
        -> bfloat16 on CUDA, float32 on CPU. fast_path: "all", "none" or a set of parts of
        moee_fast.fastpath.PARTS (for debugging and A/B runs; embeddings agree to fp32 rounding).
        quantize: None, "nf4" or "int8": the paper's bitsandbytes settings (moee_fast.quantize).
        Other keyword arguments go to transformers' `from_pretrained` (revision, device_map,
        quantization_config, experts_implementation (then the experts part is left off), ...).
        """
        from transformers import AutoModel

        from . import models  # registers the families transformers lacks

        name = os.path.expanduser(os.fspath(name_or_path))
        _check_location(name)
        parts = fastpath.resolve_parts(fast_path)
        if "experts_implementation" in hf_kwargs:  # the caller's choice of experts kernels stands
            parts = tuple(part for part in parts if part != "experts")
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = _resolve_dtype(dtype, device)
        if hf_kwargs.pop("attn_implementation", None) is not None:
            warnings.warn("attn_implementation is ignored: moee-fast runs its own packed attention", stacklevel=2)
        loading.refuse_remote_code(hf_kwargs)
        hf_kwargs = with_quantization(hf_kwargs, quantize, device)
        shared = {k: hf_kwargs[k] for k in _SHARED_HF_KWARGS if k in hf_kwargs}
        try:
            config = loading.load_config(name, **shared)
        except OSError as exc:
            raise OSError(f"could not load a checkpoint from {name!r}: not a local directory, and {exc}") from exc
        model_class = _base_model_class(config)
        adapter = adapter_for(config.model_type, model_class)

        loading.check_weight_files(loading.checkpoint_directory(name, hf_kwargs.get("subfolder")), hf_kwargs.get("allow_pickle", False))
        with _quiet_transformers(), loading.naming_unreadable_weights(name, hf_kwargs):
            if config.model_type in models.NATIVE_LOADERS:  # streams each tensor onto `device`
                model = models.NATIVE_LOADERS[config.model_type](name, config=config, dtype=dtype, device=device, **hf_kwargs)
            else:
                kwargs = loading.transformers_kwargs(hf_kwargs)
                model = AutoModel.from_pretrained(name, dtype=dtype, **_placement(device, kwargs), **kwargs)
        avoid_unsupported_cpu_packing(model)
        run_int8_linears_on_rows(model)
        tokenizer = loading.load_tokenizer(name, **shared)
        return cls(model, tokenizer, adapter, name=name, fast_path=parts)

    # ----------------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def context_length(self) -> int | None:
        """Most tokens (prompt included) a text may have: the model's position count."""
        return getattr(self.model.config, "max_position_embeddings", None)

    @property
    def num_moe_layers(self) -> int:
        return len(self.routers)

    @property
    def num_experts(self) -> int:
        return self.routers[0].weight.shape[0]

    def encode(
        self,
        texts: Sequence[str],
        batch_size: int | None = None,
        prompt: str | None = None,
        max_length: int | None = None,
        show_progress_bar: bool | None = None,
        rw_source: str = "scores",
    ) -> MoEEmbeddings:
        """Embed `texts`; rows of the result follow the input order.

        batch_size: most texts per forward (None: only the token budget limits a batch).
        prompt: None (text verbatim) or a template containing `{text}`.
        max_length: token limit; only the text inside the template is shortened, with a warning.
        rw_source: "scores" (RW as defined: the family's scoring function of the router logits,
            in fp32) or "logits" (the raw router logits, as some published evaluations used).
        """
        texts = _check_texts(texts)
        check_unicode(texts)
        batch_size = check_positive_int("batch_size", batch_size, allow_none=True)
        max_length = check_max_length(max_length, self.context_length)
        check_rw_source(rw_source)
        scoring = self.adapter.scoring if rw_source == "scores" else "logits"
        template = resolve_prompt(prompt)
        metadata = {"model": self.name, "prompt": "" if prompt is None else str(prompt), "rw": scoring}
        if not texts:
            return MoEEmbeddings.empty(self.hidden_size, self.num_moe_layers, self.num_experts, metadata)
        ids, truncated = tokenize(self.tokenizer, texts, template, max_length)
        if truncated:
            warnings.warn(f"{truncated} of {len(texts)} texts were truncated to max_length={max_length} tokens", stacklevel=2)
        for i, seq in enumerate(ids):
            if not seq:
                raise ValueError(
                    f"texts[{i}] is empty and this tokenizer adds no special token, so it has no last "
                    "token to read; use a prompt template or drop the text"
                )
        check_context([len(seq) for seq in ids], self.context_length)
        hs = torch.empty(len(texts), self.hidden_size, dtype=torch.float32)
        rw = torch.empty(len(texts), self.num_moe_layers, self.num_experts, dtype=torch.float32)
        show = show_progress_bar if show_progress_bar is not None else (len(texts) >= 1000 and _stderr_is_tty())
        from tqdm.auto import tqdm

        with tqdm(total=len(texts), disable=not show, desc="encode", unit="text") as bar:
            for batch, (batch_hs, batch_rw) in self._run_batches(ids, batch_size, scoring):
                batch_hs, batch_rw = _to_host(batch_hs, batch_rw)
                check_finite_rows(batch_hs, batch_rw, batch.indices)
                index = torch.tensor(batch.indices)
                hs[index], rw[index] = batch_hs, batch_rw
                bar.update(len(batch.indices))
        metadata["tokens"] = str(sum(len(seq) for seq in ids))
        return MoEEmbeddings(hs, rw, metadata)

    # ----------------------------------------------------------------------------------------
    def _run_batches(self, ids: list[list[int]], batch_size: int | None, scoring: str):
        """Yield (batch, (hs, rw)) for every batch of this call. After an out-of-memory error the
        texts not yet run are re-planned at half the failed batch's cost, for this call only."""
        lengths, budget, warned = [len(seq) for seq in ids], self.token_budget, False
        todo = self._plan(lengths, range(len(ids)), budget, batch_size)
        while todo:
            batch = todo.pop(0)
            result = self._try_forward(ids, batch, scoring)
            if result is not None:
                yield batch, result
                continue
            failed = batch.cost(self._count_padding)
            budget = max(1, failed // 2)
            if not warned:
                warnings.warn(
                    f"out of memory at {failed} tokens: the rest of this call runs batches of at most "
                    f"{budget} tokens (token_budget stays {self.token_budget})", stacklevel=4,
                )
                warned = True
            todo = self._plan(lengths, batch.indices + [i for b in todo for i in b.indices], budget, batch_size)

    def _plan(self, lengths: list[int], indices: Iterable[int], budget: int, batch_size: int | None) -> list[Batch]:
        """Batches of the texts at `indices` (positions in `lengths`), within `budget`."""
        indices = list(indices)
        plan = plan_batches([lengths[i] for i in indices], budget, batch_size, count_padding=self._count_padding)
        return [Batch([indices[j] for j in b.indices], b.tokens, b.slots) for b in plan]

    def _try_forward(self, ids: list[list[int]], batch: Batch, scoring: str):
        """The batch's (hs, rw), or None if it ran out of memory and can be split."""
        seqs = [ids[i] for i in batch.indices]
        try:
            return self._forward(seqs, scoring)
        except torch.OutOfMemoryError:
            if len(seqs) == 1:  # nothing smaller to retry: the error goes to the caller
                raise
        # Freed here, outside the handler: its traceback pins the failed forward's activations.
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None

    @torch.inference_mode()
    def _forward(self, seqs: list[list[int]], scoring: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One packed forward: each text's HS [B, H] and its routers' rows [B, L, E], fp32."""
        input_ids, position_ids, layout = attention.pack(seqs, self.device, pin=self.device.type == "cuda")
        forward = state.ForwardState(layout.last, input_ids.shape[1], scoring, owner=self._tap)
        with state.running(forward):
            out = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False, moee_packing=layout)
        hs = out.last_hidden_state[0]
        if hs.shape[0] != layout.batch_size:  # the final norm ran on every token (no "trim" part)
            hs = hs.index_select(0, forward.last_on(hs.device))
        kept = forward.kept
        return hs.float(), torch.stack([rows.to(kept[0].device) for rows in kept], dim=1)


# --------------------------------------------------------------------------------------------
def _to_host(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The batch's results on the CPU. From CUDA: non-blocking copies into pinned memory, then one
    wait on an event after them (no implicit synchronisation inside torch's copies)."""
    if not tensors[0].is_cuda:
        return list(tensors)
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for h, t in zip(host, tensors):
        h.copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    done.synchronize()
    return host


def _check_texts(texts) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a list of strings, got {type(texts).__name__}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] must be a string, got {type(text).__name__}")
    return list(texts)


def _check_location(name: str) -> None:
    """A path that is not a directory fails here, naming it; anything shaped like a Hub id
    ("name" or "org/name") is left to transformers."""
    if os.path.isdir(name):
        return
    parts = name.split("/")
    hub_like = len(parts) <= 2 and all(parts) and not name.startswith((".", "~")) and os.sep == "/"
    if not hub_like or os.path.exists(name):
        raise FileNotFoundError(f"no checkpoint directory at {name!r}")


def _input_device(model: nn.Module) -> torch.device:
    """Where a batch's inputs go: the execution device accelerate's hooks name when a device_map
    spread or offloaded the model (offloaded weights wait on the meta device), else its first
    parameter's device that holds data."""
    for module in model.modules():  # the embedding comes first in every family
        device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    return next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))


def _placement(device: torch.device, hf_kwargs: dict) -> dict:
    """Load straight onto an accelerator (no pass through host memory) unless the caller placed
    the model with a device_map; CPU is where transformers loads anyway."""
    if device.type == "cpu" or "device_map" in hf_kwargs:
        return {}
    return {"device_map": {"": device}}


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16', 'float16'")
        return resolved
    return dtype


def _base_model_class(config):
    """The base-model class (no LM head) transformers maps this config to, or None."""
    from transformers import AutoModel

    try:
        return AutoModel._model_mapping[type(config)]
    except KeyError:
        return None


@contextlib.contextmanager
def _quiet_transformers():
    """The base model loads from a causal-LM checkpoint: its unused lm_head weights are expected,
    so transformers' load report about them, and its per-shard progress bar, are noise."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _stderr_is_tty() -> bool:
    import sys

    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
