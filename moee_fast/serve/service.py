"""What the routes share: the server's defaults and limits (ServeConfig), and the service that
checks requests, counts their tokens (in a worker thread, off the event loop) and puts them in
the batcher's queue (EmbeddingService)."""

from __future__ import annotations

import asyncio
import copy
import hmac
import threading
from dataclasses import asdict, dataclass

from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..checks import check_alpha, check_positive_int, check_variant
from ..prompts import build_prompt
from .batcher import Batcher, Job, JobQueue, QueueFull
from .metrics import Metrics
from .schemas import APIError

VERBATIM = "verbatim"  # a request's `prompt` that asks for the text as given, whatever the default


@dataclass
class ServeConfig:
    """The server's defaults and limits (the `moee serve` flags)."""

    served_model_name: str
    variant: str = "sum"
    alpha: float = 1.0
    prompt: str | None = None
    max_batch_tokens: int = 16384
    max_wait_ms: float = 5.0
    max_queue: int = 512
    max_inputs: int = 2048
    max_body_bytes: int = 4 * 1024 * 1024
    api_key: str | None = None
    retry_after_s: int = 1

    def __post_init__(self):
        check_variant(self.variant)
        self.alpha = check_alpha(self.alpha)
        if self.prompt is not None and self.prompt != VERBATIM:
            build_prompt(self.prompt)
        for name in ("max_batch_tokens", "max_queue", "max_inputs", "max_body_bytes", "retry_after_s"):
            check_positive_int(name, getattr(self, name))
        if not self.max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms!r}")


class EmbeddingService:
    """What the routes share: the encoder's sizes, request checks, tokenization and the queue."""

    def __init__(self, encoder, config: ServeConfig):
        self.encoder, self.config = encoder, config
        self.context = getattr(encoder.model.config, "max_position_embeddings", None)
        # A copy of its own: the worker thread tokenizes with the encoder's tokenizer meanwhile.
        self._tokenizer, self._tokenizer_lock = copy.deepcopy(encoder.tokenizer), threading.Lock()
        self.queue = JobQueue(config.max_queue)
        self.metrics = Metrics(lambda: self.queue.depth)
        self.batcher = Batcher(encoder, self.queue, config.max_batch_tokens, config.max_wait_ms, self.metrics)
        self.ready = self.draining = False

    # ------------------------------------------------------------------ sizes and description
    def dimensions(self, variant: str) -> int:
        hs, rw = self.encoder.hidden_size, self.encoder.num_moe_layers * self.encoder.num_experts
        return {"hs": hs, "rw": rw, "concat": hs + rw, "sum": hs + rw}[variant]

    def info(self) -> dict:
        enc, config = self.encoder, self.config
        limits = {k: v for k, v in asdict(config).items() if k.startswith("max_") or k == "retry_after_s"}
        return {
            "model": config.served_model_name,
            "family": enc.adapter.family,
            "hidden_size": enc.hidden_size,
            "num_moe_layers": enc.num_moe_layers,
            "num_experts": enc.num_experts,
            "dimensions": {v: self.dimensions(v) for v in ("hs", "rw", "concat", "sum")},
            "max_input_tokens": self.context,
            "defaults": {"variant": config.variant, "alpha": config.alpha, "prompt": config.prompt},
            "limits": limits,
            "auth": config.api_key is not None,
            "version": __version__,
        }

    # ------------------------------------------------------------------ request checks
    def prompt_of(self, prompt: str | None) -> str | None:
        """The template string a request's `prompt` means (None: the text verbatim)."""
        if prompt is None:
            prompt = self.config.prompt
        if prompt is None or prompt == VERBATIM:
            return None
        try:
            build_prompt(prompt)
        except (TypeError, ValueError) as exc:
            raise APIError(422, str(exc), param="prompt") from None
        return prompt

    def texts_of(self, value, param: str) -> list[str]:
        texts = [value] if isinstance(value, str) else list(value)
        if not texts:
            raise APIError(422, f"{param} is empty: send at least one text", param=param)
        if len(texts) > self.config.max_inputs:
            raise APIError(413, f"{param} has {len(texts)} texts, more than --max-inputs {self.config.max_inputs}", param=param)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                kind = "token ids are not accepted, send text" if isinstance(text, (int, list)) else "it must be a string"
                raise APIError(422, f"{param}[{i}] is {type(text).__name__}: {kind}", param=f"{param}[{i}]")
        return texts

    def alpha_of(self, alpha) -> float:
        try:
            return check_alpha(self.config.alpha if alpha is None else alpha)
        except ValueError as exc:
            raise APIError(422, str(exc), param="alpha") from None

    # ------------------------------------------------------------------ tokens and the queue
    def count_tokens(self, texts: list[str], prompt: str | None) -> list[int]:
        template = build_prompt(prompt) if prompt is not None else None
        strings = texts if template is None else [template.format(t) for t in texts]
        with self._tokenizer_lock:
            ids = self._tokenizer(strings, add_special_tokens=True)["input_ids"]
        return [len(seq) for seq in ids]

    def check_lengths(self, counts: list[int], truncate: bool, names: list[str]) -> list[int]:
        for name, count in zip(names, counts):
            if count == 0:
                raise APIError(422, f"{name} is empty and this tokenizer adds no special token: it has no last token", param=name)
            if self.context and count > self.context and not truncate:
                message = f"{name} has {count} tokens, more than the model's context of {self.context}; send truncate: true to cut it"
                raise APIError(422, message, param=name, code="context_length_exceeded")
        return [min(c, self.context) if self.context else c for c in counts]

    async def embed(self, texts: list[str], prompt: str | None, truncate: bool, names: list[str],
                    pooling: tuple[str, str] = ("last", "last")):
        """(MoEEmbeddings of `texts` in order, their token count), through the batcher; `names`
        name each text in error messages; pooling: (rw_pooling, hs_pooling)."""
        if self.draining or not self.ready:
            raise APIError(503, "the server is shutting down" if self.draining else "the model is not loaded yet")
        counts = self.check_lengths(await run_in_threadpool(self.count_tokens, texts, prompt), truncate, names)
        loop = asyncio.get_running_loop()
        max_length = self.context if truncate else None
        job = Job(texts, sum(counts), prompt, max_length, loop.create_future(), loop, pooling=pooling)
        try:
            self.queue.put(job)
        except QueueFull as exc:
            headers = {"Retry-After": str(self.config.retry_after_s)}
            raise APIError(429, f"server busy: {exc}; retry later", code="queue_full", headers=headers) from None
        except RuntimeError as exc:
            raise APIError(503, str(exc)) from None
        self.metrics.observe_accepted(len(texts), job.tokens)
        try:
            return await job.future, job.tokens
        except (TypeError, ValueError) as exc:
            raise APIError(422, str(exc)) from None

    # ------------------------------------------------------------------ auth
    def authorize(self, given: str) -> None:
        """Compare the bearer key in constant time (the time taken tells nothing about the key)."""
        key = self.config.api_key
        if key is None:
            return
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise APIError(401, "missing or wrong API key: send Authorization: Bearer <key>", code="invalid_api_key")
