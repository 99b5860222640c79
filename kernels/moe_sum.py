"""The per-(token, k) rows of the down GEMM (moe_gemm.py) added up per token in a fixed order,
plus the shared experts' row where the family has one: no atomics, so a token's result never
depends on how its pairs were scheduled."""

import torch
import triton
import triton.language as tl


@triton.jit
def _moe_sum_kernel(rows, shared, out, n_cols, stride_row, stride_shared, stride_out,
                    TOP_K: tl.constexpr, HAS_SHARED: tl.constexpr, BLOCK_N: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = cols < n_cols
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):  # k = 0, 1, ... in order
        acc += tl.load(rows + (token * TOP_K + j) * stride_row + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_SHARED:
        acc += tl.load(shared + token * stride_shared + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out + token * stride_out + cols, acc.to(out.dtype.element_ty), mask=ok)


def moe_sum(rows: torch.Tensor, top_k: int, out: torch.Tensor, shared: torch.Tensor | None = None) -> torch.Tensor:
    """out[t] = sum over j of rows[t * top_k + j] (+ shared[t]), accumulated in fp32. rows:
    [T * top_k, H], shared and out: [T, H], unit inner strides."""
    n_tokens, n_cols = out.shape
    block_n = min(1024, triton.next_power_of_2(n_cols))
    grid = (n_tokens, triton.cdiv(n_cols, block_n))
    if n_tokens:
        _moe_sum_kernel[grid](rows, shared, out, n_cols, rows.stride(0), 0 if shared is None else shared.stride(0),
                              out.stride(0), TOP_K=top_k, HAS_SHARED=shared is not None, BLOCK_N=block_n)
    return out
