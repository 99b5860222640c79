"""Mean pooling against last-token pooling: the CPU thread time of one encode of the same texts,
rounds interleaved so machine load falls on both alike.

Run: python -m benchmarks.bench_pooling [family] [rounds] [--texts 64] [--quick]
Prints one line per pooling and the median ratio mean/last; mean pooling runs the last layer on
every token (no trim) and sums each router row's softmax as it is made. Every round is written as
it ends to benchmarks/results/cpu_pooling_<date>.jsonl and the .md beside it. --quick: 16 texts,
one round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import moee_fast  # noqa: E402,F401  before torch: its OpenMP spin bound (moee_fast/openmp.py), as the `moee` command gets it
import torch

from benchmarks.corpus import synthetic_corpus
from benchmarks.helpers import ResultsLog, add_quick_arguments, markdown_table, quick_note, results_dir, results_stem
from benchmarks.models import build_checkpoint
from moee_fast import MoEEncoder

POOLINGS = ("last", "mean")


def thread_seconds(encode) -> float:
    start = time.thread_time()
    encode()
    return time.thread_time() - start


def render(family: str, n_texts: int, quick_mode: bool):
    def markdown(records: list[dict]) -> str:
        rows = [[r["round"], r["pooling"], f"{r['thread_seconds']:.3f}"] for r in records]
        lines = [f"# Mean against last-token pooling, {family}, {n_texts} texts", "", *quick_note(quick_mode),
                 f"CPU thread time of one encode, one thread, rounds interleaved; load average {os.getloadavg()[0]:.1f} "
                 "at the last write.", "", *markdown_table(["round", "pooling", "thread s"], rows)]
        ratio = mean_over_last(records)
        if ratio is not None:
            lines += ["", f"Median over rounds of mean/last: **{ratio:.3f}**"]
        return "\n".join(lines) + "\n"

    return markdown


def mean_over_last(records: list[dict]) -> float | None:
    by_round: dict[int, dict[str, float]] = {}
    for r in records:
        by_round.setdefault(r["round"], {})[r["pooling"]] = r["thread_seconds"]
    ratios = [t["mean"] / t["last"] for t in by_round.values() if len(t) == len(POOLINGS)]
    return statistics.median(ratios) if ratios else None


def main(family: str = "olmoe", rounds: int = 5, n_texts: int = 64, quick_mode: bool = False, out_dir=None) -> float:
    torch.set_num_threads(1)  # one thread: thread time is then the whole cost
    log = ResultsLog(out_dir or results_dir(), results_stem("cpu_pooling", quick_mode), render(family, n_texts, quick_mode))
    with tempfile.TemporaryDirectory() as root:
        encoder = MoEEncoder.from_pretrained(build_checkpoint(family, root), device="cpu")
        texts = synthetic_corpus(encoder.tokenizer, n_texts, seed=0)
        runs = {
            "last": lambda: encoder.encode(texts),
            "mean": lambda: encoder.encode(texts, rw_pooling="mean", hs_pooling="mean"),
        }
        for run in runs.values():
            run()  # warm-up
        for number in range(rounds):
            for name, run in runs.items():
                log.add({"family": family, "round": number, "pooling": name, "thread_seconds": thread_seconds(run)})
    for name in POOLINGS:
        values = [r["thread_seconds"] for r in log.records if r["pooling"] == name]
        print(f"{family} {name}: median {statistics.median(values):.3f} s thread time over {rounds} rounds")
    ratio = mean_over_last(log.records)
    print(f"{family} mean/last: {ratio:.3f}\nwritten to {log.markdown}")
    return ratio


def cli(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family", nargs="?", default="olmoe")
    parser.add_argument("rounds", nargs="?", type=int, help="default 5; quick 1")
    parser.add_argument("--texts", type=int, help="default 64; quick 16")
    add_quick_arguments(parser, "16 texts, one round")
    args = parser.parse_args(argv)
    return main(args.family, args.rounds or (1 if args.quick else 5), args.texts or (16 if args.quick else 64), args.quick, args.out_dir)


if __name__ == "__main__":
    cli()
