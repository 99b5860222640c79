"""`moee serve` against in-process `encode` of the same texts, side by side in one run.

    python benchmarks/bench_serve.py [--model olmoe] [--requests 128] [--clients 32]

Throughput: `--clients` concurrent clients send `--requests` requests of 1-16 texts each (the
OpenAI shape, base64 as the SDK asks) to a live `moee serve` on 127.0.0.1; the same texts are
encoded in process with one `encode` call before and after, and the server's texts/s is judged
against their mean. Latency: p50 and p99 per request with half as many clients. Every vector
the server returns is checked against in-process encode. Results go to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from corpus import synthetic_corpus  # noqa: E402
from models import build_checkpoint  # noqa: E402

from moee_fast import MoEEncoder  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def make_requests(texts: list[str], count: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    return [rng.sample(texts, rng.randint(1, 16)) for _ in range(count)]


def start_server(model: str, threads: int | None) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    command = [sys.executable, "-m", "moee_fast.cli", "serve", "--model", model, "--port", str(port), "--log-level", "warning"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("the server did not start")


async def drive(url: str, requests: list[list[str]], clients: int) -> tuple[float, list[float], list[np.ndarray]]:
    """(seconds for all requests, latency of each, vectors of each) with `clients` at a time."""
    pending = list(enumerate(requests))
    latencies, vectors = [0.0] * len(requests), [None] * len(requests)

    async def client(http):
        while pending:
            index, texts = pending.pop(0)
            start = time.perf_counter()
            response = await http.post("/v1/embeddings", json={"input": texts, "encoding_format": "base64"})
            latencies[index] = time.perf_counter() - start
            response.raise_for_status()
            rows = [np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4") for item in response.json()["data"]]
            vectors[index] = np.stack(rows)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return time.perf_counter() - start, latencies, vectors


def in_process_seconds(encoder, texts: list[str]) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    vectors = encoder.encode(texts).vectors("sum", 1.0)
    return time.perf_counter() - start, vectors


def max_relative_diff(requests, vectors, reference: dict[str, torch.Tensor]) -> float:
    worst = 0.0
    for texts, got in zip(requests, vectors):
        expected = torch.stack([reference[t] for t in texts]).double()
        diff = (torch.from_numpy(got).double() - expected).norm(dim=1) / expected.norm(dim=1)
        worst = max(worst, float(diff.max()))
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="olmoe", help="a benchmark model (benchmarks/models.py): olmoe, mixtral, qwen2_moe, deepseek")
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--threads", type=int, help="torch/OpenMP threads in both processes (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = os.environ.get("MOEE_FAST_BENCH_DIR") or os.path.join(tempfile.gettempdir(), "moee-fast-bench")
    path = build_checkpoint(args.model, root)
    encoder = MoEEncoder.from_pretrained(path, device="cpu")
    corpus = synthetic_corpus(encoder.tokenizer, 400, seed=args.seed)
    requests = make_requests(corpus, args.requests, args.seed)
    half = requests[::2]  # the latency run: half the clients, texts the reference covers
    texts = [t for r in requests for t in r]
    tokens = sum(len(ids) for ids in encoder.tokenizer(texts)["input_ids"])
    load_before = os.getloadavg()

    encoder.encode(corpus[:8])  # warm-up
    before, reference_vectors = in_process_seconds(encoder, texts)
    reference = dict(zip(texts, reference_vectors))
    process, url = start_server(path, args.threads)
    try:
        asyncio.run(drive(url, half[:4], 4))  # warm-up
        served, _, vectors = asyncio.run(drive(url, requests, args.clients))
        _, latencies, half_vectors = asyncio.run(drive(url, half, max(args.clients // 2, 1)))
    finally:
        process.terminate()
        process.wait(60)
    after, _ = in_process_seconds(encoder, texts)
    worst = max(max_relative_diff(requests, vectors, reference), max_relative_diff(half, half_vectors, reference))
    report = render(args, len(texts), tokens, before, after, served, latencies, worst, load_before, os.getloadavg())
    print(report)
    os.makedirs(RESULTS, exist_ok=True)
    out = os.path.join(RESULTS, f"serve_{args.model}_{datetime.date.today().isoformat()}.md")
    with open(out, "w") as f:
        f.write(report)
    print(f"wrote {out}")
    return 0


def render(args, n_texts, tokens, before, after, served, latencies, worst, load_before, load_after) -> str:
    in_process = (before + after) / 2
    p50, p99 = np.percentile(np.array(latencies) * 1000, [50, 99])
    rows = [
        ("in-process encode (before)", before), ("in-process encode (after)", after), (f"moee serve, {args.clients} clients", served),
    ]
    lines = [
        f"# moee serve vs in-process encode ({args.model}, {datetime.date.today().isoformat()})",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after. The machine was shared with other work "
        "during the run, so absolute rates move; the two paths ran back to back on the same texts.",
        "",
        f"{args.requests} requests of 1-16 texts ({n_texts} texts, {tokens} tokens), base64 responses.",
        "",
        "| path | seconds | texts/s | tokens/s | vs in-process (mean of before/after) |",
        "|---|---|---|---|---|",
    ]
    for name, seconds in rows:
        lines.append(f"| {name} | {seconds:.2f} | {n_texts / seconds:.1f} | {tokens / seconds:.0f} | {in_process / seconds:.0%} |")
    lines += [
        "",
        f"Latency at half load ({max(args.clients // 2, 1)} clients, {len(latencies)} requests): "
        f"p50 {p50:.0f} ms, p99 {p99:.0f} ms.",
        "",
        f"Largest relative difference of a served vector from in-process encode: {worst:.1e}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
