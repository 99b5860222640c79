"""Where shards are encoded: in this process, or in one worker process per device, each loading
the model once and taking shards from a bounded queue as it finishes the last. A worker that
dies loses at most its current shard: the others finish theirs and the manifest keeps them."""

from __future__ import annotations

import queue
import signal

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

    def submit(self, shard: Shard):
        yield encode_shard(self.encoder, shard, self.options, self.output_dir, self.format)

    def finish(self):
        return iter(())

    def close(self):
        pass


def _worker(model: str, device: str, dtype, threads: int, options, output_dir, fmt, tasks, results) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    torch.set_num_threads(threads)
    index = -1
    try:
        from ..encoder import MoEEncoder

        encoder = MoEEncoder.from_pretrained(model, device=device, dtype=dtype)
        while (shard := tasks.get()) is not None:
            index = shard.index
            results.put(encode_shard(encoder, shard, options, output_dir, fmt))
    except Exception as exc:  # reported to the parent, which raises it
        results.put(ShardResult(index, error=f"{exc}", error_type=type(exc).__name__))


class WorkerPool:
    """One spawned worker process per device; CPU workers split this process's threads."""

    def __init__(self, model: str, devices: list[str], dtype, options: dict, output_dir: str, fmt: str):
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self.tasks, self.results = context.Queue(maxsize=len(devices)), context.Queue()
        cpu_workers = sum(1 for d in devices if d.startswith("cpu")) or 1
        threads = max(1, torch.get_num_threads() // cpu_workers)
        self.devices = devices
        self.workers = [
            context.Process(target=_worker, args=(model, d, dtype, threads, options, output_dir, fmt, self.tasks, self.results), daemon=True)
            for d in devices
        ]
        for worker in self.workers:
            worker.start()
        self.pending = 0
        self.stopping = False

    def submit(self, shard: Shard):
        yield from self._put(shard)
        self.pending += 1

    def finish(self):
        self.stopping = True  # from here a worker may exit, having taken its stop sentinel
        for _ in self.workers:
            yield from self._put(None)
        yield from self._ready(block=True)

    def _put(self, task):
        """Queue a task, collecting finished shards (and noticing dead workers) while it is full."""
        while True:
            yield from self._ready(block=False)
            try:
                self.tasks.put(task, timeout=0.2)
                return
            except queue.Full:
                self._check_alive()

    def _ready(self, block: bool):
        while self.pending:
            try:
                result = self.results.get(True, 0.2) if block else self.results.get_nowait()
            except queue.Empty:
                self._check_alive()
                if block:
                    continue
                return
            self.pending -= 1
            if result.error is not None:
                raise (ValueError if result.error_type == "ValueError" else RuntimeError)(result.error)
            yield result

    def _check_alive(self) -> None:
        for device, worker in zip(self.devices, self.workers):
            if worker.exitcode is not None and (worker.exitcode != 0 or not self.stopping):
                raise RuntimeError(
                    f"the worker on {device} stopped (exit code {worker.exitcode}); finished shards are kept: "
                    "run the same command again to resume"
                )

    def close(self) -> None:
        for worker in self.workers:
            if worker.is_alive():
                worker.terminate()
            worker.join()
