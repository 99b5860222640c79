"""Where shards are encoded: in this process, or in one worker process per device, each loading
the model once and given shards as it finishes the last. A worker that dies loses at most its
current shard: the shards it held go to the other workers, and the manifest keeps every
finished one."""

from __future__ import annotations

import os
import queue
import signal
import sys
import threading
import time

import torch

from .job import Shard, ShardResult, encode_shard


def parse_devices(devices) -> list[str]:
    """"cuda:0,cuda:1", ["cpu", "cpu"] or "all" (every CUDA device, else one CPU), checked."""
    if isinstance(devices, str):
        if devices == "all":
            count = torch.cuda.device_count()
            return [f"cuda:{i}" for i in range(count)] or ["cpu"]
        devices = [d.strip() for d in devices.split(",")]
    parsed = []
    for device in devices:
        try:
            resolved = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device {device!r} is not a device name (cpu, cuda, cuda:1, ...)") from None
        if resolved.type == "cuda" and (not torch.cuda.is_available() or (resolved.index or 0) >= torch.cuda.device_count()):
            raise ValueError(f"device {device!r} is not available on this machine")
        parsed.append(str(device))
    if not parsed:
        raise ValueError("no device given")
    return parsed


class InProcess:
    """Encode each shard as it comes, with an encoder loaded in this process."""

    def __init__(self, encoder, options: dict, output_dir: str, fmt: str):
        self.encoder, self.options, self.output_dir, self.format = encoder, options, output_dir, fmt
        self.on_rows = None  # on_rows(shard index, texts encoded), set by the job for its progress bar

    def submit(self, shard: Shard):
        on_rows = (lambda n: self.on_rows(shard.index, n)) if self.on_rows else None
        yield encode_shard(self.encoder, shard, self.options, self.output_dir, self.format, on_rows)

    def finish(self):
        return iter(())

    def close(self):
        pass


def die_with_parent(parent: int) -> None:
    """Ask the kernel to kill this process when its parent dies (Linux); elsewhere, and in case
    the parent died already, a thread that exits when the parent is gone. A worker must never
    outlive its job: it would write shards no manifest lists."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _worker(model: str, device: str, dtype, threads: int, options, output_dir, fmt, parent, tasks, results) -> None:
    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    torch.set_num_threads(threads)
    index = -1
    try:
        from ..encoder import MoEEncoder

        encoder = MoEEncoder.from_pretrained(model, device=device, dtype=dtype)
        while (shard := tasks.get()) is not None:
            index = shard.index
            done = lambda n, i=shard.index: results.put((i, n))  # noqa: E731 - progress within the shard
            results.put(encode_shard(encoder, shard, options, output_dir, fmt, done))
    except Exception as exc:  # reported to the parent, which raises it
        results.put(ShardResult(index, error=f"{exc}", error_type=type(exc).__name__))


class _Worker:
    """One worker process with its own task and result queues (a killed process can leave only
    its own queues unusable) and the shards it holds, oldest first."""

    def __init__(self, context, device: str, args: tuple):
        self.device = device
        self.tasks, self.results = context.Queue(), context.Queue()
        self.held: list[Shard] = []
        self.process = context.Process(target=_worker, args=(*args, self.tasks, self.results), daemon=True)
        self.process.start()

    def give(self, shard: Shard | None) -> None:
        self.tasks.put(shard)
        if shard is not None:
            self.held.append(shard)


class WorkerPool:
    """One spawned worker process per device, each holding at most HELD shards (the one it
    encodes and the next); CPU workers split this process's threads. A worker that dies loses
    only the shard it was encoding: the shards it held go to the other workers, and the job
    fails only when no worker is left."""

    HELD = 2

    def __init__(self, model: str, devices: list[str], dtype, options: dict, output_dir: str, fmt: str):
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        cpu_workers = sum(1 for d in devices if d.startswith("cpu")) or 1
        threads = max(1, torch.get_num_threads() // cpu_workers)
        parent = os.getpid()
        self.workers = [_Worker(context, d, (model, d, dtype, threads, options, output_dir, fmt, parent)) for d in devices]
        self.stopped: list[str] = []  # "device (exit code N)" of each worker that died
        self.waiting: list[Shard] = []  # shards no worker holds yet
        self.on_rows = None

    def submit(self, shard: Shard):
        self.waiting.append(shard)
        while self.waiting:
            yield from self._step()

    def finish(self):
        while self.waiting or any(w.held for w in self.workers):
            yield from self._step()
        for worker in self.workers:
            worker.give(None)

    def _step(self):
        """Collect finished shards, take back the shards of dead workers, hand out waiting
        shards; pause briefly when nothing happened."""
        progressed = False
        for worker in list(self.workers):
            dead = worker.process.exitcode is not None  # read first: a worker's last results precede its exit
            for result in _drain(worker.results):
                if isinstance(result, tuple):  # (shard index, texts encoded)
                    if self.on_rows:
                        self.on_rows(*result)
                    continue
                if result.error is not None:
                    raise (ValueError if result.error_type == "ValueError" else RuntimeError)(result.error)
                worker.held = [s for s in worker.held if s.index != result.index]
                progressed = True
                yield result
            if dead:
                self._retire(worker)
        for shard in list(self.waiting):
            worker = min(self.workers, key=lambda w: len(w.held))
            if len(worker.held) >= self.HELD:
                break
            worker.give(shard)
            self.waiting.remove(shard)
            progressed = True
        if not progressed:
            time.sleep(0.02)

    def _retire(self, worker: _Worker) -> None:
        self.workers.remove(worker)
        self.stopped.append(f"{worker.device} (exit code {worker.process.exitcode})")
        if self.workers:
            print(f"moee: the worker on {self.stopped[-1]} stopped; its {len(worker.held)} unfinished shards go to "
                  "the other workers", file=sys.stderr)
        self.waiting = sorted(self.waiting + worker.held, key=lambda s: s.index)
        worker.tasks.cancel_join_thread()  # nobody reads its queue any more
        if not self.workers:
            raise RuntimeError(
                f"every worker stopped: {', '.join(self.stopped)}; finished shards are kept: "
                "run the same command again to resume"
            )

    def close(self) -> None:
        for worker in self.workers:
            if worker.process.is_alive():
                worker.process.join(timeout=0 if worker.held or self.waiting else 5)
            if worker.process.is_alive():
                worker.process.terminate()
            worker.process.join()
            worker.tasks.cancel_join_thread()
            for channel in (worker.tasks, worker.results):
                channel.close()


def _drain(results) -> list[ShardResult]:
    found = []
    while True:
        try:
            found.append(results.get_nowait())
        except queue.Empty:
            return found
