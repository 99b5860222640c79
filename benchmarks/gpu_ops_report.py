"""How close the Triton ops come to the GPU's limits.

Measures this card's device-to-device copy bandwidth and bf16 GEMM throughput, then each Triton op's
achieved bandwidth and TFLOP/s as a fraction of those two ceilings. Prints a table and writes it (plus
the raw numbers as JSON) to benchmarks/results/gpu_ops_<gpu>.{md,json}.

Run on a CUDA machine:  python benchmarks/gpu_ops_report.py [--quick]
"""

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from moee_fast import ops

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def time_ms(fn, warmup=3, reps=20):
    """Median wall time of fn on the current stream, in milliseconds, from CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def copy_bandwidth_gbs(n_bytes):
    """Device-to-device copy: every byte is read once and written once."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * n_bytes / ms / 1e6


def bf16_gemm_tflops(n):
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b)
    return 2 * n**3 / ms / 1e9


def embeddings(n, hidden, rw_width, dtype):
    hs = torch.randn(n, hidden, device="cuda", dtype=dtype)
    rw = torch.softmax(torch.randn(n, rw_width, device="cuda"), dim=-1).to(dtype)
    return hs, rw


def check_against_torch(name, triton_out, torch_out, tol):
    """A fast kernel that computes the wrong thing must not make it into the report."""
    error = (triton_out.float() - torch_out.float()).abs().max().item()
    if not error <= tol:
        raise SystemExit(f"{name}: Triton result differs from torch by {error:.3g} (> {tol}); not reporting it")


def measure_gather(batch, tokens, n_layers, n_experts, dtype):
    logits = [torch.randn(batch * tokens, n_experts, device="cuda", dtype=dtype) for _ in range(n_layers)]
    rows = torch.arange(batch, device="cuda") * tokens + tokens - 1
    run = lambda: ops.gather_router_softmax(logits, rows, backend="triton")  # noqa: E731
    check_against_torch("gather_router_softmax", run(), ops.gather_router_softmax(logits, rows, backend="torch"), 1e-5)
    n_bytes = batch * n_layers * n_experts * (logits[0].element_size() + 4) + rows.numel() * 8
    return dict(op="gather_router_softmax", shape=f"B={batch} of {batch * tokens} rows, L={n_layers}, E={n_experts}, {dtype}",
                ms=time_ms(run), bytes=n_bytes, flops=0)


def measure_cosine(n_a, n_b, hidden, rw_width, dtype):
    a_hs, a_rw = embeddings(n_a, hidden, rw_width, dtype)
    b_hs, b_rw = embeddings(n_b, hidden, rw_width, dtype)
    out = torch.empty(n_a, n_b, device="cuda")
    run = lambda: ops.combined_cosine(a_hs, a_rw, b_hs, b_rw, backend="triton", out=out)  # noqa: E731
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    check_against_torch("combined_cosine", run(), ops.combined_cosine(a_hs, a_rw, b_hs, b_rw, backend="torch"), tol)
    width = hidden + rw_width
    return dict(op="combined_cosine", shape=f"{n_a}x{n_b}, H={hidden}, RW={rw_width}, {dtype}",
                ms=time_ms(run), bytes=(n_a + n_b) * width * a_hs.element_size() + n_a * n_b * 4,
                flops=2 * n_a * n_b * width)


def measure_topk(n_queries, n_corpus, hidden, rw_width, k, dtype):
    q_hs, q_rw = embeddings(n_queries, hidden, rw_width, dtype)
    c_hs, c_rw = embeddings(n_corpus, hidden, rw_width, dtype)
    run = lambda: ops.topk_combined_cosine(q_hs, q_rw, c_hs, c_rw, k, backend="triton")  # noqa: E731
    values, _ = run()
    reference, _ = ops.topk_combined_cosine(q_hs, q_rw, c_hs, c_rw, k, backend="torch")
    check_against_torch("topk_combined_cosine", values, reference, 1e-4 if dtype == torch.float32 else 2e-2)
    width = hidden + rw_width
    return dict(op="topk_combined_cosine", shape=f"k={k}, {n_queries}x{n_corpus}, H={hidden}, RW={rw_width}, {dtype}",
                ms=time_ms(run, warmup=1, reps=5), bytes=(n_queries + n_corpus) * width * q_hs.element_size(),
                flops=2 * n_queries * n_corpus * width)


def markdown_table(gpu, copy_gbs, gemm_tflops, rows):
    lines = [
        f"# Triton ops on {gpu}",
        "",
        f"Ceilings measured here: device-to-device copy {copy_gbs:,.0f} GB/s; bf16 GEMM {gemm_tflops:,.1f} TFLOP/s.",
        "",
        "| op | shape | ms | GB/s | % of copy | TFLOP/s | % of bf16 GEMM |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        gbs = row["bytes"] / row["ms"] / 1e6
        tflops = row["flops"] / row["ms"] / 1e9
        lines.append(
            f"| {row['op']} | {row['shape']} | {row['ms']:.3f} | {gbs:,.0f} | {100 * gbs / copy_gbs:.1f}% | "
            f"{tflops:,.1f} | {100 * tflops / gemm_tflops:.1f}% |"
        )
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes, for a smoke run")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_ops_report.py needs a CUDA GPU, and torch sees none (torch.cuda.is_available() is False).")
    if "triton" not in ops.available_backends():
        sys.exit("gpu_ops_report.py needs triton installed (pip install triton): the Triton backend is unavailable.")

    torch.manual_seed(0)
    scale = 8 if args.quick else 1
    gpu = torch.cuda.get_device_name()
    copy_gbs = copy_bandwidth_gbs(2**30 // scale)
    gemm_tflops = bf16_gemm_tflops(8192 // (2 if args.quick else 1))
    rows = [
        measure_gather(128, 512, 27, 64, torch.bfloat16),  # DeepSeekMoE, one encoder batch
        measure_gather(8192 // scale, 4, 16, 64, torch.float32),  # OLMoE, enough rows to load the card
        measure_cosine(1024, 65536 // scale, 2048, 16 * 64, torch.bfloat16),
        measure_cosine(1024, 65536 // scale, 2048, 16 * 64, torch.float32),
        measure_cosine(4096, 16384 // scale, 4096, 27 * 64, torch.bfloat16),
        measure_topk(1000, 200_000 // scale, 2048, 16 * 64, 10, torch.bfloat16),
    ]
    table = markdown_table(gpu, copy_gbs, gemm_tflops, rows)
    print(table)

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem = "gpu_ops_" + re.sub(r"[^A-Za-z0-9]+", "_", gpu).strip("_").lower()
    (RESULTS_DIR / f"{stem}.md").write_text(table)
    raw = dict(gpu=gpu, torch=torch.__version__, copy_gbs=copy_gbs, bf16_gemm_tflops=gemm_tflops, ops=rows)
    (RESULTS_DIR / f"{stem}.json").write_text(json.dumps(raw, indent=2) + "\n")
    print(f"written to {RESULTS_DIR / stem}.md and .json")


if __name__ == "__main__":
    main()
