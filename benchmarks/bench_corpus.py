"""Corpus jobs against in-process `encode`, on the built-in demo model and short texts.

    python benchmarks/bench_corpus.py              # throughput side by side, then peak RSS at 20k and 200k texts
    python benchmarks/bench_corpus.py --quick      # 1,000 texts, one round, peak RSS at 1k and 5k: a first check
    python benchmarks/bench_corpus.py --texts 4000 --sizes 2000,20000 --shard-size 1000   # the same ratios, 10x smaller

Throughput: the same texts through `MoEEncoder.encode` (all in memory, one call) and through
`encode_corpus` (read from a .txt file, sharded, written and fsynced), rounds alternated, medians
compared. Peak RSS: each corpus size in a fresh process (imports and model load included, as a
user's command has them), same model and shard size. The tables go to benchmarks/results/
(cpu_corpus[_quick]_<date>.md, and .jsonl), rewritten as each measurement ends.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time

WORDS = "the a model routes every token to experts while hidden states carry meaning and routing weights topics".split()


def write_texts(path: str, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            f.write(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) + "\n")


def throughput(n: int, rounds: int, shard_size: int) -> dict:
    load_average = os.getloadavg()[0]
    from moee_fast import MoEEncoder, encode_corpus, load_corpus
    from moee_fast.demo import demo_checkpoint

    encoder = MoEEncoder.from_pretrained(demo_checkpoint(), device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "texts.txt")
        write_texts(source, n)
        with open(source, encoding="utf-8") as f:
            texts = f.read().split("\n")[:-1]
        encoder.encode(texts[:256])  # warm-up
        times = {"encode": [], "encode_corpus": []}
        for r in range(rounds):
            start = time.perf_counter()
            encoder.encode(texts)
            times["encode"].append(time.perf_counter() - start)
            start = time.perf_counter()
            encode_corpus(encoder, [source], os.path.join(tmp, f"out{r}"), shard_size=shard_size, progress=False)
            times["encode_corpus"].append(time.perf_counter() - start)
        loading = {"load_corpus, SHA-256 checked": [], "load_corpus(verify=False)": []}
        for _ in range(rounds):  # this thread's CPU time: what the checksums cost, whatever else runs
            for name, verify in zip(loading, (True, False)):
                start = time.thread_time()
                corpus = load_corpus(os.path.join(tmp, "out0"), verify=verify)
                corpus.hs, corpus.rw
                loading[name].append(time.thread_time() - start)
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {"texts": n, "rounds": rounds, "shard_size": shard_size, "seconds": medians, "all_seconds": times,
            "ratio": medians["encode"] / medians["encode_corpus"], "load_average": load_average,
            "load_cpu_seconds": {k: statistics.median(v) for k, v in loading.items()}}


def peak_child(n: int, shard_size: int) -> None:
    """Run in a fresh process: one corpus job; prints its peak RSS (MiB) as JSON."""
    from moee_fast import encode_corpus
    from moee_fast.demo import demo_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "texts.txt")
        write_texts(source, n)
        start = time.perf_counter()
        corpus = encode_corpus(demo_checkpoint(), [source], os.path.join(tmp, "out"), shard_size=shard_size, progress=False, devices="cpu")
        seconds = time.perf_counter() - start
        output_mib = sum(os.path.getsize(os.path.join(tmp, "out", f)) for f in os.listdir(os.path.join(tmp, "out"))) / 2**20
        rows = len(corpus.ids)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"texts": n, "rows": rows, "peak_rss_mib": round(peak, 1), "seconds": round(seconds, 1), "output_mib": round(output_mib, 1)}))


def peak_rss(n: int, shard_size: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--peak-child", str(n), "--shard-size", str(shard_size)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(records: list[dict], quick_mode: bool = False) -> str:
    import torch

    from benchmarks.helpers import quick_note

    result = next((r for r in records if r["kind"] == "throughput"), None)
    sizes = [r for r in records if r["kind"] == "peak"]
    lines = [
        f"# Corpus jobs on CPU ({time.strftime('%Y-%m-%d')})",
        "",
        *quick_note(quick_mode),
        f"Machine: {platform.machine()}, {os.cpu_count()} cores (load average {os.getloadavg()[0]:.1f} at the last write: "
        "other work on the cores makes timings noisy), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; model: the built-in demo (untrained OLMoE layout); "
        "short texts (3-14 words).",
        "",
    ]
    if result is not None:
        s = result["seconds"]
        lines += [
            "## Throughput, side by side in one run (medians of alternated rounds)",
            "",
            "| path | texts | shard size | seconds | texts/s |",
            "|---|---|---|---|---|",
            f"| in-process encode | {result['texts']} | - | {s['encode']:.2f} | {result['texts'] / s['encode']:.0f} |",
            f"| encode_corpus (read, shard, write, fsync) | {result['texts']} | {result['shard_size']} | {s['encode_corpus']:.2f} | {result['texts'] / s['encode_corpus']:.0f} |",
            "",
            f"encode_corpus runs at **{100 * result['ratio']:.0f}%** of in-process encode's throughput "
            f"(all rounds: {json.dumps({k: [round(x, 2) for x in v] for k, v in result['all_seconds'].items()})}; "
            f"load average {result['load_average']:.1f} before them).",
            "",
            "## Opening the result (`hs` and `rw` read), this thread's CPU seconds, medians",
            "",
            "| how | CPU s |",
            "|---|---|",
            *[f"| {name} | {seconds:.3f} |" for name, seconds in result["load_cpu_seconds"].items()],
            "",
        ]
    if not sizes:
        return "\n".join(lines) + "\n"
    lines += [
        "## Peak resident memory of a whole `encode_corpus` process (imports and model included)",
        "",
        "| texts | shard size | peak RSS MiB | seconds | output MiB |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['texts']} | {r['shard_size']} | {r['peak_rss_mib']} | {r['seconds']} | {r['output_mib']} |" for r in sizes]
    lines += ["", f"Largest / smallest peak: **{sizes[-1]['peak_rss_mib'] / sizes[0]['peak_rss_mib']:.2f}x** for "
              f"{sizes[-1]['texts'] // sizes[0]['texts']}x the texts."]
    return "\n".join(lines) + "\n"


def main() -> None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository: benchmarks.*
    from benchmarks.helpers import ResultsLog, add_quick_arguments, results_dir, results_stem

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_quick_arguments(parser, "1,000 texts, one round, shards of 1,000, peak RSS at 1,000 and 5,000 texts")
    parser.add_argument("--peak-child", type=int)
    parser.add_argument("--shard-size", type=int, help="rows per shard (default 10,000; quick 1,000)")
    parser.add_argument("--texts", type=int, default=20_000, help="texts in the throughput comparison")
    parser.add_argument("--rounds", type=int, help="alternated rounds of the throughput comparison (default 3; quick 1)")
    parser.add_argument("--sizes", default="20000,200000", help="corpus sizes for the peak RSS curve")
    args = parser.parse_args()
    args.shard_size = args.shard_size or (1_000 if args.quick else 10_000)
    if args.peak_child:
        return peak_child(args.peak_child, args.shard_size)
    sizes = [1_000, 5_000] if args.quick else [int(n) for n in args.sizes.split(",")]
    log = ResultsLog(args.out_dir or results_dir(), results_stem("cpu_corpus", args.quick), lambda rs: report(rs, args.quick))
    result = throughput(1_000 if args.quick else args.texts, args.rounds or (1 if args.quick else 3), args.shard_size)
    log.add({"kind": "throughput", **result})
    print(f"throughput ratio {result['ratio']:.3f}", file=sys.stderr)
    for n in sizes:
        log.add({"kind": "peak", "shard_size": args.shard_size, **peak_rss(n, args.shard_size)})
        print(log.records[-1], file=sys.stderr)
    print(report(log.records, args.quick))
    print(f"written to {log.markdown}")


if __name__ == "__main__":
    main()
