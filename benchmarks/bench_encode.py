"""moee-fast vs both baselines, side by side, on CPU: the careful transformers loop a user would
write and the reference path (the published evaluation loop); benchmarks/reference_path.py.

Run: pytest benchmarks/bench_encode.py
Same checkpoint, texts and machine, in one run: texts/s, tokens/s, peak memory, and useful
GFLOP/s as a fraction of the fp32 matmul peak measured beside each timing. Set
MOEE_FAST_BENCH_FAMILIES=olmoe,mixtral for a subset of families, and MOEE_FAST_BENCH_TEXTS=path.txt
(or .jsonl) to use real texts instead of the synthetic mix. `--quick` (or MOEE_FAST_BENCH_QUICK=1):
OLMoE only unless families are named, 16 texts, one round, one memory shape and no peak memory of
the timed corpus: a few minutes.
Results are written after each case (benchmarks/results/cpu_encode[_quick]_<date>.md).
"""

from __future__ import annotations

import os
import statistics
import time

import pytest

from benchmarks.conftest import matmul_peak_gflops
from benchmarks.corpus import load_corpus, synthetic_corpus
from benchmarks.helpers import max_row_relative_error, quick
from benchmarks.memory import peak_memory_mib
from benchmarks.models import build_checkpoint, embedding_flops
from benchmarks.reference_path import (
    CAREFUL_BATCH,
    careful_encode,
    load_careful_model,
    load_reference_model,
    reference_encode,
)
from moee_fast import MoEEncoder

# Corpus sizes: the reference path pads every batch of 128 to its longest passage, so it needs
# minutes where moee-fast needs seconds; these keep one reference round to about a minute
# (benchmarks/results/cpu_encode_*.md).
N_TEXTS = {"olmoe": 128, "mixtral": 128, "qwen2_moe": 64, "deepseek": 64}
QUICK_TEXTS = 16
REFERENCE_BATCH = 128
# name -> (load the model, encode, batch size, whether it sorts texts by length before batching)
BASELINES = {
    "careful": (load_careful_model, careful_encode, CAREFUL_BATCH, True),
    "reference": (load_reference_model, reference_encode, REFERENCE_BATCH, False),
}


def selected_families() -> list[str]:
    """Every family, or those named in MOEE_FAST_BENCH_FAMILIES (comma-separated)."""
    wanted = [name.strip() for name in os.environ.get("MOEE_FAST_BENCH_FAMILIES", "").split(",") if name.strip()]
    unknown = [name for name in wanted if name not in N_TEXTS]
    if unknown:
        raise ValueError(f"MOEE_FAST_BENCH_FAMILIES names unknown families {unknown}; choose from {list(N_TEXTS)}")
    return wanted or (["olmoe"] if quick() else list(N_TEXTS))


def corpus_size(model: str) -> int:
    return min(QUICK_TEXTS, N_TEXTS[model]) if quick() else N_TEXTS[model]


def _corpus(tokenizer, model: str) -> list[str]:
    path = os.environ.get("MOEE_FAST_BENCH_TEXTS")
    if path:
        return load_corpus(path, limit=corpus_size(model))
    return synthetic_corpus(tokenizer, corpus_size(model), seed=0)


_ENCODERS: dict[str, MoEEncoder] = {}


def _encoder(model: str, bench_dir: str) -> MoEEncoder:
    if model not in _ENCODERS:
        _ENCODERS[model] = MoEEncoder.from_pretrained(build_checkpoint(model, bench_dir), device="cpu")
    return _ENCODERS[model]


def padded_tokens(lengths: list[int], batch_size: int, sort: bool) -> int:
    """Token slots a padded loop computes: each batch padded to its longest text."""
    lengths = sorted(lengths) if sort else lengths
    return sum(len(chunk) * max(chunk) for chunk in (lengths[i : i + batch_size] for i in range(0, len(lengths), batch_size)))


@pytest.mark.parametrize("model", selected_families())
def test_encode_throughput(benchmark, model, bench_dir, fp32_peak, results):
    benchmark.group = f"encode {model}"
    enc = _encoder(model, bench_dir)
    texts = _corpus(enc.tokenizer, model)
    lengths = [len(ids) for ids in enc.tokenizer(texts)["input_ids"]]
    common = dict(model=model, texts=len(texts), tokens=sum(lengths), flops=embedding_flops(enc.model, lengths))

    enc.encode(texts[:8])  # warm-up: first-call allocations and lazy initialisation
    # The machine's matmul rate drifts within minutes (the range of the samples heads each results file,
    # benchmarks/results/cpu_encode_*.md): sample the peak before every
    # round (pedantic's untimed setup) and once after the last, and judge each round by its neighbours.
    round_peaks: list[float] = []

    def sample_peak():
        round_peaks.append(matmul_peak_gflops())
        return (texts,), {}

    out = benchmark.pedantic(enc.encode, setup=sample_peak, rounds=1 if quick() else 3, iterations=1)
    sample_peak()
    fp32_peak.extend(round_peaks)
    results["encode"].append(dict(
        common, path="moee-fast", seconds=benchmark.stats.stats.median, computed_tokens=sum(lengths),
        neighbour_fraction=_fraction_of_neighbour_peaks(common["flops"], benchmark.stats.stats.data, round_peaks)))
    for name in BASELINES:
        row = dict(common, **_time_baseline(name, enc.name, texts, lengths, common["flops"], out, fp32_peak))
        results["encode"].append(row)
        assert row["max_rel_diff"] <= 1e-4, f"{model}: the {name} loop differs from moee-fast by {row['max_rel_diff']:.1e}"


def _time_baseline(name: str, path: str, texts, lengths, flops, ours, peaks_log: list[float]) -> dict:
    """One timed round of a baseline (each takes tens of seconds), peaks sampled on both sides."""
    load, encode, batch_size, sort = BASELINES[name]
    model, tokenizer = load(path)
    encode(model, tokenizer, texts[:4])  # warm-up
    peaks = [matmul_peak_gflops()]
    start = time.perf_counter()
    hs, rw = encode(model, tokenizer, texts, batch_size)
    seconds = time.perf_counter() - start
    peaks.append(matmul_peak_gflops())
    peaks_log.extend(peaks)
    return dict(path=name, seconds=seconds, computed_tokens=padded_tokens(lengths, batch_size, sort),
                max_rel_diff=max(max_row_relative_error(hs, ours.hs), max_row_relative_error(rw, ours.rw)),
                neighbour_fraction=_fraction_of_neighbour_peaks(flops, [seconds], peaks))


def _fraction_of_neighbour_peaks(flops: float, seconds: list[float], peaks: list[float]) -> float:
    """Median over rounds of useful GFLOP/s / the mean of the peak samples taken just before and
    just after that round (peaks[i] and peaks[i + 1])."""
    ratios = sorted(flops / s / 1e9 / ((peaks[i] + peaks[i + 1]) / 2) for i, s in enumerate(seconds))
    return statistics.median(ratios)


@pytest.mark.skipif(quick(), reason="quick mode: the memory curve's one shape compares memory; this one reruns every path")
@pytest.mark.parametrize("model", selected_families())
def test_encode_peak_memory(model, bench_dir, results):
    """Peak memory of each path on the timed corpus; after every timing (see memory.py)."""
    enc = _encoder(model, bench_dir)
    texts = _corpus(enc.tokenizer, model)
    rows = {row["path"]: row for row in results["encode"] if row["model"] == model}
    _, rows["moee-fast"]["peak_mib"] = peak_memory_mib(enc.encode, texts)
    for name, (load, encode, batch_size, _) in BASELINES.items():
        model_, tokenizer = load(enc.name)
        _, rows[name]["peak_mib"] = peak_memory_mib(encode, model_, tokenizer, texts, batch_size)
        del model_
    assert rows["moee-fast"]["peak_mib"] < rows["reference"]["peak_mib"]


MEMORY_SHAPES = [(8, 128), (8, 512), (32, 128), (32, 512)]


@pytest.mark.parametrize("batch,length", MEMORY_SHAPES[:1] if quick() else MEMORY_SHAPES)
def test_memory_curve(model_for_memory, batch, length, bench_dir, results):
    """Peak memory of one forward (measured after every timing: see memory.py): the reference path keeps every layer's hidden states and the
    full-vocabulary logits (grows with batch x length x (layers x hidden + vocabulary)); the
    careful loop keeps one layer's activations for every padded slot; moee-fast one layer's for real tokens."""
    enc = _encoder(model_for_memory, bench_dir)
    word = "model "
    texts = [word * (length - 1)] * batch
    budget, enc.token_budget = enc.token_budget, batch * length + 64  # one forward of this shape
    try:
        _, peaks = peak_memory_mib(enc.encode, texts)
    finally:
        enc.token_budget = budget
    peaks = {"moee-fast": peaks}
    for name, (load, encode, _, _) in BASELINES.items():
        model_, tokenizer = load(enc.name)
        _, peaks[name] = peak_memory_mib(encode, model_, tokenizer, texts, batch)
        del model_
    for path, peak in peaks.items():
        results["memory"].append(dict(model=model_for_memory, batch=batch, length=length, path=path, peak_mib=peak))
    assert peaks["moee-fast"] < peaks["reference"]


@pytest.fixture
def model_for_memory():
    families = selected_families()
    return "olmoe" if "olmoe" in families else families[0]
