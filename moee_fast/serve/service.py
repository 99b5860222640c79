"""What the routes share: the server's defaults and limits (ServeConfig), and the service that
checks requests, turns their inputs into token ids (in worker threads, off the event loop, with
no global lock) and queues them for the batcher (EmbeddingService)."""

from __future__ import annotations

import asyncio
import copy
import hmac
import queue
import re
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..demo import is_demo_checkpoint
from ..checks import _SURROGATE, check_alpha, check_positive_int, check_variant
from ..prompts import build_prompt, tokenize
from .batcher import LAST, Batcher, Job, JobQueue, QueueFull
from .metrics import Metrics
from .schemas import APIError

VERBATIM = "verbatim"  # a request's `prompt` that asks for the text as given, whatever the default
TOKENIZERS = 4  # copies of the tokenizer that requests tokenize with, each used by one thread at a time


@dataclass
class ServeConfig:
    """The server's defaults and limits (the `moee serve` flags)."""

    served_model_name: str
    variant: str = "sum"
    alpha: float = 1.0
    prompt: str | None = None
    max_batch_tokens: int | None = None  # None: the encoder's token budget (one forward's worth)
    max_wait_ms: float = 5.0
    max_queue: int = 512
    max_inputs: int = 2048
    max_request_tokens: int = 262144
    max_compare_inputs: int = 16
    max_body_bytes: int = 4 * 1024 * 1024
    api_key: str | None = None
    retry_after_s: int = 1

    def __post_init__(self):
        check_variant(self.variant)
        self.alpha = check_alpha(self.alpha)
        if self.prompt is not None and self.prompt != VERBATIM:
            build_prompt(self.prompt)
        check_positive_int("max_batch_tokens", self.max_batch_tokens, allow_none=True)
        for name in ("max_queue", "max_inputs", "max_request_tokens", "max_compare_inputs", "max_body_bytes", "retry_after_s"):
            check_positive_int(name, getattr(self, name))
        if not self.max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms!r}")


def longest_token_chars(tokenizer) -> int:
    """Most characters of text one token can stand for: its vocabulary's longest entry (byte-level
    entries spell one character per byte, so never fewer than the text's characters)."""
    return max(1, max(len(token) for token in tokenizer.get_vocab()))


class EmbeddingService:
    """What the routes share: the encoder's sizes, request checks, tokenization and the queue."""

    def __init__(self, encoder, config: ServeConfig):
        self.encoder, self.config = encoder, config
        self.context = encoder.context_length
        self.vocab_size = encoder.vocab_size
        self.token_chars = longest_token_chars(encoder.tokenizer)
        # Copies of their own: the worker never tokenizes, and requests share no lock but the pool's.
        self._tokenizers: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(TOKENIZERS):
            self._tokenizers.put(copy.deepcopy(encoder.tokenizer))
        # Small batches keep a small request's wait short: it waits for at most the batch running
        # when it arrives, and larger requests are split into batches of this size.
        self.max_batch_tokens = config.max_batch_tokens or encoder.token_budget
        self.queue = JobQueue(config.max_queue, self.max_batch_tokens)
        self.metrics = Metrics(lambda: self.queue.depth)
        self.batcher = Batcher(encoder, self.queue, config.max_wait_ms, self.metrics)
        self.ready = self.draining = False
        self.started = int(time.time())

    # ------------------------------------------------------------------ sizes and description
    def dimensions(self, variant: str) -> int:
        hs, rw = self.encoder.hidden_size, self.encoder.num_moe_layers * self.encoder.num_experts
        return {"hs": hs, "rw": rw, "concat": hs + rw, "sum": hs + rw}[variant]

    def info(self) -> dict:
        enc, config = self.encoder, self.config
        limits = {k: v for k, v in asdict(config).items() if k.startswith("max_") or k == "retry_after_s"}
        limits["max_batch_tokens"] = self.max_batch_tokens
        return {
            # What text-embeddings-inference clients read
            "model_id": config.served_model_name,
            "model_sha": None,
            "model_dtype": str(enc.dtype).removeprefix("torch."),
            "model_type": {"embedding": {"pooling": "last_token"}},
            "max_concurrent_requests": config.max_queue,
            "max_input_length": self.context,
            "max_batch_tokens": self.max_batch_tokens,
            "max_batch_requests": None,
            "max_client_batch_size": config.max_inputs,
            "tokenization_workers": TOKENIZERS,
            "version": __version__,
            # moee-fast's own
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
            "untrained_demo": is_demo_checkpoint(enc.name),  # its scores carry no meaning: the page says so
        }

    # ------------------------------------------------------------------ request checks
    def prompt_of(self, prompt: str | None, param: str = "prompt") -> str | None:
        """The template string a request's `prompt` means (None: the text verbatim)."""
        if prompt is None:
            prompt = self.config.prompt
        if prompt is None or prompt == VERBATIM:
            return None
        try:
            build_prompt(prompt)
        except (TypeError, ValueError) as exc:
            raise APIError(400, str(exc), param=param) from None
        return prompt

    def inputs_of(self, value, param: str, max_inputs: int | None = None) -> list:
        """A request's inputs as a list of items, each a text or a list of token ids (checked
        when they are tokenized). One text, one id list ([int]) or a list of either."""
        if isinstance(value, str):
            items = [value]
        elif isinstance(value, list) and value and all(_is_id(v) for v in value):
            items = [value]  # one token-id sequence
        elif isinstance(value, list):
            items = value
        else:
            raise APIError(400, f"{param} must be a string, a list of strings, or token ids, got {type(value).__name__}", param=param)
        limit, flag = (max_inputs, "--max-compare-inputs") if max_inputs else (self.config.max_inputs, "--max-inputs")
        if not items:
            raise APIError(400, f"{param} is empty: send at least one input", param=param)
        if len(items) > limit:
            raise APIError(413, f"{param} has {len(items)} inputs, more than {flag} {limit}", param=param)
        return items

    def alpha_of(self, alpha) -> float:
        try:
            return check_alpha(self.config.alpha if alpha is None else alpha)
        except ValueError as exc:
            raise APIError(400, str(exc), param="alpha") from None

    # ------------------------------------------------------------------ inputs to token ids
    @contextmanager
    def _tokenizer(self):
        tokenizer = self._tokenizers.get()
        try:
            yield tokenizer
        finally:
            self._tokenizers.put(tokenizer)

    def token_ids(self, items: list, prompt: str | None, truncate: bool, names: list[str], keep_last: int | None = None) -> list[list[int]]:
        """Each item's token ids for the model: texts prompted and tokenized (in one call), ids as
        given. `truncate` keeps the head of a too-long input; `keep_last` keeps its last tokens."""
        texts = {}
        for i, (item, name) in enumerate(zip(items, names)):
            if isinstance(item, str):
                texts[i] = self._bounded_text(item, truncate, keep_last, name)
            elif not isinstance(item, list):
                raise APIError(400, f"{name} is {type(item).__name__}: it must be a string or a list of token ids", param=name)
        tokenized = dict(zip(texts, self._tokenize(list(texts.values()), prompt, truncate and keep_last is None, [names[i] for i in texts])))
        out, total = [], 0
        for i, (item, name) in enumerate(zip(items, names)):
            seq = tokenized[i] if i in tokenized else self._checked_ids(item, name)
            if keep_last is not None:
                seq = seq[-keep_last:]
            elif truncate and self.context and len(seq) > self.context:
                seq = seq[: self.context]
            self._check_length(seq, name)
            total += len(seq)
            if total > self.config.max_request_tokens:
                message = f"the request has more than --max-request-tokens {self.config.max_request_tokens} tokens (reached at {name}); split it"
                raise APIError(413, message, param=name, code="too_many_tokens")
            out.append(seq)
        return out

    def _bounded_text(self, text: str, truncate: bool, keep_last: int | None, name: str) -> str:
        """The text, checked, and cut by characters where it cannot fit the context anyway."""
        found = _SURROGATE.search(text)
        if found:
            message = f"{name} holds a lone surrogate {found.group()!r} at character {found.start()}, which is not valid Unicode text"
            raise APIError(400, message, param=name)
        # A cheap bound before tokenizing: no token stands for more than `token_chars` characters.
        fits = self.context * self.token_chars if self.context else len(text)
        if len(text) <= fits:
            return text
        if keep_last is not None:
            return text[-keep_last * self.token_chars :]
        if truncate:
            return text[:fits]
        message = (f"{name} has {len(text)} characters, more than the model's context of {self.context} "
                   "tokens can hold; send truncate: true to keep its head")
        raise APIError(400, message, param=name, code="context_length_exceeded")

    def _tokenize(self, texts: list[str], prompt: str | None, truncate: bool, names: list[str]) -> list[list[int]]:
        if not texts:
            return []
        template = build_prompt(prompt) if prompt is not None else None
        with self._tokenizer() as tokenizer:
            try:
                ids, _ = tokenize(tokenizer, texts, template, self.context if truncate else None)
            except ValueError as exc:  # names the text as texts[i]: name it as the request does
                message = re.sub(r"texts\[(\d+)\]", lambda m: names[int(m.group(1))], str(exc))
                raise APIError(400, message, param=next((n for n in names if n in message), None)) from None
        return ids

    def _checked_ids(self, ids: list, name: str) -> list[int]:
        for j, token in enumerate(ids):
            if not _is_id(token) or not 0 <= token < self.vocab_size:
                message = f"{name}[{j}] is {token!r}: a token id must be an integer in [0, {self.vocab_size})"
                raise APIError(400, message, param=f"{name}[{j}]")
        return list(ids)

    def _check_length(self, seq: list[int], name: str) -> None:
        if not seq:
            raise APIError(400, f"{name} is empty and this tokenizer adds no special token: it has no last token", param=name)
        if self.context and len(seq) > self.context:
            message = f"{name} has {len(seq)} tokens, more than the model's context of {self.context}; send truncate: true to keep its head"
            raise APIError(400, message, param=name, code="context_length_exceeded")

    def keep_last_of(self, truncate_prompt_tokens: int | None) -> int | None:
        """vLLM's truncate_prompt_tokens: k >= 1 keeps the last k tokens, -1 the context's worth."""
        if truncate_prompt_tokens is None:
            return None
        if truncate_prompt_tokens == -1 and self.context:
            return self.context
        if truncate_prompt_tokens < 1 or (self.context and truncate_prompt_tokens > self.context):
            message = f"truncate_prompt_tokens must be -1 or in [1, {self.context}], got {truncate_prompt_tokens}"
            raise APIError(400, message, param="truncate_prompt_tokens")
        return truncate_prompt_tokens

    # ------------------------------------------------------------------ the queue
    async def embed(self, items: list, prompt: str | None, truncate: bool, names: list[str], keep_last: int | None = None,
                    pooling: tuple[str, str] = LAST):
        """(MoEEmbeddings of `items` in order, pooled as (rw_pooling, hs_pooling), their token
        count), through the batcher; `names` name each item in error messages."""
        if not self.ready:
            raise APIError(503, "the model is not loaded yet")
        ids = await run_in_threadpool(self.token_ids, items, prompt, truncate, names, keep_last)
        loop = asyncio.get_running_loop()
        job = Job(ids, loop.create_future(), loop, pooling)
        try:
            self.queue.put(job)
        except QueueFull as exc:
            headers = {"Retry-After": str(self.config.retry_after_s)}
            raise APIError(429, f"server busy: {exc}; retry later", code="queue_full", headers=headers) from None
        except RuntimeError as exc:
            raise APIError(503, str(exc)) from None
        self.metrics.observe_accepted(len(ids), job.tokens)
        try:
            return await job.future, job.tokens
        except (TypeError, ValueError) as exc:
            raise APIError(400, str(exc)) from None

    # ------------------------------------------------------------------ auth
    def authorize(self, given: str) -> None:
        """Compare the bearer key in constant time (the time taken tells nothing about the key)."""
        key = self.config.api_key
        if key is None:
            return
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise APIError(401, "missing or wrong API key: send Authorization: Bearer <key>", code="invalid_api_key")


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
