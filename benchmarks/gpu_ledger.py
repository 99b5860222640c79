"""Per-layer ledger of the CUDA forward: kernel launches and HBM bytes per token per decoder layer,
each kernel's bytes derived from the tensors it reads and writes, for moee-fast's CUDA path and
beside it vLLM's design (fused add+RMSNorm, in-place rotary, fused MoE with tuned tiles), on the
published OLMoE, Qwen1.5-MoE, DeepSeekMoE and Mixtral shapes in bf16; and the quantized experts
(int8 rows, NF4 blocks) as the fused path runs them (decoded inside the GEMMs) and as their own
per-expert loop ran them before (each active expert dequantized per batch).

Counted per token: activations only. GEMM weights are read once per batch whatever its size, so
they are listed apart, per token at a batch of BATCH_TOKENS tokens. "glue" is every byte outside
the GEMMs' own operands (their activation inputs and outputs): normalisation, rotary, copies,
gathers, the routing softmax and top-k, the MoE alignment and sum. The attention kernel's own
reads and writes are counted as a GEMM's (flash attention keeps scores on chip). No kernel here is
timed: this is arithmetic over shapes, the part of the design a CPU can check.

Run anywhere:  python -m benchmarks.gpu_ledger   (writes benchmarks/results/gpu_ledger.md)
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from benchmarks.helpers import RESULTS_DIR, markdown_table

BATCH_TOKENS = 16384
BF16, FP32, INDEX = 2, 4, 4


@dataclass(frozen=True)
class Shape:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    experts: int
    top_k: int
    intermediate: int
    shared_intermediate: int = 0  # 0: no shared expert
    shared_gate: bool = False  # Qwen2-MoE's sigmoid gate on the shared expert
    qk_norm: bool = False  # OLMoE's RMSNorm over the whole q and k projections


SHAPES = {
    "OLMoE-1B-7B": Shape(2048, 16, 16, 128, 64, 8, 1024, qk_norm=True),
    "Qwen1.5-MoE-A2.7B": Shape(2048, 16, 16, 128, 60, 4, 1408, shared_intermediate=5632, shared_gate=True),
    "DeepSeekMoE-16B": Shape(2048, 16, 16, 128, 64, 6, 1408, shared_intermediate=2816),
    "Mixtral-8x7B": Shape(4096, 32, 8, 128, 8, 2, 14336),
}


@dataclass(frozen=True)
class Kernel:
    name: str
    reads: float  # bytes per token
    writes: float
    gemm: bool = False  # its reads and writes are a GEMM's (or attention's) own operands
    launches: int = 1


def rms_norm(width: int, label: str) -> list[Kernel]:
    """ops.rms_norm: one pass (the norms part on bf16/fp16 CUDA)."""
    return [Kernel(f"{label}: RMSNorm (one pass)", BF16 * width, BF16 * width)]


def attention_block(s: Shape, design: str) -> list[Kernel]:
    """moee-fast: fused norms, residual adds apart, rotary in place, q/k/v passed to varlen_attn
    as the projections' rows (no copy); vLLM: residual add fused into each norm, one qkv GEMM."""
    q, kv, h = s.heads * s.head_dim, s.kv_heads * s.head_dim, s.hidden
    vllm = design == "vLLM"
    kernels = [Kernel("residual add + input norm (fused)", 2 * BF16 * h, 2 * BF16 * h)] if vllm else rms_norm(h, "input norm")
    kernels.append(Kernel("qkv projection" if vllm else "q, k, v projections", BF16 * h * (1 if vllm else 3),
                          BF16 * (q + 2 * kv), gemm=True, launches=1 if vllm else 3))
    if s.qk_norm:
        kernels += rms_norm(q, "q norm") + rms_norm(kv, "k norm")
    kernels.append(Kernel("rotary q, k in place", BF16 * (q + kv) + 4 * BF16 * s.head_dim, BF16 * (q + kv),
                          launches=1 if vllm else 2))
    kernels.append(Kernel("varlen flash attention", BF16 * (q + 2 * kv), BF16 * q, gemm=True))
    kernels.append(Kernel("o projection", BF16 * q, BF16 * h, gemm=True))
    if vllm:
        return kernels + [Kernel("residual add + post-attention norm (fused)", 2 * BF16 * h, 2 * BF16 * h)]
    return kernels + [Kernel("residual add", 2 * BF16 * h, BF16 * h)] + rms_norm(h, "post-attention norm")


def routing(s: Shape, with_rw: bool) -> list[Kernel]:
    e, k = s.experts, s.top_k
    kernels = [Kernel("router GEMM", BF16 * s.hidden, BF16 * e, gemm=True),
               Kernel("softmax + top-k (fp32)", BF16 * e, k * (FP32 + INDEX), launches=2)]
    if with_rw:  # moee-fast's RW: the last token's row only, one launch per layer
        kernels.append(Kernel("RW gather + softmax (last tokens only)", 0, 0))
    return kernels


def fused_moe(s: Shape, label: str) -> list[Kernel]:
    """The fused MoE of kernels/fused_moe.py (and vLLM's, which has the same data flow)."""
    h, i, k = s.hidden, s.intermediate, s.top_k
    kernels = [Kernel(f"{label}: align (memset, count, offsets, scatter)", 2 * k * INDEX, 2 * k * INDEX, launches=4),
               Kernel(f"{label}: gate_up GEMM, SiLU * up fused", k * BF16 * h, k * BF16 * i, gemm=True),
               Kernel(f"{label}: down GEMM, routing weight fused", k * (BF16 * i + FP32), k * BF16 * h, gemm=True),
               Kernel(f"{label}: sum over top-k (+ shared row)", (k + (1 if s.shared_intermediate else 0)) * BF16 * h,
                      BF16 * h)]
    if s.shared_intermediate:
        si = s.shared_intermediate
        kernels += [Kernel("shared expert: align (one expert)", 2 * INDEX, 2 * INDEX, launches=4),
                    Kernel("shared expert: gate_up GEMM", BF16 * h, BF16 * si, gemm=True),
                    Kernel("shared expert: down GEMM", BF16 * si, BF16 * h, gemm=True)]
        if s.shared_gate:
            kernels += [Kernel("shared gate GEMV + sigmoid", BF16 * h, BF16, launches=2)]
    return kernels


def moe_block(s: Shape, design: str) -> list[Kernel]:
    """The MoE block: routing, the fused MoE with the shared expert inside it (vLLM's and
    moee-fast's fused_experts part alike), moee-fast's RW gather; the residual add apart, as the
    decoder layer does it, or fused into vLLM's next norm."""
    kernels = routing(s, with_rw=design != "vLLM") + fused_moe(s, "fused MoE")
    if design == "vLLM":
        return kernels + [Kernel("residual add (fused into the next norm)", 0, 0, launches=0)]
    return kernels + [Kernel("residual add", 2 * BF16 * s.hidden, BF16 * s.hidden)]


def shared_mlp_apart(s: Shape) -> list[Kernel]:
    """A shared expert of bitsandbytes linears, run by the model's own MLP and added by torch (the
    quantized layers: only the routed experts are fused)."""
    if not s.shared_intermediate:
        return []
    si = s.shared_intermediate
    kernels = [Kernel("shared MLP: gate, up GEMMs", 2 * BF16 * s.hidden, 2 * BF16 * si, gemm=True, launches=2),
               Kernel("shared MLP: SiLU, multiply", 2 * BF16 * si, BF16 * si, launches=2),
               Kernel("shared MLP: down GEMM", BF16 * si, BF16 * s.hidden, gemm=True),
               Kernel("shared: add to routed", 2 * BF16 * s.hidden, BF16 * s.hidden)]
    if s.shared_gate:
        kernels += [Kernel("shared gate GEMV, sigmoid, multiply", 2 * BF16 * s.hidden, BF16 * s.hidden, launches=3)]
    return kernels


# Bytes per expert weight as stored: int8 with an fp32 scale per row; NF4 with a byte of absmax per
# 64 values, an fp32 per 256 absmax codes (double quantization) and an offset per matrix.
STORED_BYTES = {"int8": lambda rows, cols: rows * cols + FP32 * rows,
                "nf4": lambda rows, cols: rows * cols / 2 + rows * cols / 64 + FP32 * rows * cols / (64 * 256) + FP32}


def quantized_moe_block(s: Shape, method: str, fused: bool) -> list[Kernel]:
    """The routed experts quantized: fused (the quantized_experts part: the same launches and
    activation bytes as the dense fused MoE, weights decoded in registers), or their own loop
    (per active expert: gather, dequantize gate, up and down to fp32 then bf16, cat, two GEMMs,
    SiLU * up, weight, index_add; argsort, bincount and a host sync per layer). At BATCH_TOKENS
    tokens every expert is active, so the loop's dequantized copies are counted per token there."""
    routed = Shape(**{**s.__dict__, "shared_intermediate": 0})
    h, i, k, e = s.hidden, s.intermediate, s.top_k, s.experts
    if fused:
        kernels = routing(s, with_rw=True) + fused_moe(routed, f"fused MoE, {method} weights decoded in the GEMMs")
    else:
        weights = 3 * h * i
        dequantized = e * (STORED_BYTES[method](i, h) * 2 + STORED_BYTES[method](h, i)) / BATCH_TOKENS
        kernels = routing(s, with_rw=True) + [
            Kernel("expert loop: argsort, bincount, .tolist() (host sync)", k * INDEX * 2, k * INDEX * 2, launches=4),
            Kernel("expert loop: gather rows, index_select weights", k * BF16 * h + k * FP32, k * BF16 * h, launches=1 + e),
            Kernel("expert loop: dequantize to fp32, to bf16, cat gate/up",
                   dequantized + e * weights * (FP32 + BF16 * 2 / 3) / BATCH_TOKENS,
                   e * weights * (FP32 + BF16 + BF16 * 2 / 3) / BATCH_TOKENS, launches=7 * e),
            Kernel("expert loop: gate_up GEMM", k * BF16 * h, k * 2 * BF16 * i, gemm=True, launches=e),
            Kernel("expert loop: SiLU * up", k * 2 * BF16 * i, k * BF16 * i, launches=2 * e),
            Kernel("expert loop: down GEMM", k * BF16 * i, k * BF16 * h, gemm=True, launches=e),
            Kernel("expert loop: weight, index_add", k * (2 * BF16 * h + FP32) + BF16 * h, k * BF16 * h + BF16 * h,
                   launches=2 * e + 1)]
    return kernels + shared_mlp_apart(s) + [Kernel("residual add", 2 * BF16 * s.hidden, BF16 * s.hidden)]


def weights_per_token(s: Shape, method: str | None = None) -> float:
    """Weight bytes per token at BATCH_TOKENS: attention, router, the experts hit at that batch
    (every one, at these sizes) as stored (bf16, or `method`'s quantized bytes), the shared expert.
    Attention and shared-expert weights count as bf16 in every design (the ledger compares the
    routed experts' paths)."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    attention = BF16 * (s.hidden * (q + 2 * kv) + q * s.hidden + s.hidden * s.experts + 3 * s.hidden * s.shared_intermediate)
    if method is None:
        experts = BF16 * s.experts * 3 * s.hidden * s.intermediate
    else:
        experts = s.experts * (2 * STORED_BYTES[method](s.intermediate, s.hidden) + STORED_BYTES[method](s.hidden, s.intermediate))
    return (attention + experts) / BATCH_TOKENS


# design -> (attention block, MoE block, quantization of the routed experts)
DESIGNS = {
    "moee-fast CUDA": (lambda s: attention_block(s, "moee-fast"), lambda s: moe_block(s, "moee-fast"), None),
    "vLLM": (lambda s: attention_block(s, "vLLM"), lambda s: moe_block(s, "vLLM"), None),
    **{f"moee-fast CUDA, {method} experts{'' if fused else ' (own loop, before)'}":
       (lambda s: attention_block(s, "moee-fast"),
        lambda s, method=method, fused=fused: quantized_moe_block(s, method, fused), method)
       for method in ("int8", "nf4") for fused in (True, False)},
}


def ledger() -> list[dict]:
    rows = []
    for model, shape in SHAPES.items():
        for design, (attention_of, moe_of, method) in DESIGNS.items():
            moe = moe_of(shape)
            kernels = attention_of(shape) + moe
            glue = sum(k.reads + k.writes for k in kernels if not k.gemm)
            gemm = sum(k.reads + k.writes for k in kernels if k.gemm)
            rows.append(dict(model=model, design=design, launches=sum(k.launches for k in kernels),
                             moe_launches=sum(k.launches for k in moe),
                             glue_mb=glue / 1e6, gemm_activation_mb=gemm / 1e6,
                             weights_mb=weights_per_token(shape, method) / 1e6, kernels=kernels))
    return rows


def render(rows: list[dict]) -> str:
    header = ["model", "design", "launches / layer", "of which MoE block", "glue MB / token / layer", "GEMM activations MB",
              f"weights MB / token (batch {BATCH_TOKENS})"]
    table = [[r["model"], r["design"], r["launches"], r["moe_launches"], f"{r['glue_mb']:.3f}", f"{r['gemm_activation_mb']:.3f}",
              f"{r['weights_mb']:.3f}"] for r in rows]
    lines = ["# Per-layer ledger of the CUDA forward (bf16, per token, one decoder layer)", "",
             (__doc__ or "").split("\n\n")[1].replace("\n", " "), "",
             *markdown_table(header, table), ""]
    for r in rows:
        lines += [f"## {r['model']}: {r['design']}", ""]
        lines += markdown_table(["kernel", "launches", "read B/token", "write B/token", "GEMM operand"],
                                [[k.name, k.launches, f"{k.reads:,.0f}", f"{k.writes:,.0f}", "yes" if k.gemm else ""]
                                 for k in r["kernels"]])
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "gpu_ledger.md")
    args = parser.parse_args(argv)
    text = render(ledger())
    args.out.write_text(text)
    print(text.split("\n## ")[0])
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
