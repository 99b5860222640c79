"""`moee serve` against in-process `encode` of the same texts, side by side in one run.

    python benchmarks/bench_serve.py [--model olmoe] [--layers N] [--requests 128] [--clients 32] [--threads N]

Throughput: `--clients` concurrent clients send `--requests` requests of 1-16 texts each (the
OpenAI shape, base64 as the SDK asks) to a live `moee serve` on 127.0.0.1, alternating with one
in-process `encode` call over the same texts (`--rounds` times); the server's texts/s is judged
against in-process encode's, median against median. Latency: p50 and p99 per request with half
as many clients. Every vector the server returns is checked against in-process encode. Results
go to benchmarks/results/.
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
from models import build_checkpoint, scaled_configs  # noqa: E402

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
    parser.add_argument("--layers", type=int, help="override the model's depth (default: the scaled model's own)")
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="in-process and served runs, alternated (default: %(default)s)")
    parser.add_argument("--threads", type=int, help="torch/OpenMP threads in both processes (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = os.environ.get("MOEE_FAST_BENCH_DIR") or os.path.join(tempfile.gettempdir(), "moee-fast-bench")
    if args.layers:
        path = build_checkpoint(args.model, os.path.join(root, f"{args.layers}-layers"), scaled_configs(args.layers)[args.model])
    else:
        path = build_checkpoint(args.model, root)
    encoder = MoEEncoder.from_pretrained(path, device="cpu")
    corpus = synthetic_corpus(encoder.tokenizer, 400, seed=args.seed)
    requests = make_requests(corpus, args.requests, args.seed)
    half = requests[::2]  # the latency run: half the clients, texts the reference covers
    texts = [t for r in requests for t in r]
    tokens = sum(len(ids) for ids in encoder.tokenizer(texts)["input_ids"])
    load_before = os.getloadavg()

    encoder.encode(corpus[:8])  # warm-up
    process, url = start_server(path, args.threads)
    in_process, served, worst = [], [], 0.0
    try:
        asyncio.run(drive(url, half[:4], 4))  # warm-up
        for round_ in range(args.rounds):
            seconds, reference_vectors = in_process_seconds(encoder, texts)
            in_process.append(seconds)
            reference = dict(zip(texts, reference_vectors))
            seconds, _, vectors = asyncio.run(drive(url, requests, args.clients))
            served.append(seconds)
            worst = max(worst, max_relative_diff(requests, vectors, reference))
            print(f"round {round_ + 1}: in-process {in_process[-1]:.2f} s, served {served[-1]:.2f} s", file=sys.stderr)
        _, latencies, half_vectors = asyncio.run(drive(url, half, max(args.clients // 2, 1)))
        worst = max(worst, max_relative_diff(half, half_vectors, reference))
    finally:
        process.terminate()
        process.wait(60)
    report = render(args, len(texts), tokens, in_process, served, latencies, worst, load_before, os.getloadavg())
    print(report)
    os.makedirs(RESULTS, exist_ok=True)
    out = os.path.join(RESULTS, f"serve_{args.model}_{datetime.date.today().isoformat()}.md")
    with open(out, "w") as f:
        f.write(report)
    print(f"wrote {out}")
    return 0


def render(args, n_texts, tokens, in_process, served, latencies, worst, load_before, load_after) -> str:
    p50, p99 = np.percentile(np.array(latencies) * 1000, [50, 99])
    depth = f", {args.layers} layers" if args.layers else ""
    lines = [
        f"# moee serve vs in-process encode ({args.model}{depth}, {datetime.date.today().isoformat()})",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads "
        f"in each process; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after. The machine was shared "
        "with other work during the run, so absolute rates move; the two paths alternated on the same texts.",
        "",
        f"{args.requests} requests of 1-16 texts ({n_texts} texts, {tokens} tokens), {args.clients} concurrent clients, "
        "base64 responses; in process: one `encode` call over all the texts.",
        "",
        "| round | in-process s | served s | in-process texts/s | served texts/s | served / in-process |",
        "|---|---|---|---|---|---|",
    ]
    for i, (a, b) in enumerate(zip(in_process, served), 1):
        lines.append(f"| {i} | {a:.2f} | {b:.2f} | {n_texts / a:.1f} | {n_texts / b:.1f} | {a / b:.0%} |")
    a, b = float(np.median(in_process)), float(np.median(served))
    ratio = float(np.median([x / y for x, y in zip(in_process, served)]))  # each round's pair ran back to back
    lines += [
        f"| median | {a:.2f} | {b:.2f} | {n_texts / a:.1f} | {n_texts / b:.1f} | {ratio:.0%} (median of the rounds) |",
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
