"""Tile configurations of the fused MoE experts, measured on this CUDA card and written to
kernels/configs/fused_moe.json (the table `moee_fast.kernels.fused_moe.pick_config` reads).

For each model shape and token count, every candidate tiling (dropped if it fails to compile or
run) runs the whole fused layer (alignment, both GEMMs, the top-k sum) on random routing; each
result is first compared with a float64-accumulated torch reference, then timed with
benchmarks.helpers.time_calls. The fastest per token count becomes that bucket's entry.
tests/test_kernel_compile.py then compiles every tiling the table holds for sm_90 and fails on
register spills, so rerun it after tuning.

Run on a CUDA machine:  python -m benchmarks.tune_fused_moe [--models olmoe,qwen2_moe] [--dry-run]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch

from benchmarks.helpers import time_calls

# (experts, top-k, hidden, intermediate) of the published models
SHAPES = {"olmoe": (64, 8, 2048, 1024), "qwen2_moe": (60, 4, 2048, 1408), "deepseek": (64, 6, 2048, 1408),
          "mixtral": (8, 2, 4096, 14336)}
TOKEN_COUNTS = (64, 512, 4096, 16384)
CANDIDATES = [dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=g, num_warps=w, num_stages=s)
              for m, n, k, g, w, s in itertools.product((16, 32, 64, 128), (64, 128), (32, 64), (1, 8), (4, 8), (3, 4))]


def reference(x, index, weights, gate_up, down):
    """The layer in fp32 torch (a loop over experts): what every candidate must reproduce."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    intermediate = gate_up.shape[1] // 2
    for e in range(gate_up.shape[0]):
        token, slot = (index == e).nonzero(as_tuple=True)
        if token.numel():
            h = x[token].float() @ gate_up[e].float().T
            y = (torch.nn.functional.silu(h[:, :intermediate]) * h[:, intermediate:]) @ down[e].float().T
            out.index_add_(0, token, y * weights[token, slot, None].float())
    return out


def tune_shape(model: str, dtype: torch.dtype, min_seconds: float) -> list:
    from moee_fast import ops

    n_experts, top_k, hidden, intermediate = SHAPES[model]
    gen = torch.Generator(device="cuda").manual_seed(0)
    gate_up = (torch.randn(n_experts, 2 * intermediate, hidden, device="cuda", generator=gen) / hidden**0.5).to(dtype)
    down = (torch.randn(n_experts, hidden, intermediate, device="cuda", generator=gen) / intermediate**0.5).to(dtype)
    rows = []
    for n_tokens in TOKEN_COUNTS:
        x = torch.randn(n_tokens, hidden, device="cuda", generator=gen).to(dtype)
        weights, index = torch.softmax(torch.randn(n_tokens, n_experts, device="cuda", generator=gen), -1).topk(top_k, -1)
        expected = reference(x, index, weights, gate_up, down)
        best = None
        for config in CANDIDATES:
            try:
                run = lambda: ops.fused_moe_experts(x, index, weights, gate_up, down, config=config)  # noqa: E731
                error = ((run().float() - expected).norm(dim=1) / expected.norm(dim=1)).max().item()
                if not error <= 2e-2:
                    print(f"{model} T={n_tokens} {config}: wrong result (row error {error:.3g})", file=sys.stderr)
                    continue
                ms = 1e3 * time_calls(run, "cuda", min_seconds).seconds
            except Exception as exc:  # out of shared memory or registers: not a candidate here
                print(f"{model} T={n_tokens} {config}: {type(exc).__name__}", file=sys.stderr)
                continue
            if best is None or ms < best[0]:
                best = (ms, config)
        if best is not None:
            print(f"{model} {dtype} T={n_tokens}: {best[0]:.3f} ms with {best[1]}", file=sys.stderr)
            rows.append([n_tokens, best[1]])
    if rows:
        rows[-1][0] = 1 << 40  # the last bucket takes every larger batch
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(SHAPES), help=f"comma-separated, of {','.join(SHAPES)}")
    parser.add_argument("--dtypes", default="bfloat16", help="comma-separated: bfloat16, float16")
    parser.add_argument("--min-seconds", type=float, default=0.5, help="timed work per candidate")
    parser.add_argument("--dry-run", action="store_true", help="print the entries instead of writing the table")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("tuning measures a CUDA card, and torch sees none")
    from moee_fast.kernels import fused_moe

    device = torch.cuda.get_device_name()
    document = json.loads(fused_moe.CONFIG_FILE.read_text())
    for model in args.models.split(","):
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            rows = tune_shape(model, dtype, args.min_seconds)
            n_experts, _, _, intermediate = SHAPES[model]
            key = fused_moe.config_key(device, n_experts, intermediate, dtype)
            if rows:
                document["configs"][key] = rows
                document["tuned_on"][key] = f"torch {torch.__version__}"
    text = json.dumps(document, indent=1) + "\n"
    if args.dry_run:
        print(text)
    else:
        fused_moe.CONFIG_FILE.write_text(text)
        print(f"written to {fused_moe.CONFIG_FILE}")


if __name__ == "__main__":
    main()
