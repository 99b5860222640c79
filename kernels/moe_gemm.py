"""One expert GEMM per aligned block (see moe_align.py): the gate_up and down halves of fused MoE.

Each program takes BLOCK_M aligned rows, all of one expert, and BLOCK_N output columns, and
accumulates in fp32 on the tensor cores. The gate_up launch reads activation rows through the
aligned pairs (row = pair // top_k, no gathered copy), multiplies by the expert's gate and up
halves and stores SiLU(gate) * up by aligned position; the down launch reads those rows in order,
scales by each pair's routing weight in the epilogue and stores one row per (token, k) pair, which
moe_sum.py adds up in a fixed order (no atomics). Padding rows (sentinel pairs) are masked to zero
and never stored; programs past the padded total return at once.

Quantized weights are decoded inside the weight loads, never into a dequantized copy:
`Int8Rows` (int8 values, one fp32 scale per output row, value = q * scale / 127: bitsandbytes'
int8 layout) multiplies the int8 tile, exact in 16 bits, and scales the fp32 accumulator per
column in the epilogue; `Blockwise4Bit` (two 4-bit codes per byte, high nibble first, over each
expert's row-major [N, K] matrix; one absmax per `blocksize` values, itself an 8-bit code of a
256-block scale plus an offset under double quantization: bitsandbytes' NF4/FP4 layout) looks each
code and its block's absmax up, in fp32, and rounds the tile to the activations' dtype.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .combined_cosine import _dot_upcast

DENSE, INT8_ROWS, BLOCKWISE_4BIT = 0, 1, 2


class Int8Rows(NamedTuple):
    """data int8 [E, N, K]; scale fp32 [E, N]: weight = data * scale / 127."""

    data: torch.Tensor
    scale: torch.Tensor


class Blockwise4Bit(NamedTuple):
    """data uint8 [E, ceil(N * K / 2)]; code fp32 [16]; absmax [E, ceil(N * K / blocksize)]: fp32,
    or with `nested` = (nested_absmax fp32 [E, ceil(blocks / 256)], nested_code fp32 [256],
    offset fp32 [E]) uint8 codes decoding to nested_code[q] * nested_absmax[block // 256] + offset."""

    data: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    shape: tuple  # (N, K) of each expert's matrix
    blocksize: int
    nested: tuple | None = None


NESTED_BLOCKSIZE = 256


def weight_shape(weight) -> tuple[int, int, int]:
    """(E, N, K) of a dense [E, N, K] weight or a quantized one."""
    if isinstance(weight, Blockwise4Bit):
        return (weight.data.shape[0], *weight.shape)
    return tuple((weight.data if isinstance(weight, Int8Rows) else weight).shape)


@triton.jit
def _load_weight(b, scale, nested, offset, code, nested_code, expert, w_offsets, w_mask, stride_se, stride_ne,
                 FORMAT: tl.constexpr, NESTED: tl.constexpr, QBLOCK: tl.constexpr, NESTED_BLOCK: tl.constexpr):
    """A [BLOCK_K, BLOCK_N] weight tile of `expert` at element offsets `w_offsets` (for 4 bits: the
    row-major index n * K + k), as stored (dense, int8) or decoded to fp32 (4 bits)."""
    if FORMAT == 2:  # a constexpr branch, so the two results may differ in type
        packed = tl.load(b + w_offsets // 2, mask=w_mask, other=0).to(tl.int32)
        nibble = (packed >> ((1 - w_offsets % 2) * 4)) & 15
        block = w_offsets // QBLOCK
        if NESTED:
            q = tl.load(scale + expert * stride_se + block, mask=w_mask, other=0).to(tl.int32)
            absmax = tl.load(nested_code + q) * tl.load(nested + expert * stride_ne + block // NESTED_BLOCK, mask=w_mask,
                                                         other=0.0) + tl.load(offset + expert)
        else:
            absmax = tl.load(scale + expert * stride_se + block, mask=w_mask, other=0.0)
        w = tl.where(w_mask, tl.load(code + nibble) * absmax, 0.0)
    else:
        w = tl.load(b + w_offsets, mask=w_mask, other=0)
    return w


@triton.jit
def _moe_gemm_kernel(
    a, b, b_up, c, sorted_pairs, expert_of_block, padded_total, pair_weights,
    b_scale, b_up_scale, b_nested, b_up_nested, b_offset, b_up_offset, code, nested_code,
    n_cols, k_dim, n_pairs, top_k, max_blocks,
    stride_am, stride_be, stride_bn, stride_bk, stride_cm, stride_se, stride_ne,
    GATED: tl.constexpr,  # c = SiLU(a @ b^T) * (a @ b_up^T), else c = a @ b^T
    GATHER_A: tl.constexpr,  # a's row is the pair's token (pair // top_k), else the aligned position
    SCATTER_C: tl.constexpr,  # c's row is the pair, else the aligned position
    WEIGHTED: tl.constexpr,  # scale each row by pair_weights[pair]
    UPCAST: tl.constexpr,  # multiply in fp32: the interpreter's bf16 dot is wrong (combined_cosine._dot_upcast)
    FORMAT: tl.constexpr,  # DENSE, INT8_ROWS or BLOCKWISE_4BIT (the module docstring)
    NESTED: tl.constexpr,  # 4 bits: the absmax is double-quantized
    QBLOCK: tl.constexpr,  # 4 bits: values per absmax
    NESTED_BLOCK: tl.constexpr,  # 4 bits: absmax codes per nested scale
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
    b_expert = b + expert * stride_be
    b_up_expert = b_up + expert * stride_be
    b_offsets = cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_dim
        x = tl.load(a_ptrs + ks[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & col_ok[None, :]
        w_offsets = b_offsets + ks[:, None] * stride_bk
        w = _load_weight(b_expert, b_scale, b_nested, b_offset, code, nested_code, expert, w_offsets, w_mask,
                         stride_se, stride_ne, FORMAT, NESTED, QBLOCK, NESTED_BLOCK)
        if UPCAST:  # straight to fp32: the interpreter's conversions to bf16 truncate (and garble ints)
            x, w = x.to(tl.float32), w.to(tl.float32)
        else:  # int8 exactly; 4-bit values rounded as a dequantized weight would be
            w = w.to(x.dtype)
        acc = tl.dot(x, w, acc)
        if GATED:
            w_up = _load_weight(b_up_expert, b_up_scale, b_up_nested, b_up_offset, code, nested_code, expert, w_offsets,
                                w_mask, stride_se, stride_ne, FORMAT, NESTED, QBLOCK, NESTED_BLOCK)
            w_up = w_up.to(tl.float32) if UPCAST else w_up.to(x.dtype)
            acc_up = tl.dot(x, w_up, acc_up)
    if FORMAT == 1:  # int8 rows: q * scale / 127, the scale per output column
        acc = acc * (tl.load(b_scale + expert * stride_se + cols, mask=col_ok, other=0.0) * (1.0 / 127.0))[None, :]
        if GATED:
            acc_up = acc_up * (tl.load(b_up_scale + expert * stride_se + cols, mask=col_ok, other=0.0)
                               * (1.0 / 127.0))[None, :]
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


def _weight_arguments(weight, up_weight):
    """(format, b, b_up, per-weight statistics, shared tables, strides, flags) of one launch."""
    if isinstance(weight, Int8Rows):
        up = up_weight if up_weight is not None else weight
        return dict(FORMAT=INT8_ROWS, b=weight.data, b_up=up.data, b_scale=weight.scale, b_up_scale=up.scale,
                    stride_be=weight.data.stride(0), stride_bn=weight.data.stride(1), stride_bk=weight.data.stride(2),
                    stride_se=weight.scale.stride(0))
    if isinstance(weight, Blockwise4Bit):
        up = up_weight if up_weight is not None else weight
        nested, up_nested = weight.nested or (None, None, None), up.nested or (None, None, None)
        return dict(FORMAT=BLOCKWISE_4BIT, b=weight.data, b_up=up.data, b_scale=weight.absmax, b_up_scale=up.absmax,
                    b_nested=nested[0], b_up_nested=up_nested[0], nested_code=nested[1], b_offset=nested[2],
                    b_up_offset=up_nested[2], code=weight.code, stride_be=weight.data.stride(0),
                    stride_bn=weight.shape[1], stride_bk=1, stride_se=weight.absmax.stride(0),
                    stride_ne=0 if weight.nested is None else nested[0].stride(0),
                    NESTED=weight.nested is not None, QBLOCK=weight.blocksize)
    return dict(FORMAT=DENSE, b=weight, b_up=weight if up_weight is None else up_weight,
                stride_be=weight.stride(0), stride_bn=weight.stride(1), stride_bk=weight.stride(2))


def moe_gemm(a, weight, out, sorted_pairs, expert_of_block, padded_total, n_pairs, top_k, config, *,
             up_weight=None, gather_a=False, scatter_out=False, pair_weights=None):
    """out[row] = a[row] @ weight[expert]^T (SiLU-gated by up_weight when given, scaled by
    pair_weights when given) for every aligned row. weight, up_weight: dense [E, N, K] views with
    one stride set (unit stride along K), or both Int8Rows or both Blockwise4Bit of the same
    layout (the module docstring); a: [rows, K] and out: [rows, N], unit inner stride;
    n_pairs: the real pair count (the sentinel of moe_align)."""
    _, n_cols, k_dim = weight_shape(weight)
    arguments = dict(b_scale=None, b_up_scale=None, b_nested=None, b_up_nested=None, b_offset=None, b_up_offset=None,
                     code=None, nested_code=None, stride_se=0, stride_ne=0, NESTED=False, QBLOCK=1,
                     NESTED_BLOCK=NESTED_BLOCKSIZE)
    arguments.update(_weight_arguments(weight, up_weight))
    max_blocks = expert_of_block.numel()
    grid = (max_blocks * triton.cdiv(n_cols, config["BLOCK_N"]),)
    _moe_gemm_kernel[grid](
        a=a, c=out, sorted_pairs=sorted_pairs, expert_of_block=expert_of_block, padded_total=padded_total,
        pair_weights=pair_weights, n_cols=n_cols, k_dim=k_dim, n_pairs=n_pairs, top_k=top_k, max_blocks=max_blocks,
        stride_am=a.stride(0), stride_cm=out.stride(0), **arguments,
        GATED=up_weight is not None, GATHER_A=gather_a, SCATTER_C=scatter_out, WEIGHTED=pair_weights is not None,
        UPCAST=_dot_upcast(a.dtype),
        BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"], GROUP_M=config["GROUP_M"],
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return out
