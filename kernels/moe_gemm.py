"""One expert GEMM per aligned block (see moe_align.py): the gate_up and down halves of fused MoE.

Each program takes BLOCK_M aligned rows, all of one expert, and BLOCK_N output columns, and
accumulates in fp32 on the tensor cores. The gate_up launch reads activation rows through the
aligned pairs (row = pair // top_k, no gathered copy), multiplies by the expert's gate and up
halves and stores SiLU(gate) * up by aligned position; the down launch reads those rows in order,
scales by each pair's routing weight in the epilogue and stores one row per (token, k) pair, which
moe_sum.py adds up in a fixed order (no atomics). Padding rows (sentinel pairs) are masked to zero
and never stored; programs past the padded total return at once.
"""

import torch
import triton
import triton.language as tl

from .combined_cosine import _dot_upcast


@triton.jit
def _moe_gemm_kernel(
    a, b, b_up, c, sorted_pairs, expert_of_block, padded_total, pair_weights,
    n_cols, k_dim, n_pairs, top_k, max_blocks,
    stride_am, stride_be, stride_bn, stride_bk, stride_cm,
    GATED: tl.constexpr,  # c = SiLU(a @ b^T) * (a @ b_up^T), else c = a @ b^T
    GATHER_A: tl.constexpr,  # a's row is the pair's token (pair // top_k), else the aligned position
    SCATTER_C: tl.constexpr,  # c's row is the pair, else the aligned position
    WEIGHTED: tl.constexpr,  # scale each row by pair_weights[pair]
    UPCAST: tl.constexpr,  # multiply in fp32: the interpreter's bf16 dot is wrong (combined_cosine._dot_upcast)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped order: GROUP_M row blocks share each column tile while it is in L2.
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(n_cols, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(max_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    if pid_m * BLOCK_M >= tl.load(padded_total):
        return
    expert = tl.load(expert_of_block + pid_m).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_pairs + rows)
    valid = pair < n_pairs
    if GATHER_A:
        a_rows = (pair // top_k).to(tl.int64)
    else:
        a_rows = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    a_ptrs = a + a_rows[:, None] * stride_am
    b_offsets = expert * stride_be + cols[None, :].to(tl.int64) * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_dim
        x = tl.load(a_ptrs + ks[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & col_ok[None, :]
        w_offsets = b_offsets + ks[:, None] * stride_bk
        w = tl.load(b + w_offsets, mask=w_mask, other=0.0)
        if UPCAST:
            x, w = x.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(x, w, acc)
        if GATED:
            w_up = tl.load(b_up + w_offsets, mask=w_mask, other=0.0)
            if UPCAST:
                w_up = w_up.to(tl.float32)
            acc_up = tl.dot(x, w_up, acc_up)
    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    if WEIGHTED:
        acc = acc * tl.load(pair_weights + pair, mask=valid, other=0.0).to(tl.float32)[:, None]
    if SCATTER_C:
        c_rows = pair.to(tl.int64)
    else:
        c_rows = rows.to(tl.int64)
    tl.store(c + c_rows[:, None] * stride_cm + cols[None, :], acc.to(c.dtype.element_ty),
             mask=valid[:, None] & col_ok[None, :])


def moe_gemm(a, weight, out, sorted_pairs, expert_of_block, padded_total, n_pairs, top_k, config, *,
             up_weight=None, gather_a=False, scatter_out=False, pair_weights=None):
    """out[row] = a[row] @ weight[expert]^T (SiLU-gated by up_weight when given, scaled by
    pair_weights when given) for every aligned row. weight, up_weight: [E, N, K] views with one
    stride set (unit stride along K); a: [rows, K] and out: [rows, N], unit inner stride;
    n_pairs: the real pair count (the sentinel of moe_align)."""
    n_cols, k_dim = weight.shape[1], weight.shape[2]
    max_blocks = expert_of_block.numel()
    grid = (max_blocks * triton.cdiv(n_cols, config["BLOCK_N"]),)
    _moe_gemm_kernel[grid](
        a, weight, weight if up_weight is None else up_weight, out, sorted_pairs, expert_of_block, padded_total,
        pair_weights, n_cols, k_dim, n_pairs, top_k, max_blocks,
        a.stride(0), weight.stride(0), weight.stride(1), weight.stride(2), out.stride(0),
        GATED=up_weight is not None, GATHER_A=gather_a, SCATTER_C=scatter_out, WEIGHTED=pair_weights is not None,
        UPCAST=_dot_upcast(a.dtype),
        BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"], GROUP_M=config["GROUP_M"],
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return out

