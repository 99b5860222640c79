"""CPU timings of the fused ops, C++ extension vs the torch reference, at realistic sizes.

Run: pytest benchmarks/bench_ops.py [--quick]
Each group prints the two backends side by side; "auto" in moee_fast/ops.py follows these numbers.
Each case's timing is also written as it ends to benchmarks/results/cpu_ops[_quick]_<date>.jsonl and
the .md beside it. --quick (or MOEE_FAST_BENCH_QUICK=1): sizes cut 8-10x, for a first check.
Scoring is scaled down from 1k queries x 100k passages (minutes per round on a small CPU) to 1k x 10k
for the full matrix and 1k x 20k for top-k: both are GEMM-bound, so time scales linearly with passages.
"""

import os

import pytest
import torch

from benchmarks.helpers import ResultsLog, markdown_table, quick, quick_note, results_dir, results_stem
from moee_fast import ops

BACKENDS = [
    "torch",
    pytest.param("cpp", marks=pytest.mark.skipif("cpp" not in ops.available_backends(), reason="C++ ops not built")),
]

# (name, MoE layers, experts): the router shapes of the two reference models.
MODELS = [("olmoe", 16, 64), ("deepseek_moe", 27, 64)]
BATCH, TOKENS = 128, 256  # 128 sequences of 256 tokens: only 128 of the 32,768 rows are read per layer
HIDDEN = 2048
N_QUERIES, N_PASSAGES_FULL, N_PASSAGES_TOPK, TOP_K = 1000, 10_000, 20_000, 10
if quick():
    BATCH, TOKENS, N_QUERIES, N_PASSAGES_FULL, N_PASSAGES_TOPK = 16, 256, 100, 1000, 2000


def _render(records: list[dict]) -> str:
    rows = [[r["group"], r["backend"], f"{1e3 * r['median_s']:.3f}", f"{1e3 * r['min_s']:.3f}", r["rounds"]] for r in records]
    return "\n".join([
        "# Fused ops on CPU, C++ extension against the torch reference (benchmarks/bench_ops.py)", "", *quick_note(quick()),
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores; load average "
        f"{os.getloadavg()[0]:.1f} at the last write (a shared machine makes timings noisy).", "",
        *markdown_table(["case", "backend", "median ms", "min ms", "rounds"], rows),
    ]) + "\n"


@pytest.fixture(scope="module")
def results_log():
    return ResultsLog(results_dir(), results_stem("cpu_ops", quick()), _render)


@pytest.fixture(autouse=True)
def _record(request, results_log):
    """After each case, its timing goes to the results file (a stopped run keeps what ended)."""
    yield
    benchmark = request.node.funcargs.get("benchmark")
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is not None:
        backend = request.node.callspec.params.get("backend", "") if hasattr(request.node, "callspec") else ""
        results_log.add({"case": request.node.name, "group": benchmark.group, "backend": backend,
                         "median_s": stats.median, "min_s": stats.min, "rounds": stats.rounds})


def _router_inputs(n_layers, n_experts):
    generator = torch.Generator().manual_seed(0)
    logits = [torch.randn(BATCH * TOKENS, n_experts, generator=generator) for _ in range(n_layers)]
    last_token_rows = torch.arange(BATCH) * TOKENS + torch.randint(0, TOKENS, (BATCH,), generator=generator)
    return logits, last_token_rows


def _embeddings(n, rw_width, generator):
    hs = torch.randn(n, HIDDEN, generator=generator)
    rw = torch.softmax(torch.randn(n, rw_width, generator=generator), dim=-1)
    return hs, rw


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model", MODELS, ids=[m[0] for m in MODELS])
def test_gather_router_softmax_all_layers(benchmark, model, backend):
    name, n_layers, n_experts = model
    benchmark.group = f"gather_router_softmax {name} B={BATCH} L={n_layers} E={n_experts}"
    logits, rows = _router_inputs(n_layers, n_experts)
    out = benchmark(ops.gather_router_softmax, logits, rows, backend=backend)
    assert out.shape == (BATCH, n_layers, n_experts)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model", MODELS, ids=[m[0] for m in MODELS])
def test_mean_router_softmax_all_layers(benchmark, model, backend):
    """rw_pooling="mean": every row of every layer is read (the gather reads B of them)."""
    name, n_layers, n_experts = model
    benchmark.group = f"mean_router_softmax {name} B={BATCH} T={TOKENS} L={n_layers} E={n_experts}"
    logits, _ = _router_inputs(n_layers, n_experts)
    cu_seqlens = torch.arange(BATCH + 1) * TOKENS
    out = benchmark(ops.mean_router_softmax, logits, cu_seqlens, backend=backend)
    assert out.shape == (BATCH, n_layers, n_experts) and not out.isnan().any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_router_softmax_one_layer(benchmark, backend):
    """The encoder's pattern: one call per MoE layer as the forward runs."""
    benchmark.group = f"gather_router_softmax one layer B={BATCH} E=64"
    logits, rows = _router_inputs(1, 64)
    out = benchmark(ops.gather_router_softmax, logits, rows, backend=backend)
    assert out.shape == (BATCH, 1, 64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_combined_cosine(benchmark, dtype, backend):
    rw_width = 16 * 64  # OLMoE: 16 layers x 64 experts
    benchmark.group = f"combined_cosine {N_QUERIES}x{N_PASSAGES_FULL} H={HIDDEN} RW={rw_width} {dtype}"
    generator = torch.Generator().manual_seed(1)
    q_hs, q_rw = (x.to(dtype) for x in _embeddings(N_QUERIES, rw_width, generator))
    p_hs, p_rw = (x.to(dtype) for x in _embeddings(N_PASSAGES_FULL, rw_width, generator))
    scores = benchmark.pedantic(
        ops.combined_cosine, (q_hs, q_rw, p_hs, p_rw), {"backend": backend}, rounds=5, warmup_rounds=1
    )
    assert scores.shape == (N_QUERIES, N_PASSAGES_FULL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_combined_cosine(benchmark, backend):
    rw_width = 16 * 64
    benchmark.group = f"topk_combined_cosine k={TOP_K} {N_QUERIES}x{N_PASSAGES_TOPK} H={HIDDEN} RW={rw_width}"
    generator = torch.Generator().manual_seed(2)
    q_hs, q_rw = _embeddings(N_QUERIES, rw_width, generator)
    p_hs, p_rw = _embeddings(N_PASSAGES_TOPK, rw_width, generator)
    values, indices = benchmark.pedantic(
        ops.topk_combined_cosine, (q_hs, q_rw, p_hs, p_rw, TOP_K), {"backend": backend}, rounds=3, warmup_rounds=1
    )
    assert values.shape == indices.shape == (N_QUERIES, TOP_K)
