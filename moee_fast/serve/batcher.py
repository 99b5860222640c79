"""Between the HTTP layer and the encoder: a bounded queue of jobs, and one worker thread that
merges queued jobs into token-budget batches and runs the model.

The event loop never runs the model: it puts a job in the queue and awaits the job's future;
the worker thread takes batches from the queue, calls `encoder.encode` once per group of equal
settings (prompt, max_length), and hands each job back its own rows. An embedding does not
depend on its batch neighbours, so merging changes no vector.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
import warnings
from dataclasses import dataclass, field

log = logging.getLogger("moee_fast.serve")


class QueueFull(Exception):
    """The queue holds its maximum of accepted, unanswered jobs: shed this one (HTTP 429)."""


@dataclass
class Job:
    """One request's texts and the settings they are encoded with; `future` receives its
    MoEEmbeddings (rows in the order of `texts`) or the exception that stopped it."""

    texts: list[str]
    tokens: int
    prompt: str | None
    max_length: int | None
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    queued_at: float = field(default_factory=time.perf_counter)
    pooling: tuple[str, str] = ("last", "last")  # (rw_pooling, hs_pooling)

    @property
    def settings(self) -> tuple:
        return self.prompt, self.max_length, self.pooling

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


class JobQueue:
    """FIFO of jobs, bounded by `max_jobs` accepted and not yet answered (waiting or running)."""

    def __init__(self, max_jobs: int):
        self.max_jobs = max_jobs
        self._waiting: collections.deque[Job] = collections.deque()
        self._unanswered = 0
        self._closed = False
        self._cond = threading.Condition()

    @property
    def depth(self) -> int:
        """Jobs accepted and not yet answered."""
        return self._unanswered

    def put(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            if self._unanswered >= self.max_jobs:
                raise QueueFull(f"{self._unanswered} requests are queued, the limit (--max-queue)")
            self._waiting.append(job)
            self._unanswered += 1
            self._cond.notify()

    def answered(self, count: int) -> None:
        with self._cond:
            self._unanswered -= count

    def close(self) -> None:
        """Accept no more jobs; the worker drains those already accepted, then stops."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def take_batch(self, max_tokens: int, max_wait_s: float) -> list[Job] | None:
        """The oldest jobs whose tokens fit in `max_tokens` (at least one job), waiting up to
        `max_wait_s` after the first for more to arrive; None once closed and drained."""
        with self._cond:
            while not self._waiting:
                if self._closed:
                    return None
                self._cond.wait()
            batch = [self._waiting.popleft()]
            tokens = batch[0].tokens
            deadline = time.monotonic() + max_wait_s
            while tokens < max_tokens:
                if self._waiting:
                    if tokens + self._waiting[0].tokens > max_tokens:
                        break
                    job = self._waiting.popleft()
                    batch.append(job)
                    tokens += job.tokens
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    break
                self._cond.wait(remaining)
            return batch


class Batcher:
    """The worker thread: takes batches from `queue`, encodes them, resolves their jobs."""

    def __init__(self, encoder, queue: JobQueue, max_batch_tokens: int, max_wait_ms: float, metrics=None):
        self.encoder = encoder
        self.queue = queue
        self.max_batch_tokens = max_batch_tokens
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
        while (batch := self.queue.take_batch(self.max_batch_tokens, self.max_wait_s)) is not None:
            try:
                for group in _groups(batch):
                    self._run_group(group)
            finally:
                self.queue.answered(len(batch))

    def _run_group(self, jobs: list[Job]) -> None:
        """One encode call for jobs of equal settings; if it fails, each job alone, so one
        request's failure never costs another its answer."""
        try:
            out = self._encode([text for job in jobs for text in job.texts], jobs)
        except Exception as exc:
            if len(jobs) > 1:
                for job in jobs:
                    self._run_group([job])
            elif isinstance(exc, (TypeError, ValueError)):
                jobs[0].resolve(error=exc)  # about this request's own texts, which it names
            else:
                log.exception("encoding a request failed")
                jobs[0].resolve(error=RuntimeError("encoding failed"))
            return
        start = 0
        for job in jobs:
            job.resolve(out[start : start + len(job.texts)])
            start += len(job.texts)

    def _encode(self, texts: list[str], jobs: list[Job]):
        begin = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # truncation was asked for by the request
            rw_pooling, hs_pooling = jobs[0].pooling
            out = self.encoder.encode(texts, prompt=jobs[0].prompt, max_length=jobs[0].max_length,
                                      rw_pooling=rw_pooling, hs_pooling=hs_pooling)
        if self.metrics is not None:
            waited = [begin - job.queued_at for job in jobs]
            self.metrics.observe_batch(len(texts), sum(job.tokens for job in jobs), time.perf_counter() - begin, waited)
        return out


def _groups(batch: list[Job]) -> list[list[Job]]:
    """Jobs grouped by settings, groups in order of their first job."""
    groups: dict[tuple, list[Job]] = {}
    for job in batch:
        groups.setdefault(job.settings, []).append(job)
    return list(groups.values())
