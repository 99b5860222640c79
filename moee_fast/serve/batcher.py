"""Between the HTTP layer and the encoder: a bounded queue of jobs, and two worker threads that
fill token-budget batches and run the model.

A job is one request's token ids, already prompted, truncated and checked, and how they are
pooled. It is queued as pieces of at most the batch budget. A job of at most `express_tokens`
tokens is small: the express worker runs small jobs only, in batches of at most that many
tokens, beside the main worker, which runs the large jobs' pieces (and small jobs while no large
one waits). So a one-text request never waits for a large batch, nor for a single row of the
model's whole context, which no batch budget can split. Within a lane each batch takes pieces
from the waiting jobs in turn (round robin), all of one pooling. The event loop never runs the
model: it awaits the job's future, which a worker resolves once every piece has run. An
embedding does not depend on its batch neighbours, so batching changes no vector.
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
from ..encoder import Pooling

log = logging.getLogger("moee_fast.serve")

MAIN, EXPRESS = "main", "express"  # the workers' lanes
LAST = ("last", "last")  # (rw_pooling, hs_pooling): the paper's MoEE


class QueueFull(Exception):
    """The queue holds its maximum of accepted, unanswered jobs: shed this one (HTTP 429)."""


@dataclass
class Job:
    """One request's token-id sequences, pooled as `pooling` (rw_pooling, hs_pooling); `future`
    receives their MoEEmbeddings (rows in order) or the exception that stopped them."""

    ids: list[list[int]]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    pooling: tuple[str, str] = LAST
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
    """Waiting jobs' pieces, bounded by `max_jobs` accepted and not yet answered; jobs of at most
    `express_tokens` tokens (default: a quarter of the batch budget) are small."""

    def __init__(self, max_jobs: int, max_tokens: int, express_tokens: int | None = None):
        self.max_jobs, self.max_tokens = max_jobs, max_tokens
        self.express_tokens = express_tokens or max(1, max_tokens // 4)
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
            self._cond.notify_all()

    def answered(self, count: int = 1) -> None:
        with self._cond:
            self._unanswered -= count

    def close(self) -> None:
        """Accept no more jobs; the workers drain those already accepted, then stop."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def take_batch(self, max_wait_s: float, lane: str = MAIN) -> list[Piece] | None:
        """Pieces of one pooling within the lane's token budget, one per job in turn (at least
        one piece), waiting up to `max_wait_s` after the first for more jobs to arrive; None once
        closed and drained of the lane's jobs."""
        budget = self.max_tokens if lane == MAIN else self.express_tokens
        with self._cond:
            while not self._eligible(lane):
                if self._closed:
                    return None
                self._cond.wait()
            batch: list[Piece] = []
            tokens, deadline = 0, time.monotonic() + max_wait_s
            while True:
                tokens, added, left_out = self._one_round(batch, tokens, lane, budget)
                if tokens >= budget or (left_out and not added):
                    return batch
                if added:
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    return batch
                self._cond.wait(remaining)

    def _small(self, pieces: collections.deque[Piece]) -> bool:
        return pieces[0].job.tokens <= self.express_tokens

    def _eligible(self, lane: str) -> list[collections.deque[Piece]]:
        """The waiting jobs the lane may take: the express lane small jobs; the main lane large
        ones, or small ones while no large job waits."""
        small = [pieces for pieces in self._waiting if self._small(pieces)]
        if lane == EXPRESS:
            return small
        return [pieces for pieces in self._waiting if not self._small(pieces)] or small

    def _one_round(self, batch: list[Piece], tokens: int, lane: str, budget: int) -> tuple[int, bool, bool]:
        """Each eligible job's next piece that fits and shares the batch's pooling, in turn; the
        jobs served go behind the others, so a job skipped is first in line for the next batch.
        (tokens, whether a piece was added, whether an eligible job was left out)."""
        eligible = {id(pieces) for pieces in self._eligible(lane)}
        skipped, served, taken, left_out = [], [], len(batch), False
        for pieces in self._waiting:
            if id(pieces) not in eligible:
                skipped.append(pieces)
                continue
            if batch and (tokens + pieces[0].tokens > budget or pieces[0].job.pooling != batch[0].job.pooling):
                skipped.append(pieces)
                left_out = True
                continue
            batch.append(pieces.popleft())
            tokens += batch[-1].tokens
            if pieces:
                served.append(pieces)
        self._waiting = collections.deque(skipped + served)
        return tokens, len(batch) > taken, left_out


def encode_ids(encoder, ids: list[list[int]], pooling: tuple[str, str] = LAST) -> tuple[torch.Tensor, torch.Tensor]:
    """HS [N, H] and RW [N, L, E] of token-id sequences pooled as (rw_pooling, hs_pooling),
    computed as `encoder.encode` computes them once it has tokenized (same batch plans, same
    forward, same checks). An engine that batches by itself (moee_fast.vllm.VLLMEncoder) has an
    `encode_ids` of its own, which pools the last token only."""
    if hasattr(encoder, "encode_ids"):
        if pooling != LAST:
            raise ValueError(f"rw_pooling, hs_pooling {pooling}: this engine pools the last token only")
        return encoder.encode_ids(ids)
    for i, seq in enumerate(ids):
        if not seq:
            raise ValueError(f"ids[{i}] is empty: it has no last token to read")
    hs = torch.empty(len(ids), encoder.hidden_size, dtype=torch.float32)
    rw = torch.empty(len(ids), encoder.num_moe_layers, encoder.num_experts, dtype=torch.float32)
    how = encoder_pooling(encoder, pooling)
    for batch, (batch_hs, batch_rw) in encoder._run_batches(ids, None, encoder.adapter.scoring, how):
        batch_hs, batch_rw = batch_hs.cpu(), batch_rw.cpu()
        check_finite_rows(batch_hs, batch_rw, batch.indices)
        index = torch.tensor(batch.indices)
        hs[index], rw[index] = batch_hs, batch_rw
    return hs, rw


def encoder_pooling(encoder, pooling: tuple[str, str]) -> Pooling:
    """The encoder's Pooling of (rw_pooling, hs_pooling): every MoE layer, HS after the final norm."""
    return Pooling(*pooling, hs_layer=encoder.num_layers - 1)


class Batcher:
    """The two worker threads (main and express lanes): each takes its lane's batches from
    `queue`, encodes them and resolves their jobs. Concurrent forwards share nothing: each keeps
    its per-forward state in its own thread's context."""

    def __init__(self, encoder, queue: JobQueue, max_wait_ms: float, metrics=None):
        self.encoder = encoder
        self.queue = queue
        self.max_wait_s = max_wait_ms / 1000.0
        self.metrics = metrics
        self._threads = [threading.Thread(target=self._loop, args=(lane,), name=f"moee-batcher-{lane}", daemon=True)
                         for lane in (MAIN, EXPRESS)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish every accepted job, then end the worker threads."""
        self.queue.close()
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def _loop(self, lane: str) -> None:
        while (batch := self.queue.take_batch(self.max_wait_s, lane)) is not None:
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
            how = encoder_pooling(self.encoder, job.pooling)
            job.resolve(MoEEmbeddings(job.hs, job.rw, how.metadata(self.encoder.num_moe_layers, self.encoder.num_layers)))
        else:
            job.failed = True
            job.resolve(error=error)
        job.hs = job.rw = None  # the future holds the result now
        self.queue.answered()

    def _encode(self, pieces: list[Piece]):
        begin = time.perf_counter()
        ids = [seq for piece in pieces for seq in piece.job.ids[piece.start : piece.stop]]
        out = encode_ids(self.encoder, ids, pieces[0].job.pooling)
        if self.metrics is not None:
            waited = [begin - piece.job.queued_at for piece in pieces]
            self.metrics.observe_batch(len(ids), sum(piece.tokens for piece in pieces), time.perf_counter() - begin, waited)
        return out
