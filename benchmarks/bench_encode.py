"""moee-fast vs the reference path (the published evaluation loop), side by side, on CPU.

Run: pytest benchmarks/bench_encode.py
Same checkpoint, texts and machine, in one run: texts/s, tokens/s, peak memory, and useful
GFLOP/s as a fraction of the fp32 matmul peak measured in the same run. Set
MOEE_FAST_BENCH_TEXTS=path.txt (or .jsonl) to use real texts instead of the synthetic mix.
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
from conftest import RESULTS, matmul_peak_gflops
from corpus import load_corpus, synthetic_corpus
from memory import peak_memory_mib
from models import build_checkpoint, embedding_flops
from reference_path import load_reference_model, reference_encode

from moee_fast import MoEEncoder

# Corpus sizes: the reference path pads every batch of 128 to its longest passage, so it needs
# minutes where moee-fast needs seconds; these keep one reference round to about a minute.
N_TEXTS = {"olmoe": 128, "mixtral": 128, "qwen2_moe": 64, "deepseek": 64}
REFERENCE_BATCH = 128


def _corpus(tokenizer, model: str) -> list[str]:
    path = os.environ.get("MOEE_FAST_BENCH_TEXTS")
    if path:
        return load_corpus(path, limit=N_TEXTS[model])
    return synthetic_corpus(tokenizer, N_TEXTS[model], seed=0)


_ENCODERS: dict[str, MoEEncoder] = {}


def _encoder(model: str, bench_dir: str) -> MoEEncoder:
    if model not in _ENCODERS:
        _ENCODERS[model] = MoEEncoder.from_pretrained(build_checkpoint(model, bench_dir), device="cpu")
    return _ENCODERS[model]


def _max_rel_diff(a, b) -> float:
    return float(((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).max())


@pytest.mark.parametrize("model", list(N_TEXTS))
def test_encode_throughput(benchmark, model, bench_dir, fp32_peak):
    benchmark.group = f"encode {model}"
    enc = _encoder(model, bench_dir)
    texts = _corpus(enc.tokenizer, model)
    lengths = [len(ids) for ids in enc.tokenizer(texts)["input_ids"]]
    flops = embedding_flops(enc.model, lengths)

    enc.encode(texts[:8])  # warm-up: first-call allocations and lazy initialisation
    # The shared VM's speed drifts by tens of percent within minutes: sample the peak before every
    # round (pedantic's untimed setup) and once after the last, and judge each round by its neighbours.
    round_peaks: list[float] = []

    def sample_peak():
        round_peaks.append(matmul_peak_gflops())
        return (texts,), {}

    out = benchmark.pedantic(enc.encode, setup=sample_peak, rounds=3, iterations=1)
    sample_peak()
    ours_fraction = _fraction_of_neighbour_peaks(flops, benchmark.stats.stats.data, round_peaks)

    ref_model, ref_tokenizer = load_reference_model(enc.name)
    reference_encode(ref_model, ref_tokenizer, texts[:4])
    # One round: the reference takes about a minute per corpus.
    ref_peaks = [matmul_peak_gflops()]
    start = time.perf_counter()
    ref_hs, ref_rw = reference_encode(ref_model, ref_tokenizer, texts, REFERENCE_BATCH)
    ref_seconds = time.perf_counter() - start
    ref_peaks.append(matmul_peak_gflops())
    fp32_peak.extend(round_peaks + ref_peaks)
    ref_padded = sum(
        len(chunk) * max(chunk) for chunk in (lengths[i : i + REFERENCE_BATCH] for i in range(0, len(lengths), REFERENCE_BATCH))
    )
    del ref_model

    diff = max(_max_rel_diff(out.hs, ref_hs), _max_rel_diff(out.rw, ref_rw))
    common = dict(model=model, texts=len(texts), tokens=sum(lengths), flops=flops)
    RESULTS["encode"].append(
        dict(common, path="moee-fast", seconds=benchmark.stats.stats.median, computed_tokens=sum(lengths),
             max_rel_diff=diff, neighbour_fraction=ours_fraction)
    )
    RESULTS["encode"].append(
        dict(common, path="reference", seconds=ref_seconds, computed_tokens=ref_padded, max_rel_diff=0.0,
             neighbour_fraction=_fraction_of_neighbour_peaks(flops, [ref_seconds], ref_peaks))
    )
    assert diff <= 1e-4, f"{model}: moee-fast differs from the reference path by {diff:.1e}"


def _fraction_of_neighbour_peaks(flops: float, seconds: list[float], peaks: list[float]) -> float:
    """Median over rounds of useful GFLOP/s / the mean of the peak samples taken just before and
    just after that round (peaks[i] and peaks[i + 1])."""
    ratios = sorted(flops / s / 1e9 / ((peaks[i] + peaks[i + 1]) / 2) for i, s in enumerate(seconds))
    return statistics.median(ratios)


@pytest.mark.parametrize("batch,length", [(8, 128), (8, 512), (32, 128), (32, 512)])
def test_memory_curve(model_for_memory, batch, length, bench_dir):
    """Peak memory of one forward (measured after every timing: see memory.py): the reference path keeps every layer's hidden states and the
    full-vocabulary logits (grows with batch x length x (layers x hidden + vocabulary)); moee-fast
    keeps one layer's activations."""
    enc = _encoder(model_for_memory, bench_dir)
    word = "model "
    texts = [word * (length - 1)] * batch
    budget, enc.token_budget = enc.token_budget, batch * length + 64  # one forward of this shape
    try:
        _, ours = peak_memory_mib(enc.encode, texts)
    finally:
        enc.token_budget = budget
    ref_model, ref_tokenizer = load_reference_model(enc.name)
    _, ref = peak_memory_mib(reference_encode, ref_model, ref_tokenizer, texts, batch)
    del ref_model
    for path, peak in (("moee-fast", ours), ("reference", ref)):
        RESULTS["memory"].append(dict(model=model_for_memory, batch=batch, length=length, path=path, peak_mib=peak))
    assert ours < ref


@pytest.fixture
def model_for_memory():
    return "olmoe"
