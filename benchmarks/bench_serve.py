"""`moee serve` against in-process `encode` of the same texts, side by side in one run.

    python benchmarks/bench_serve.py [--model olmoe] [--layers N] [--requests 128] [--clients 32] [--threads N] [--quick]

Throughput: `--clients` concurrent clients send `--requests` requests of 1-16 texts each (the
OpenAI shape, base64 as the SDK asks) to a live `moee serve` on 127.0.0.1, alternating with one
in-process `encode` call over the same texts (`--rounds` times); the server's texts/s is judged
against in-process encode's, median against median. Latency: p50 and p99 per request with half
as many clients. Every vector the server returns is checked against in-process encode. Results
go to benchmarks/results/serve_<model>[_quick]_<date>.md, rewritten after each round. --quick:
the model at 2 layers, 16 requests, 4 clients, one round (the hostile mix: 15 s).

    python benchmarks/bench_serve.py --hostile [--seconds 60]

Hostile mix: while clients send a 3 MB `truncate` request, 2,048-input requests and a flood of
/compare requests (over the cap and at it), a probe sends one-text requests one after another
and records their latency; the run reports the probe's p50/p99, every status seen per kind,
and checks the probe's vectors against in-process encode.
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
import moee_fast  # noqa: E402,F401  before torch: its OpenMP spin bound (moee_fast/openmp.py), as the `moee` command gets it
import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # run as a script: its helpers import `benchmarks.`
from corpus import synthetic_corpus  # noqa: E402
from helpers import add_quick_arguments, quick_note, results_dir, results_stem  # noqa: E402
from models import build_checkpoint, scaled_configs  # noqa: E402

from moee_fast import MoEEncoder  # noqa: E402


def make_requests(texts: list[str], count: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    return [rng.sample(texts, rng.randint(1, 16)) for _ in range(count)]


def start_server(model: str, threads: int | None, *flags: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    command = [sys.executable, "-m", "moee_fast.cli", "serve", "--model", model, "--port", str(port), "--log-level", "warning", *flags]
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


# ------------------------------------------------------------------------------ hostile mix
async def hostile(url: str, corpus: list[str], seconds: float, attack: bool = True) -> tuple[list[float], dict, list[tuple[str, np.ndarray]]]:
    """Attackers loop until the time is up (none with `attack` false); the probe measures
    one-text requests meanwhile."""
    rng = random.Random(1)
    huge = (" ".join(corpus) + " ") * (3_000_000 // (sum(map(len, corpus)) + len(corpus)) + 1)
    attacks = {
        "truncate 3 MB": ("/v1/embeddings", {"input": huge[:3_000_000], "truncate": True, "encoding_format": "base64"}),
        "2,048 inputs": ("/v1/embeddings", {"input": [rng.choice(corpus)[:100] for _ in range(2048)], "encoding_format": "base64"}),
        "/compare 2,048": ("/compare", {"input": [corpus[i % len(corpus)][:10] for i in range(2048)]}),
        "/compare 16": ("/compare", {"input": corpus[:16]}),
    }
    statuses: dict[str, dict[int, int]] = {name: {} for name in [*attacks, "probe"]}
    latencies, probe_vectors = [], []
    stop = time.monotonic() + seconds

    async def attacker(http, name):
        route, body = attacks[name]
        while time.monotonic() < stop:
            try:
                status = (await http.post(route, json=body)).status_code
            except httpx.TransportError:
                status = -1
            statuses[name][status] = statuses[name].get(status, 0) + 1

    async def probe(http):
        while time.monotonic() < stop:
            text = rng.choice(corpus)
            begin = time.perf_counter()
            response = await http.post("/v1/embeddings", json={"input": text, "variant": "hs", "encoding_format": "base64"})
            latencies.append(time.perf_counter() - begin)
            statuses["probe"][response.status_code] = statuses["probe"].get(response.status_code, 0) + 1
            if response.status_code == 200:
                probe_vectors.append((text, np.frombuffer(base64.b64decode(response.json()["data"][0]["embedding"]), dtype="<f4")))
            await asyncio.sleep(0.05)

    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as http:
        copies = (("truncate 3 MB", 1), ("2,048 inputs", 2), ("/compare 2,048", 4), ("/compare 16", 4)) if attack else ()
        await asyncio.gather(probe(http), *(attacker(http, name) for name, n in copies for _ in range(n)))
    return latencies, statuses, probe_vectors


def run_hostile(args, path: str, encoder) -> str:
    corpus = synthetic_corpus(encoder.tokenizer, 400, seed=args.seed)
    load_before = os.getloadavg()
    flags = ("--max-batch-tokens", str(args.max_batch_tokens)) if args.max_batch_tokens else ()
    process, url = start_server(path, args.threads, *flags)
    try:
        quiet, _, _ = asyncio.run(hostile(url, corpus, args.seconds / 4, attack=False))  # the same probe alone, first
        latencies, statuses, vectors = asyncio.run(hostile(url, corpus, args.seconds))
    finally:
        process.terminate()
        process.wait(60)
    load_after = os.getloadavg()
    texts = [text for text, _ in vectors]
    expected = encoder.encode(texts).hs
    worst = max(float(((torch.from_numpy(v.copy()) - e).norm() / e.norm())) for (_, v), e in zip(vectors, expected))
    p50, p99, most = np.percentile(np.array(latencies) * 1000, [50, 99, 100])
    q50, q99 = np.percentile(np.array(quiet) * 1000, [50, 99])
    lines = [
        *heading("moee serve under a hostile mix", args, load_before, load_after),
        f"Server defaults, --max-batch-tokens {args.max_batch_tokens or 'default (one forward: 2048 on CPU)'}.",
        "",
        f"For {args.seconds:.0f} s: 1 client sending a 3 MB text with truncate, 2 sending 2,048 short inputs, 4 sending "
        "/compare with 2,048 inputs (over the cap), 4 sending /compare with 16; a probe sends one text at a time (50 ms apart).",
        "",
        f"Probe (one text, {len(latencies)} requests): p50 {p50:.0f} ms, p99 {p99:.0f} ms, max {most:.0f} ms. "
        f"The same probe alone just before ({args.seconds / 4:.0f} s, {len(quiet)} requests): p50 {q50:.0f} ms, p99 {q99:.0f} ms. "
        f"Under the mix, p99 is {p99 / q50:.0f}x and p50 {p50 / q50:.1f}x the probe's p50 alone.",
        "",
        "| client | answers by status |",
        "|---|---|",
    ]
    for name, counts in statuses.items():
        lines.append(f"| {name} | {', '.join(f'{status}: {n}' for status, n in sorted(counts.items()))} |")
    lines += ["", f"Largest relative difference of a probe's vector from in-process encode: {worst:.1e}.", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="olmoe", help="a benchmark model (benchmarks/models.py): olmoe, mixtral, qwen2_moe, deepseek")
    parser.add_argument("--layers", type=int, help="override the model's depth (default: the scaled model's own)")
    parser.add_argument("--requests", type=int, help="default 128; quick 16")
    parser.add_argument("--clients", type=int, help="default 32; quick 4")
    parser.add_argument("--rounds", type=int, help="in-process and served runs, alternated (default 2; quick 1)")
    parser.add_argument("--threads", type=int, help="torch/OpenMP threads in both processes (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hostile", action="store_true", help="the hostile mix instead of throughput")
    parser.add_argument("--seconds", type=float, help="length of the hostile mix (default 60; quick 15)")
    parser.add_argument("--max-batch-tokens", type=int, help="the server's --max-batch-tokens (default: the server's default)")
    add_quick_arguments(parser, "the model at 2 layers, 16 requests, 4 clients, one round; the hostile mix for 15 s")
    args = parser.parse_args()
    args.layers = args.layers or (2 if args.quick else None)
    args.requests = args.requests or (16 if args.quick else 128)
    args.clients = args.clients or (4 if args.quick else 32)
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.seconds = args.seconds or (15.0 if args.quick else 60.0)
    if args.threads:
        torch.set_num_threads(args.threads)
    root = os.environ.get("MOEE_FAST_BENCH_DIR") or os.path.join(tempfile.gettempdir(), "moee-fast-bench")
    if args.layers:
        path = build_checkpoint(args.model, os.path.join(root, f"{args.layers}-layers"), scaled_configs(args.layers)[args.model])
    else:
        path = build_checkpoint(args.model, root)
    encoder = MoEEncoder.from_pretrained(path, device="cpu")
    if args.hostile:
        out = report_path(args, f"serve_hostile_{args.model}")
        report = run_hostile(args, path, encoder)
        print(report)
        return write_report(report, out)
    out = report_path(args, f"serve_{args.model}")
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
            write_report(render(args, len(texts), tokens, in_process, served, None, worst, load_before, os.getloadavg()), out)
        _, latencies, half_vectors = asyncio.run(drive(url, half, max(args.clients // 2, 1)))
        worst = max(worst, max_relative_diff(half, half_vectors, reference))
    finally:
        process.terminate()
        process.wait(60)
    report = render(args, len(texts), tokens, in_process, served, latencies, worst, load_before, os.getloadavg())
    print(report)
    return write_report(report, out)


def report_path(args, name: str) -> str:
    """benchmarks/results/<name>[_quick]_<date>.md; a second run the same day keeps the first."""
    folder = args.out_dir or results_dir()
    os.makedirs(folder, exist_ok=True)
    out = os.path.join(folder, results_stem(name, args.quick) + ".md")
    if os.path.exists(out):
        out = out.replace(".md", f"_{datetime.datetime.now():%H%M}.md")
    return out


def write_report(report: str, out: str) -> int:
    """(Re)write the report: after each round, so a stopped run keeps the rounds that ended."""
    with open(out, "w") as f:
        f.write(report)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def heading(title: str, args, load_before, load_after) -> list[str]:
    depth = f", {args.layers} layers" if args.layers else ""
    return [
        f"# {title} ({args.model}{depth}, {datetime.date.today().isoformat()})",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads or torch.get_num_threads()} "
        f"threads in each process; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after.",
        *([""] + quick_note(True) if args.quick else []),
    ]


def render(args, n_texts, tokens, in_process, served, latencies, worst, load_before, load_after) -> str:
    """The report; latencies None: the rounds so far, the latency run not yet made."""
    lines = [
        *heading("moee serve vs in-process encode", args, load_before, load_after),
        "The machine was shared with other work during the run, so absolute rates move; the two paths alternated on the same texts.",
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
    ]
    if latencies is None:
        lines += [f"Latency run: not yet made ({len(in_process)} of {args.rounds} rounds ended).", ""]
    else:
        p50, p99 = np.percentile(np.array(latencies) * 1000, [50, 99])
        lines += [f"Latency at half load ({max(args.clients // 2, 1)} clients, {len(latencies)} requests): "
                  f"p50 {p50:.0f} ms, p99 {p99:.0f} ms.", ""]
    lines += [
        f"Largest relative difference of a served vector from in-process encode: {worst:.1e}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
