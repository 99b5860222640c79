"""cos(a_hs, b_hs) + alpha * cos(a_rw, b_rw) for every pair of rows, in one pass over both matrices."""

import os

import torch
import triton
import triton.language as tl


from .grid import tiled_grid


@triton.jit
def _tile_dot(a, b, offs_a, offs_b, in_a, in_b, width, stride_a, stride_b,
              BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
              UPCAST: tl.constexpr):
    """[BLOCK_A, BLOCK_B] fp32 dot products of a's rows offs_a with b's rows offs_b over `width` columns."""
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    cols = tl.arange(0, BLOCK_K)
    for k in range(0, width, BLOCK_K):
        in_k = k + cols < width
        a_block = tl.load(a + offs_a[:, None] * stride_a + (k + cols)[None, :], mask=in_a[:, None] & in_k[None, :], other=0.0)
        b_block = tl.load(b + offs_b[None, :] * stride_b + (k + cols)[:, None], mask=in_k[:, None] & in_b[None, :], other=0.0)
        if UPCAST:
            a_block, b_block = a_block.to(tl.float32), b_block.to(tl.float32)
        acc = tl.dot(a_block, b_block, acc, input_precision=PRECISION)
    return acc


@triton.jit(do_not_specialize=["block_offset_b", "block_offset_a"])
def _combined_cosine_kernel(
    a_hs, b_hs, a_rw, b_rw,
    a_hs_inv_norm, b_hs_inv_norm, a_rw_inv_norm, b_rw_inv_norm,
    out,
    n_a, n_b, hs_width, rw_width,
    stride_a_hs, stride_b_hs, stride_a_rw, stride_b_rw, stride_out,
    alpha,
    block_offset_b, block_offset_a,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
    HS_PRECISION: tl.constexpr, RW_PRECISION: tl.constexpr, HS_UPCAST: tl.constexpr, RW_UPCAST: tl.constexpr,
    NAN_AS_NEG_INF: tl.constexpr,
):
    # b (the corpus side, the long one) on grid axis x, whose cap is 2**31 - 1 (see grid.py).
    # int64 offsets: Na * Nb and N * H can pass 2**31 at corpus scale.
    offs_b = (tl.program_id(0).to(tl.int64) + block_offset_b) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_a = (tl.program_id(1).to(tl.int64) + block_offset_a) * BLOCK_A + tl.arange(0, BLOCK_A)
    in_a = offs_a < n_a
    in_b = offs_b < n_b
    hs_dot = _tile_dot(a_hs, b_hs, offs_a, offs_b, in_a, in_b, hs_width, stride_a_hs, stride_b_hs,
                       BLOCK_A, BLOCK_B, BLOCK_K, HS_PRECISION, HS_UPCAST)
    rw_dot = _tile_dot(a_rw, b_rw, offs_a, offs_b, in_a, in_b, rw_width, stride_a_rw, stride_b_rw,
                       BLOCK_A, BLOCK_B, BLOCK_K, RW_PRECISION, RW_UPCAST)
    hs_scale = tl.load(a_hs_inv_norm + offs_a, mask=in_a, other=0.0)[:, None] * tl.load(b_hs_inv_norm + offs_b, mask=in_b, other=0.0)[None, :]
    rw_scale = tl.load(a_rw_inv_norm + offs_a, mask=in_a, other=0.0)[:, None] * tl.load(b_rw_inv_norm + offs_b, mask=in_b, other=0.0)[None, :]
    scores = hs_dot * hs_scale + alpha * (rw_dot * rw_scale)
    if NAN_AS_NEG_INF:  # top-k ranks a NaN score last (a real score is never -inf)
        scores = tl.where(scores != scores, -float("inf"), scores)
    tl.store(out + offs_a[:, None] * stride_out + offs_b[None, :], scores, mask=in_a[:, None] & in_b[None, :])


def inverse_norms(x, eps):
    """fp32 1 / max(|row|, eps) without materialising an fp32 copy of x."""
    return torch.linalg.vector_norm(x, dim=1, dtype=torch.float32).clamp_min_(eps).reciprocal_()


def _dot_precision(dtype, precision):
    # The precision option applies to fp32 operands; bf16/fp16 already run on tensor cores exactly.
    return precision if dtype == torch.float32 else None


def _dot_upcast(dtype):
    # Triton's CPU interpreter multiplies bf16 blocks as raw integers (garbage); bf16 products are exact
    # in fp32, so upcasting there gives the GPU's result.
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


NUM_STAGES = 3


def _tile_config(half_precision):
    """(BLOCK_A, BLOCK_B, BLOCK_K, num_warps): the largest tiles whose two fp32 accumulators (hs and
    rw) fit in registers on sm_90 with no spill (ptxas -v, tests/test_kernel_compile.py): a larger
    tile spills and loses more than its reuse gains."""
    return (64, 128, 32, 8) if half_precision else (64, 64, 32, 8)


def launches(n_a, n_b, half_precision):
    """The launches scoring [n_a, n_b]: b blocks on grid axis x, a blocks on y, within CUDA's caps."""
    block_a, block_b, _, _ = _tile_config(half_precision)
    return tiled_grid(triton.cdiv(n_b, block_b), triton.cdiv(n_a, block_a))


def combined_cosine(a_hs, a_rw, b_hs, b_rw, alpha, out, precision, *, norm_eps, inv_norms=None, nan_as_neg_inf=False):
    """Inputs: 2-D, inner-contiguous, a/b dtypes matching per stream (fp32, bf16 or fp16).
    out: float32 [Na, Nb] (any row stride, unit column stride), fully overwritten.
    precision: tl.dot's input_precision for fp32 operands ("ieee", "tf32x3" or "tf32").
    norm_eps: the zero-norm guard, 1 / max(|row|, norm_eps) (the caller's, shared by every backend).
    inv_norms: optional precomputed (a_hs, b_hs, a_rw, b_rw) inverse norms, e.g. reused across corpus tiles.
    nan_as_neg_inf: write NaN scores as -inf, for top-k to rank them last."""
    if inv_norms is None:
        inv_norms = tuple(inverse_norms(x, norm_eps) for x in (a_hs, b_hs, a_rw, b_rw))
    n_a, n_b = a_hs.shape[0], b_hs.shape[0]
    half_precision = a_hs.element_size() == 2 and a_rw.element_size() == 2
    block_a, block_b, block_k, num_warps = _tile_config(half_precision)
    for launch in launches(n_a, n_b, half_precision):
        _combined_cosine_kernel[launch.grid](
            a_hs, b_hs, a_rw, b_rw, *inv_norms, out,
            n_a, n_b, a_hs.shape[1], a_rw.shape[1],
            a_hs.stride(0), b_hs.stride(0), a_rw.stride(0), b_rw.stride(0), out.stride(0),
            float(alpha), launch.offset_x, launch.offset_y,
            BLOCK_A=block_a, BLOCK_B=block_b, BLOCK_K=block_k,
            HS_PRECISION=_dot_precision(a_hs.dtype, precision), RW_PRECISION=_dot_precision(a_rw.dtype, precision),
            HS_UPCAST=_dot_upcast(a_hs.dtype), RW_UPCAST=_dot_upcast(a_rw.dtype), NAN_AS_NEG_INF=nan_as_neg_inf,
            num_warps=num_warps, num_stages=NUM_STAGES,
        )
    return out
