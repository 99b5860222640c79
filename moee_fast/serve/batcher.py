"""Between the HTTP layer and the encoder: a bounded queue of jobs, and one worker thread that
fills token-budget batches and runs the model.

A job is one request's token ids, already prompted, truncated and checked. It is queued as
pieces of at most the batch budget, and each batch takes pieces from the waiting jobs in turn
(round robin), so a one-text request rides in the next batch even behind a 2,048-text one. The
event loop never runs the model: it awaits the job's future, which the worker resolves once
every piece has run. An embedding does not depend on its batch neighbours, so batching changes
no vector.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from ..checks import check_finite_rows
from ..embeddings import MoEEmbeddings

log = logging.getLogger("moee_fast.serve")


class QueueFull(Exception):
    """The queue holds its maximum of accepted, unanswered jobs: shed this one (HTTP 429)."""


@dataclass
class Job:
    """One request's token-id sequences; `future` receives their MoEEmbeddings (rows in order)
    or the exception that stopped them."""

    ids: list[list[int]]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    queued_at: float = field(default_factory=time.perf_counter)

    def __post_init__(self):
        self.tokens = sum(len(seq) for seq in self.ids)
        self.hs: torch.Tensor | None = None
        self.rw: torch.Tensor | None = None
        self.pieces_left = 0
        self.failed = False

    def resolve(self, result=None, error: BaseException | None = None) -> None:
        """Hand the outcome to the event loop (a job whose client left is skipped there)."""

        def settle():
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        self.loop.call_soon_threadsafe(settle)


@dataclass
class Piece:
    """Rows [start, stop) of a job, run in one batch."""

    job: Job
    start: int
    stop: int
    tokens: int


def split(job: Job, max_tokens: int) -> list[Piece]:
    """Consecutive runs of the job's rows of at most `max_tokens` tokens (a longer row alone)."""
    pieces, start, tokens = [], 0, 0
    for i, seq in enumerate(job.ids):
        if i > start and tokens + len(seq) > max_tokens:
            pieces.append(Piece(job, start, i, tokens))
            start, tokens = i, 0
        tokens += len(seq)
    pieces.append(Piece(job, start, len(job.ids), tokens))
    return pieces


class JobQueue:
    """Waiting jobs' pieces, bounded by `max_jobs` accepted and not yet answered."""

    def __init__(self, max_jobs: int, max_tokens: int):
        self.max_jobs, self.max_tokens = max_jobs, max_tokens
        self._waiting: collections.deque[collections.deque[Piece]] = collections.deque()  # one per job
        self._unanswered = 0
        self._closed = False
        self._cond = threading.Condition()

    @property
    def depth(self) -> int:
        """Jobs accepted and not yet answered."""
        return self._unanswered

    def put(self, job: Job) -> None:
        pieces = split(job, self.max_tokens)
        job.pieces_left = len(pieces)
        with self._cond:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            if self._unanswered >= self.max_jobs:
                raise QueueFull(f"{self._unanswered} requests are queued, the limit (--max-queue)")
            self._waiting.append(collections.deque(pieces))
            self._unanswered += 1
            self._cond.notify()

    def answered(self, count: int = 1) -> None:
        with self._cond:
            self._unanswered -= count

    def close(self) -> None:
        """Accept no more jobs; the worker drains those already accepted, then stops."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def take_batch(self, max_wait_s: float) -> list[Piece] | None:
        """Pieces within the token budget, one per job in turn (at least one piece), waiting up
        to `max_wait_s` after the first for more jobs to arrive; None once closed and drained."""
        with self._cond:
            while not self._waiting:
                if self._closed:
                    return None
                self._cond.wait()
            batch: list[Piece] = []
            tokens, deadline = 0, time.monotonic() + max_wait_s
            while True:
                tokens, added = self._one_round(batch, tokens)
                if tokens >= self.max_tokens or (self._waiting and not added):
                    return batch
                if added:
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    return batch
                self._cond.wait(remaining)

    def _one_round(self, batch: list[Piece], tokens: int) -> tuple[int, bool]:
        """Each waiting job's next piece that fits, in turn; the jobs served go behind the
        others, so a job skipped for lack of room is first in line for the next batch."""
        skipped, served, taken = [], [], len(batch)
        for pieces in self._waiting:
            if batch and tokens + pieces[0].tokens > self.max_tokens:
                skipped.append(pieces)
                continue
            batch.append(pieces.popleft())
            tokens += batch[-1].tokens
            if pieces:
                served.append(pieces)
        self._waiting = collections.deque(skipped + served)
        return tokens, len(batch) > taken


def encode_ids(encoder, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """HS [N, H] and RW [N, L, E] of token-id sequences, computed as `encoder.encode` computes
    them once it has tokenized (same batch plans, same forward, same checks). An engine that
    batches by itself (moee_fast.vllm.VLLMEncoder) has an `encode_ids` of its own."""
    if hasattr(encoder, "encode_ids"):
        return encoder.encode_ids(ids)
    for i, seq in enumerate(ids):
        if not seq:
            raise ValueError(f"ids[{i}] is empty: it has no last token to read")
    hs = torch.empty(len(ids), encoder.hidden_size, dtype=torch.float32)
    rw = torch.empty(len(ids), encoder.num_moe_layers, encoder.num_experts, dtype=torch.float32)
    for batch, (batch_hs, batch_rw) in encoder._run_batches(ids, None, encoder.adapter.scoring):
        batch_hs, batch_rw = batch_hs.cpu(), batch_rw.cpu()
        check_finite_rows(batch_hs, batch_rw, batch.indices)
        index = torch.tensor(batch.indices)
        hs[index], rw[index] = batch_hs, batch_rw
    return hs, rw


class Batcher:
    """The worker thread: takes batches from `queue`, encodes them, resolves their jobs."""

    def __init__(self, encoder, queue: JobQueue, max_wait_ms: float, metrics=None):
        self.encoder = encoder
        self.queue = queue
        self.max_wait_s = max_wait_ms / 1000.0
        self.metrics = metrics
        self._thread = threading.Thread(target=self._loop, name="moee-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish every accepted job, then end the worker thread."""
        self.queue.close()
        self._thread.join(timeout)

    def _loop(self) -> None:
        while (batch := self.queue.take_batch(self.max_wait_s)) is not None:
            self._run([piece for piece in batch if not piece.job.failed])

    def _run(self, pieces: list[Piece]) -> None:
        """One encode call for the batch; if it fails, each piece alone, so one request's
        failure never costs another its answer."""
        if not pieces:
            return
        try:
            hs, rw = self._encode(pieces)
        except Exception as exc:
            if len(pieces) > 1:
                for piece in pieces:
                    self._run([piece] if not piece.job.failed else [])
                return
            if not isinstance(exc, (TypeError, ValueError)):
                log.exception("encoding a request failed")
                exc = RuntimeError("encoding failed")
            self._finish(pieces[0].job, error=exc)
            return
        row = 0
        for piece in pieces:
            job, count = piece.job, piece.stop - piece.start
            if job.hs is None:
                job.hs = torch.empty(len(job.ids), *hs.shape[1:], dtype=hs.dtype)
                job.rw = torch.empty(len(job.ids), *rw.shape[1:], dtype=rw.dtype)
            job.hs[piece.start : piece.stop], job.rw[piece.start : piece.stop] = hs[row : row + count], rw[row : row + count]
            row += count
            job.pieces_left -= 1
            if job.pieces_left == 0:
                self._finish(job)

    def _finish(self, job: Job, error: BaseException | None = None) -> None:
        if error is None:
            job.resolve(MoEEmbeddings(job.hs, job.rw, {}))
        else:
            job.failed = True
            job.resolve(error=error)
        job.hs = job.rw = None  # the future holds the result now
        self.queue.answered()

    def _encode(self, pieces: list[Piece]):
        begin = time.perf_counter()
        ids = [seq for piece in pieces for seq in piece.job.ids[piece.start : piece.stop]]
        out = encode_ids(self.encoder, ids)
        if self.metrics is not None:
            waited = [begin - piece.job.queued_at for piece in pieces]
            self.metrics.observe_batch(len(ids), sum(piece.tokens for piece in pieces), time.perf_counter() - begin, waited)
        return out
