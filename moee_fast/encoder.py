"""MoEEncoder: texts in, MoEE embeddings (HS and RW at each text's last token) out.

One forward per batch through the base model (no LM head), with forward hooks that keep only
what the embedding reads: each MoE router's row at the last tokens, reduced to fp32 scores as
its layer runs, and the final norm applied to the last tokens alone. The last decoder layer's
MLP/MoE block also runs on the last tokens alone: no later layer reads the other positions.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from . import experts, linears, norms, ops, packing, rotary
from .adapters import Adapter, adapter_for
from .batching import Batch, plan_batches
from .checks import RW_SOURCES, check_rw_source  # noqa: F401  (RW_SOURCES re-exported)
from .embeddings import MoEEmbeddings
from .prompts import resolve_prompt, tokenize
from .quantize import avoid_unsupported_cpu_packing, input_device, with_quantization

# Tokens per packed forward. On CPU (scaled OLMoE, packed batches) 1536-2048 measured best, 4096
# 5% and 8192 15% slower: more rows per expert no longer pay once activations leave L2. On CUDA
# larger batches fill the chip (gpu_report.py).
DEFAULT_TOKEN_BUDGET = {"cpu": 2048, "cuda": 32768}

# Keys of from_pretrained's **hf_kwargs that also apply to the config and tokenizer.
_SHARED_HF_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "subfolder")


class _LastTokenTap:
    """Forward hooks on the MoE routers: each keeps its layer's rows at the last tokens, as fp32
    scores, so no all-token router tensor outlives its layer."""

    def __init__(self, routers: list[nn.Module], logits_index: int, scoring: str):
        self.logits_index, self.scoring = logits_index, scoring
        self.rows: torch.Tensor | None = None
        self.kept: list[torch.Tensor] = []
        self.handles = [router.register_forward_hook(self._hook) for router in routers]

    def _hook(self, module, args, output):
        logits = output[self.logits_index] if isinstance(output, (tuple, list)) else output
        batch = self.rows.shape[0]
        # A trimmed last layer routes only the B last tokens; every other layer routes B*T rows.
        rows = self.rows if logits.shape[0] != batch else torch.arange(batch, device=logits.device)
        if self.scoring == "softmax":
            self.kept.append(ops.gather_router_softmax([logits], rows, check_rows=False)[:, 0])
        elif self.scoring == "sigmoid":
            self.kept.append(torch.sigmoid(logits.index_select(0, rows).float()))
        else:  # "logits": the raw router scores
            self.kept.append(logits.index_select(0, rows).float())

    @contextlib.contextmanager
    def collect(self, rows: torch.Tensor):
        self.rows, self.kept = rows, []
        try:
            yield self
        finally:
            self.rows = None

    def remove(self):
        for handle in self.handles:
            handle.remove()


class MoEEncoder:
    """Encode texts into MoEE embeddings with a Mixture-of-Experts decoder.

    >>> enc = MoEEncoder.from_pretrained("allenai/OLMoE-1B-7B-0924")
    >>> out = enc.encode(["A sentence.", "Another one."], prompt='This sentence : "{text}" means in one word:"')
    >>> out.hs.shape, out.rw.shape  # [2, 2048], [2, 16, 64]
    """

    def __init__(self, model: nn.Module, tokenizer, adapter: Adapter, name: str = "", token_budget: int | None = None):
        self.model = model.eval().requires_grad_(False)  # inference only, in every thread
        # Texts run packed, without padding; attention keeps them apart (moee_fast/packing.py).
        model.set_attn_implementation(packing.register())
        norms.fuse_rms_norms(model)
        linears.use_cpp_linears(model)
        rotary.install(model)
        self.tokenizer = tokenizer
        self.adapter = adapter
        self.name = name
        self.device = input_device(model)
        self.token_budget = token_budget or DEFAULT_TOKEN_BUDGET.get(self.device.type, 8192)
        self.routers = adapter.routers(model)
        self._warned_oom = False
        self._tap = _LastTokenTap(self.routers, adapter.logits_position(model), adapter.scoring)
        self._trim_hooks = self._install_last_token_trim()

    # ----------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, device=None, dtype=None, quantize: str | None = None,
                        **hf_kwargs) -> MoEEncoder:
        """Load a Mixture-of-Experts checkpoint (local directory or Hub id) as an encoder.

        device: None -> CUDA when available, else CPU. dtype: None -> bfloat16 on CUDA, float32 on
        CPU. Other keyword arguments go to transformers' `from_pretrained` (revision, device_map,
        quantization_config, ...). Attention always runs moee-fast's packed attention.
        quantize: None, "nf4" or "int8": the paper's bitsandbytes settings (moee_fast.quantize).
        """
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        from . import models  # registers the families transformers lacks

        name = os.path.expanduser(os.fspath(name_or_path))
        _check_location(name)
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = _resolve_dtype(dtype, device)
        if hf_kwargs.pop("attn_implementation", None) is not None:
            warnings.warn("attn_implementation is ignored: moee-fast runs its own packed attention", stacklevel=2)
        if hf_kwargs.get("trust_remote_code"):
            raise ValueError("moee-fast never runs code shipped with a checkpoint; drop trust_remote_code")
        hf_kwargs = with_quantization(hf_kwargs, quantize, device)
        shared = {k: hf_kwargs[k] for k in _SHARED_HF_KWARGS if k in hf_kwargs}
        try:
            config = AutoConfig.from_pretrained(name, **shared)
        except OSError as exc:
            raise OSError(f"could not load a checkpoint from {name!r}: not a local directory, and {exc}") from exc
        model_class = _base_model_class(config)
        adapter = adapter_for(config.model_type, model_class)

        with _quiet_transformers():
            if config.model_type in models.NATIVE_LOADERS:
                model = models.NATIVE_LOADERS[config.model_type](name, config=config, dtype=dtype, device=device, **hf_kwargs)
            else:
                model = AutoModel.from_pretrained(name, dtype=dtype, **hf_kwargs)
        avoid_unsupported_cpu_packing(model)
        if "device_map" not in hf_kwargs:
            model = model.to(device)
        if device.type == "cpu" and "experts_implementation" not in hf_kwargs:
            # Measured on CPU: 1.4-1.7x transformers' default grouped_mm path (benchmarks/).
            model.set_experts_implementation(experts.register())
        tokenizer = AutoTokenizer.from_pretrained(name, **shared)
        return cls(model, tokenizer, adapter, name=name)

    # ----------------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

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
        check_rw_source(rw_source)
        self._tap.scoring = self.adapter.scoring if rw_source == "scores" else "logits"
        template = resolve_prompt(prompt)
        metadata = {"model": self.name, "prompt": "" if prompt is None else str(prompt), "rw": self._tap.scoring}
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
        batches = plan_batches([len(seq) for seq in ids], self.token_budget, batch_size)
        hs = torch.empty(len(texts), self.hidden_size, dtype=torch.float32)
        rw = torch.empty(len(texts), self.num_moe_layers, self.num_experts, dtype=torch.float32)
        show = show_progress_bar if show_progress_bar is not None else (len(texts) >= 1000 and _stderr_is_tty())
        from tqdm.auto import tqdm

        with tqdm(total=len(texts), disable=not show, desc="encode", unit="text") as bar:
            for batch in batches:
                batch_hs, batch_rw = self._run(ids, batch)
                index = torch.tensor(batch.indices)
                hs[index], rw[index] = batch_hs.cpu(), batch_rw.cpu()
                bar.update(len(batch.indices))
        metadata["tokens"] = str(sum(len(seq) for seq in ids))
        return MoEEmbeddings(hs, rw, metadata)

    # ----------------------------------------------------------------------------------------
    def _run(self, ids: list[list[int]], batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch, split in halves and retried if CUDA runs out of memory."""
        try:
            return self._forward(*self._collate(ids, batch.indices))
        except torch.OutOfMemoryError:
            if len(batch.indices) == 1:
                raise
        # Retried here, outside the handler: its traceback pins the failed forward's activations.
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if not self._warned_oom:
            warnings.warn(f"out of memory at {batch.tokens} tokens: splitting batches", stacklevel=3)
            self._warned_oom = True
        self.token_budget = max(1, batch.tokens // 2)
        halves = batch.indices[: len(batch.indices) // 2], batch.indices[len(batch.indices) // 2 :]
        parts = [self._run(ids, Batch(half, sum(len(ids[i]) for i in half))) for half in halves]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _collate(self, ids: list[list[int]], indices: list[int]):
        """The batch's texts packed end to end: input ids, position ids, and their Packing."""
        return packing.pack([ids[i] for i in indices], self.device, pin=self.device.type == "cuda")

    @torch.inference_mode()
    def _forward(self, input_ids, position_ids, layout: packing.Packing):
        self._last, self._tokens = layout.last, input_ids.shape[1]
        with self._tap.collect(layout.last) as tap, rotary.fused():
            out = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False, moee_packing=layout)
            kept = tap.kept
        hs = out.last_hidden_state[0].float()  # the norm already ran on the last tokens only
        return hs, torch.stack(kept, dim=1)

    def _install_last_token_trim(self):
        """Hooks that run the last layer's MLP and the final norm on the last tokens only.

        The last layer's MLP output is scattered back to the packed rows (zeros elsewhere) for
        the residual add; positions other than the last then hold values nothing reads.
        """
        take_last = lambda module, args: (args[0].index_select(1, self._last), *args[1:])  # noqa: E731
        handles = [self.model.norm.register_forward_pre_hook(take_last)]
        last_mlp = getattr(self.model.layers[-1], "mlp", None)
        if last_mlp is not None:
            handles.append(last_mlp.register_forward_pre_hook(take_last))
            handles.append(last_mlp.register_forward_hook(self._scatter_last))
        return handles

    def _scatter_last(self, module, args, output):
        rows = output[0] if isinstance(output, tuple) else output  # [1, B, H]
        full = rows.new_zeros(1, self._tokens, rows.shape[-1]).index_copy_(1, self._last, rows)
        return (full, *output[1:]) if isinstance(output, tuple) else full


# --------------------------------------------------------------------------------------------
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
