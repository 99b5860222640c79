"""MoEEncoder: texts in, MoEE embeddings (HS and RW at each text's last token, or their mean over
its tokens: `encode`'s pooling options) out.

One packed forward per batch through the base model (no LM head). The fast path, installed by
the constructor, holds the router tap (hooks that keep each MoE router's row at the last tokens,
as fp32 scores, as its layer runs) and whatever makes the forward fast (packed attention, fused
ops, the last layer on the last tokens only); `enc.fast_path` says what it applied, and
`enc.fast_path.remove()` undoes all of it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from . import fastpath, loading, ops
from .adapters import Adapter
from .packing import Batch, pack, plan_batches
from .checks import RW_SOURCES, check_rw_source  # noqa: F401  (RW_SOURCES re-exported)
from .checks import check_finite_rows, check_layer, check_layers, check_max_length, check_pooling
from .checks import check_positive_int, check_unicode
from .embeddings import MoEEmbeddings
from .fastpath import attention, router_tap, state
from .prompts import resolve_prompt, token_ids

# Tokens per packed forward. On CPU more rows per expert stop paying once activations leave L2;
# on CUDA larger batches fill the chip (measurements: benchmarks/results/cpu_ops_auto.md, gpu_report.py).
DEFAULT_TOKEN_BUDGET = {"cpu": 2048, "cuda": 32768}

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
        self.routers = adapter.routers(model)
        # Router tap, packed texts, fused ops, last-token trim: see moee_fast/fastpath.
        self.fast_path = fastpath.install(model, fast_path, self.routers, adapter.logits_position(model))
        self.tokenizer = tokenizer
        self.adapter = adapter
        self.name = name
        self.device = loading.input_device(model)
        self.token_budget = token_budget or DEFAULT_TOKEN_BUDGET.get(self.device.type, 8192)
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
        quantize: None, "nf4" or "int8": the paper's bitsandbytes settings (moee_fast.loading.quantization),
        computing in the load dtype; routers quantized as in the paper unless quantize_routers=False.
        Other keyword arguments go to transformers' `from_pretrained` (revision, device_map,
        quantization_config, experts_implementation (then the experts part is left off), ...).
        """
        parts = fastpath.resolve_parts(fast_path)
        if "experts_implementation" in hf_kwargs:  # the caller's choice of experts kernels stands
            parts = tuple(part for part in parts if part != "experts")
        model, tokenizer, adapter, name = loading.load(name_or_path, device, dtype, quantize, **hf_kwargs)
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
    def vocab_size(self) -> int:
        """Token ids run from 0 to vocab_size - 1 (the input embedding's rows)."""
        return self.model.get_input_embeddings().num_embeddings

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def num_moe_layers(self) -> int:
        return len(self.routers)

    @property
    def num_layers(self) -> int:
        """Decoder layers (`hs_layer` picks among them)."""
        layers = getattr(self.model, "layers", None)
        return len(layers) if layers is not None else self.model.config.num_hidden_layers

    @property
    def num_experts(self) -> int:
        return self.routers[0].weight.shape[0]

    def encode(
        self,
        texts: str | Sequence[str],
        batch_size: int | None = None,
        prompt: str | None = None,
        max_length: int | None = None,
        show_progress_bar: bool | None = None,
        rw_source: str = "scores",
        rw_pooling: str = "last",
        hs_pooling: str = "last",
        rw_layers: slice | Sequence[int] | None = None,
        hs_layer: int | None = None,
    ) -> MoEEmbeddings:
        """Embed `texts` (a list of strings, or one string: a result of one row); rows of the result follow the input order.

        batch_size: most texts per forward (None: only the token budget limits a batch).
        prompt: None (text verbatim) or a template containing `{text}`.
        max_length: token limit; only the text inside the template is shortened, with a warning.
        rw_source: "scores" (RW as defined: the family's scoring function of the router logits,
            in fp32) or "logits" (the raw router logits, as some published evaluations used).
        rw_pooling, hs_pooling: "last" (the text's last token, the paper's MoEE) or "mean" (the mean
            over every token the model sees for the text: prompt and special tokens included).
        rw_layers: which MoE layers' RW, a slice or a list of indices (None: all, in order).
        hs_layer: which decoder layer's hidden state (None or the last: the final norm's output, as
            the paper; any other layer: that layer's output, taken before any norm).
        """
        if isinstance(texts, str):  # one text, as sentence-transformers takes it: a result of one row
            texts = [texts]
        texts = _check_texts(texts)
        check_unicode(texts)
        batch_size = check_positive_int("batch_size", batch_size, allow_none=True)
        max_length = check_max_length(max_length, self.context_length)
        check_rw_source(rw_source)
        scoring = self.adapter.scoring if rw_source == "scores" else "logits"
        pooling = Pooling(
            check_pooling("rw_pooling", rw_pooling), check_pooling("hs_pooling", hs_pooling),
            check_layers("rw_layers", rw_layers, self.num_moe_layers),
            check_layer("hs_layer", self.num_layers - 1 if hs_layer is None else hs_layer, self.num_layers),
        )
        template = resolve_prompt(prompt)
        metadata = {"model": self.name, "prompt": "" if prompt is None else str(prompt), "rw": scoring,
                    **pooling.metadata(self.num_moe_layers, self.num_layers)}
        n_rw_layers = self.num_moe_layers if pooling.rw_layers is None else len(pooling.rw_layers)
        if not texts:
            return MoEEmbeddings.empty(self.hidden_size, n_rw_layers, self.num_experts, metadata)
        ids = token_ids(self.tokenizer, texts, template, max_length, self.context_length)
        hs = torch.empty(len(texts), self.hidden_size, dtype=torch.float32)
        rw = torch.empty(len(texts), n_rw_layers, self.num_experts, dtype=torch.float32)
        show = show_progress_bar if show_progress_bar is not None else (len(texts) >= 1000 and _stderr_is_tty())
        from tqdm.auto import tqdm

        with tqdm(total=len(texts), disable=not show, desc="encode", unit="text") as bar:
            for batch, (batch_hs, batch_rw) in self._run_batches(ids, batch_size, scoring, pooling):
                batch_hs, batch_rw = _to_host(batch_hs, batch_rw)
                check_finite_rows(batch_hs, batch_rw, batch.indices)
                index = torch.tensor(batch.indices)
                hs[index], rw[index] = batch_hs, batch_rw
                bar.update(len(batch.indices))
        metadata["tokens"] = str(sum(len(seq) for seq in ids))
        return MoEEmbeddings(hs, rw, metadata)

    # ----------------------------------------------------------------------------------------
    def _run_batches(self, ids: list[list[int]], batch_size: int | None, scoring: str, pooling: Pooling | None = None):
        """Yield (batch, (hs, rw)) for every batch of this call. After an out-of-memory error the
        texts not yet run are re-planned at half the failed batch's cost, for this call only."""
        lengths, budget, warned = [len(seq) for seq in ids], self.token_budget, False
        todo = self._plan(lengths, range(len(ids)), budget, batch_size)
        while todo:
            batch = todo.pop(0)
            result = self._try_forward(ids, batch, scoring, pooling)
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

    def _try_forward(self, ids: list[list[int]], batch: Batch, scoring: str, pooling: Pooling):
        """The batch's (hs, rw), or None if it ran out of memory and can be split."""
        seqs = [ids[i] for i in batch.indices]
        try:
            return self._forward(seqs, scoring, pooling)
        except torch.OutOfMemoryError:
            if len(seqs) == 1:  # nothing smaller to retry: the error goes to the caller
                raise
        # Freed here, outside the handler: its traceback pins the failed forward's activations.
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None

    @torch.inference_mode()
    def _forward(self, seqs: list[list[int]], scoring: str, pooling: Pooling | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One packed forward: each text's HS [B, H] and its routers' rows [B, L, E], fp32."""
        if self.fast_path.removed:
            raise RuntimeError("this encoder's fast path (its router tap included) was removed; build a new MoEEncoder on the model")
        pooling = pooling or Pooling(hs_layer=self.num_layers - 1)
        final_hs = pooling.hs_layer == self.num_layers - 1
        input_ids, position_ids, layout = pack(seqs, self.device, pin=self.device.type == "cuda")
        forward = state.ForwardState(layout.last, input_ids.shape[1], trim=pooling.trim_exact(self.num_moe_layers, final_hs))
        tap = self.fast_path.router_tap
        layers = None if pooling.rw_layers is None else frozenset(pooling.rw_layers)
        with state.running(forward), router_tap.keeping(
            tap, scoring, pooling.rw, layers, None if final_hs else pooling.hs_layer, pooling.hs,
        ) as keeping:
            out = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False, moee_packing=layout)
        if final_hs:
            hs = out.last_hidden_state[0]
            # Rows of the final norm's output: B when the trim ran it on the last tokens, else N.
            hs = hs.float() if hs.shape[0] == layout.batch_size else router_tap.pool_rows(hs, forward, pooling.hs)
        else:
            hs = keeping.hs
        kept = keeping.kept if pooling.rw_layers is None else [keeping.kept[i] for i in pooling.rw_layers]
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


@dataclass(frozen=True)
class Pooling:
    """How one encode call pools: RW and HS over the last token or all tokens, which MoE layers'
    RW (None: all), and which decoder layer's HS (the last: the final norm's output)."""

    rw: str = "last"
    hs: str = "last"
    rw_layers: list[int] | None = None
    hs_layer: int = -1

    def trim_exact(self, n_moe_layers: int, final_hs: bool) -> bool:
        """Whether the last layer may run on the last tokens only: not when a mean reads every
        token of it (the last MoE layer's router rows, or the final norm's output)."""
        rw_reads_last = self.rw == "mean" and (self.rw_layers is None or n_moe_layers - 1 in self.rw_layers)
        return not (rw_reads_last or (self.hs == "mean" and final_hs))

    def metadata(self, n_moe_layers: int, n_layers: int) -> dict[str, str]:
        """The embeddings' metadata entries of the choices other than the paper's defaults."""
        entries = {}
        if self.rw != "last":
            entries["rw_pooling"] = self.rw
        if self.hs != "last":
            entries["hs_pooling"] = self.hs
        if self.rw_layers is not None and self.rw_layers != list(range(n_moe_layers)):
            entries["rw_layers"] = ",".join(map(str, self.rw_layers))
        if self.hs_layer != n_layers - 1:
            entries["hs_layer"] = str(self.hs_layer)
        return entries


def _check_texts(texts) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a list of strings, got {type(texts).__name__}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] must be a string, got {type(text).__name__}")
    return list(texts)


def _stderr_is_tty() -> bool:
    import sys

    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
