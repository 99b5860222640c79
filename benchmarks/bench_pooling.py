"""Mean pooling against last-token pooling: the CPU thread time of one encode of the same texts,
rounds interleaved so machine load falls on both alike.

Run: python -m benchmarks.bench_pooling [family] [rounds]
Prints one line per pooling and the median ratio mean/last; mean pooling runs the last layer on
every token (no trim) and sums each router row's softmax as it is made.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time

import torch

from benchmarks.corpus import synthetic_corpus
from benchmarks.models import build_checkpoint
from moee_fast import MoEEncoder


def thread_seconds(encode) -> float:
    start = time.thread_time()
    encode()
    return time.thread_time() - start


def main(family: str = "olmoe", rounds: int = 5) -> float:
    torch.set_num_threads(1)  # one thread: thread time is then the whole cost
    with tempfile.TemporaryDirectory() as root:
        encoder = MoEEncoder.from_pretrained(build_checkpoint(family, root), device="cpu")
        texts = synthetic_corpus(encoder.tokenizer, 64, seed=0)
        runs = {
            "last": lambda: encoder.encode(texts),
            "mean": lambda: encoder.encode(texts, rw_pooling="mean", hs_pooling="mean"),
        }
        for run in runs.values():
            run()  # warm-up
        times = {name: [] for name in runs}
        for _ in range(rounds):
            for name, run in runs.items():
                times[name].append(thread_seconds(run))
    for name, values in times.items():
        print(f"{family} {name}: median {statistics.median(values):.3f} s thread time over {rounds} rounds")
    ratio = statistics.median(m / last for m, last in zip(times["mean"], times["last"]))
    print(f"{family} mean/last: {ratio:.3f}")
    return ratio


if __name__ == "__main__":
    main(*(sys.argv[1:2] or ["olmoe"]), *([int(sys.argv[2])] if len(sys.argv) > 2 else []))
