"""vLLM as the engine behind moee-fast's entry points: `VLLMEncoder.encode` returns the same
MoEEmbeddings as `MoEEncoder.encode`, from a vLLM engine running the MoEE pooling model."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

import torch

from .. import loading
from ..loading import models as _native_configs  # noqa: F401  (reads configs transformers lacks: DeepSeekMoE v1)
from ..checks import check_finite_rows, check_max_length, check_rw_source, check_unicode
from ..embeddings import MoEEmbeddings
from ..encoder import _check_texts
from ..prompts import resolve_prompt, token_ids
from .families import FAMILIES, architecture, family_adapter


def engine_kwargs(model: str | os.PathLike, output: str = "concat", alpha: float = 1.0, **llm_kwargs) -> dict:
    """Keyword arguments of `vllm.LLM` that run `model` as its family's MoEE pooling model.

    output: "concat" ([HS; RW] per text) or "sum" ([HS/|HS|; sqrt(alpha) RW/|RW|]). Other keyword
    arguments go to `vllm.LLM` as they are; `hf_overrides` given there are kept.
    """
    model = os.path.expanduser(os.fspath(model))
    config = loading.checkpoint.load_config(model)
    overrides = dict(llm_kwargs.pop("hf_overrides", None) or {})
    overrides.update(architectures=[architecture(config.model_type)], moee_output=output, moee_alpha=float(alpha))
    return dict(model=model, runner="pooling", hf_overrides=overrides, **llm_kwargs)


class VLLMEncoder:
    """MoEE embeddings from a vLLM engine, with MoEEncoder's `encode` surface.

    >>> enc = VLLMEncoder.from_pretrained("allenai/OLMoE-1B-7B-0924", max_model_len=4096)
    >>> out = enc.encode(["A sentence."], prompt="This sentence : \\"{text}\\" means in one word:\\"")
    """

    def __init__(self, llm, tokenizer, config, name: str = ""):
        self.llm, self.tokenizer, self.name = llm, tokenizer, name
        self.adapter = family_adapter(config.model_type)
        self.hidden_size = config.hidden_size
        self.num_experts = getattr(config, FAMILIES[config.model_type][1])
        self.num_layers = config.num_hidden_layers
        self._engine_lock = threading.Lock()  # one vllm.LLM serves one caller at a time (a server has two lanes)
        self.context_length = getattr(config, "max_position_embeddings", None)
        self.vocab_size = config.vocab_size
        self.dtype = llm.model_config.dtype
        # The scheduler's tokens per step: batches of this size keep a server's small requests' wait short.
        self.token_budget = llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
        # How many layers route (dense layers do not): read off one token's embedding.
        probe = llm.embed([{"prompt_token_ids": [0]}], use_tqdm=False)[0].outputs.embedding
        self.num_moe_layers = (len(probe) - self.hidden_size) // self.num_experts

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **llm_kwargs) -> VLLMEncoder:
        """Start a vLLM engine on a checkpoint; keyword arguments go to `vllm.LLM` (dtype,
        tensor_parallel_size, enable_prefix_caching, max_num_batched_tokens, ...)."""
        try:
            from vllm import LLM
        except ImportError as exc:
            raise ImportError(f"the vLLM engine needs vllm (pip install 'moee-fast[vllm]'): {exc}") from exc
        name = os.path.expanduser(os.fspath(name_or_path))
        loading.checkpoint.refuse_remote_code(llm_kwargs)
        config = loading.checkpoint.load_config(name)
        architecture(config.model_type)  # an unsupported family fails before the engine starts
        # MoEEncoder's default: float32 where there is no GPU (vLLM's own default would be 16-bit).
        llm_kwargs.setdefault("dtype", "bfloat16" if torch.cuda.is_available() else "float32")
        llm = LLM(**engine_kwargs(name, output="concat", **llm_kwargs))
        return cls(llm, loading.checkpoint.load_tokenizer(name), config, name=name)

    def encode(self, texts: Sequence[str], batch_size: int | None = None, prompt: str | None = None,
               max_length: int | None = None, show_progress_bar: bool | None = None, rw_source: str = "scores") -> MoEEmbeddings:
        """Embed `texts` (rows follow the input order). The arguments mean what they mean for
        `MoEEncoder.encode`; batch_size is left to vLLM's scheduler, which batches by tokens."""
        texts = _check_texts(texts)
        check_unicode(texts)
        max_length = check_max_length(max_length, self.context_length)
        check_rw_source(rw_source)
        if rw_source != "scores":
            raise ValueError("the vLLM engine returns RW as router scores only (rw_source='scores')")
        template = resolve_prompt(prompt)
        metadata = {"model": self.name, "prompt": "" if prompt is None else str(prompt), "rw": "scores"}
        if not texts:
            return MoEEmbeddings.empty(self.hidden_size, self.num_moe_layers, self.num_experts, metadata)
        ids = token_ids(self.tokenizer, texts, template, max_length, self.context_length)
        hs, rw = self.encode_ids(ids, show_progress_bar=bool(show_progress_bar))
        metadata["tokens"] = str(sum(len(seq) for seq in ids))
        return MoEEmbeddings(hs, rw, metadata)

    def encode_ids(self, ids: list[list[int]], show_progress_bar: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """HS [N, H] and RW [N, L, E] (fp32) of token-id sequences, already prompted and cut.
        Token ids, not strings: vLLM then runs exactly the tokens MoEEncoder would."""
        for i, seq in enumerate(ids):
            if not seq:
                raise ValueError(f"ids[{i}] is empty: it has no last token to read")
        with self._engine_lock:
            outputs = self.llm.embed([{"prompt_token_ids": seq} for seq in ids], use_tqdm=show_progress_bar)
        vectors = torch.stack([torch.as_tensor(out.outputs.embedding, dtype=torch.float32) for out in outputs])
        hs, rw = vectors.split([self.hidden_size, vectors.shape[1] - self.hidden_size], dim=1)
        rw = rw.reshape(len(ids), self.num_moe_layers, self.num_experts)
        check_finite_rows(hs, rw, list(range(len(ids))))
        return hs.contiguous(), rw.contiguous()
