"""How close the Triton ops come to the GPU's limits.

Measures this card's device-to-device copy bandwidth and bf16 GEMM throughput, then each Triton
op's achieved bandwidth and TFLOP/s as a fraction of those two ceilings. Every op is timed by
benchmarks.helpers.time_calls (a warm-up on the same inputs, then >= 5 s of back-to-back launches
between CUDA events),
checked against the torch reference first, and caught and recorded as it ends:
benchmarks/results/gpu_ops[_quick]_<card>.jsonl (one record an op) and .md (regenerated each time).
Microsecond ops are bound by the launch rate: their numbers are an upper bound on kernel time.

Run on a CUDA machine:  python -m benchmarks.gpu_ops_report [--quick]
"""

import argparse
import sys

import torch

from benchmarks.helpers import (
    ResultsLog, add_quick_arguments, card_stem, caught, markdown_table, matmul_flops_per_s, results_dir, time_calls,
)
from moee_fast import ops


def ms_per_call(fn) -> float:
    return time_calls(fn, "cuda").seconds * 1e3


def copy_bandwidth_gbs(n_bytes):
    """Device-to-device copy: every byte is read once and written once."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * n_bytes / ms_per_call(lambda: dst.copy_(src)) / 1e6


def embeddings(n, hidden, rw_width, dtype):
    hs = torch.randn(n, hidden, device="cuda", dtype=dtype)
    rw = torch.softmax(torch.randn(n, rw_width, device="cuda"), dim=-1).to(dtype)
    return hs, rw


def check_against_torch(name, triton_out, torch_out, tol):
    """A fast kernel that computes the wrong thing is recorded as a failure, never as a speed."""
    error = (triton_out.float() - torch_out.float()).abs().max().item()
    if not error <= tol:
        raise AssertionError(f"{name}: Triton result differs from torch by {error:.3g} (> {tol})")


def measure_gather(batch, tokens, n_layers, n_experts, dtype):
    """The encoder's pattern: one launch per MoE layer into a preallocated output, rows built once."""
    logits = [torch.randn(batch * tokens, n_experts, device="cuda", dtype=dtype) for _ in range(n_layers)]
    rows = torch.arange(batch, device="cuda") * tokens + tokens - 1
    outs = [torch.empty(batch, 1, n_experts, device="cuda") for _ in range(n_layers)]

    def run():
        for layer_logits, out in zip(logits, outs):
            ops.gather_router_softmax([layer_logits], rows, backend="triton", out=out, check_rows=False)
        return outs

    check_against_torch("gather_router_softmax", torch.cat(run(), 1),
                        ops.gather_router_softmax(logits, rows, backend="torch"), 1e-5)
    n_bytes = batch * n_layers * n_experts * (logits[0].element_size() + 4) + rows.numel() * 8
    return dict(op="gather_router_softmax", shape=f"B={batch} of {batch * tokens} rows, L={n_layers}, E={n_experts}, {dtype}",
                ms=ms_per_call(run), bytes=n_bytes, flops=0)


def measure_cosine(n_a, n_b, hidden, rw_width, dtype):
    a_hs, a_rw = embeddings(n_a, hidden, rw_width, dtype)
    b_hs, b_rw = embeddings(n_b, hidden, rw_width, dtype)
    out = torch.empty(n_a, n_b, device="cuda")
    run = lambda: ops.combined_cosine(a_hs, a_rw, b_hs, b_rw, backend="triton", out=out)  # noqa: E731
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    check_against_torch("combined_cosine", run(), ops.combined_cosine(a_hs, a_rw, b_hs, b_rw, backend="torch"), tol)
    width = hidden + rw_width
    return dict(op="combined_cosine", shape=f"{n_a}x{n_b}, H={hidden}, RW={rw_width}, {dtype}",
                ms=ms_per_call(run), bytes=(n_a + n_b) * width * a_hs.element_size() + n_a * n_b * 4,
                flops=2 * n_a * n_b * width)


def measure_topk(n_queries, n_corpus, hidden, rw_width, k, dtype):
    q_hs, q_rw = embeddings(n_queries, hidden, rw_width, dtype)
    c_hs, c_rw = embeddings(n_corpus, hidden, rw_width, dtype)
    run = lambda: ops.topk_combined_cosine(q_hs, q_rw, c_hs, c_rw, k, backend="triton")  # noqa: E731
    reference, _ = ops.topk_combined_cosine(q_hs, q_rw, c_hs, c_rw, k, backend="torch")
    check_against_torch("topk_combined_cosine", run()[0], reference, 1e-4 if dtype == torch.float32 else 2e-2)
    width = hidden + rw_width
    return dict(op="topk_combined_cosine", shape=f"k={k}, {n_queries}x{n_corpus}, H={hidden}, RW={rw_width}, {dtype}",
                ms=ms_per_call(run), bytes=(n_queries + n_corpus) * width * q_hs.element_size(),
                flops=2 * n_queries * n_corpus * width)


def render(gpu, copy_gbs, gemm_tflops):
    def markdown(records):
        rows = []
        for r in records:
            if "error" in r:
                rows.append([r["step"], "", "", "", "", "", "", f"failed: {r['error']}"])
                continue
            gbs, tflops = r["bytes"] / r["ms"] / 1e6, r["flops"] / r["ms"] / 1e9
            rows.append([r["op"], r["shape"], f"{r['ms']:.4f}", f"{gbs:,.0f}", f"{100 * gbs / copy_gbs:.1f}%",
                         f"{tflops:,.1f}", f"{100 * tflops / gemm_tflops:.1f}%", ""])
        header = ["op", "shape", "ms", "GB/s", "% of copy", "TFLOP/s", "% of bf16 GEMM", "note"]
        return "\n".join([f"# Triton ops on {gpu}", "", f"Ceilings measured here: device-to-device copy "
                          f"{copy_gbs:,.0f} GB/s; bf16 GEMM {gemm_tflops:,.1f} TFLOP/s.", "",
                          *markdown_table(header, rows), ""])

    return markdown


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_quick_arguments(parser, "shapes cut 8x")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_ops_report needs a CUDA GPU, and torch sees none (torch.cuda.is_available() is False).")
    if "triton" not in ops.available_backends():
        sys.exit("gpu_ops_report needs triton installed (pip install triton): the Triton backend is unavailable.")

    torch.manual_seed(0)
    scale = 8 if args.quick else 1
    gpu = torch.cuda.get_device_name()
    copy_gbs = copy_bandwidth_gbs(2**30 // scale)
    gemm_tflops = matmul_flops_per_s("cuda", torch.bfloat16, 8192 // (2 if args.quick else 1)) / 1e12
    stem = card_stem("gpu_ops_quick" if args.quick else "gpu_ops", gpu)
    log = ResultsLog(args.out_dir or results_dir(), stem, render(gpu, copy_gbs, gemm_tflops))
    runs = [
        ("gather DeepSeekMoE batch", measure_gather, (128, 512, 27, 64, torch.bfloat16)),
        ("gather OLMoE rows", measure_gather, (8192 // scale, 4, 16, 64, torch.float32)),
        ("cosine bf16", measure_cosine, (1024, 65536 // scale, 2048, 16 * 64, torch.bfloat16)),
        ("cosine fp32", measure_cosine, (1024, 65536 // scale, 2048, 16 * 64, torch.float32)),
        ("cosine wide bf16", measure_cosine, (4096, 16384 // scale, 4096, 27 * 64, torch.bfloat16)),
        ("top-k bf16", measure_topk, (1000, 200_000 // scale, 2048, 16 * 64, 10, torch.bfloat16)),
    ]
    for label, measure, shape in runs:
        log.add(caught(label, measure, *shape))
        torch.cuda.empty_cache()
    print(log.markdown.read_text())
    print(f"written to {log.markdown} and {log.jsonl.name}")


if __name__ == "__main__":
    main()
