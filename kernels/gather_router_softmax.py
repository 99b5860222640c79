"""Softmax over experts of the last-token router row of every sequence, for every MoE layer."""

import torch
import triton
import triton.language as tl

from .grid import tiled_grid


@triton.jit(do_not_specialize=["block_offset", "layer_offset"])
def _gather_router_softmax_kernel(
    first_logits,  # layer 0's logits; also fixes the element type of every layer
    pointer_table,  # int64 [L] data pointers of the layers (read only when FROM_TABLE)
    stride_table,  # int64 [L] row strides of the layers (read only when FROM_TABLE)
    first_row_stride,
    rows,
    out,
    n_sequences,
    n_layers,
    n_experts,
    block_offset,
    layer_offset,
    FROM_TABLE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    # Sequence blocks on grid axis x (cap 2**31 - 1), layers on y (see grid.py).
    layer = tl.program_id(1) + layer_offset
    if FROM_TABLE:
        logits = tl.load(pointer_table + layer).to(tl.pointer_type(first_logits.dtype.element_ty))
        row_stride = tl.load(stride_table + layer)
    else:
        logits = first_logits
        row_stride = first_row_stride
    sequences = (tl.program_id(0).to(tl.int64) + block_offset) * BLOCK_B + tl.arange(0, BLOCK_B)
    experts = tl.arange(0, BLOCK_E)
    in_batch = sequences < n_sequences
    in_block = in_batch[:, None] & (experts < n_experts)[None, :]
    row = tl.load(rows + sequences, mask=in_batch, other=0).to(tl.int64)
    x = tl.load(logits + row[:, None] * row_stride + experts[None, :], mask=in_block, other=-float("inf"))
    # Padding experts hold -inf and add exp(-inf) = 0; padding sequences get zeros (an all -inf row would
    # compute NaN) and are never stored.
    x = tl.where(in_batch[:, None], x.to(tl.float32), 0.0)
    x = tl.exp(x - tl.max(x, axis=1)[:, None])
    probs = x / tl.sum(x, axis=1)[:, None]
    out_offsets = (sequences[:, None] * n_layers + layer) * n_experts + experts[None, :]
    tl.store(out + out_offsets, probs, mask=in_block)


def _block_sizes(n_sequences, n_experts):
    """(BLOCK_B, BLOCK_E): about 2k logits per program, enough work without spilling a row block."""
    block_e = triton.next_power_of_2(n_experts)
    return max(1, min(triton.next_power_of_2(n_sequences), 2048 // block_e)), block_e


def launches(n_sequences, n_layers, n_experts):
    """The launches covering every (sequence block, layer): sequence blocks on grid axis x, layers on y."""
    block_b, _ = _block_sizes(n_sequences, n_experts)
    return tiled_grid(triton.cdiv(n_sequences, block_b), n_layers)


def gather_router_softmax(router_logits, rows, out):
    """router_logits: L tensors [rows_l, E] of one dtype, inner-contiguous; rows: int64 [B] on the
    same device; out: contiguous float32 [B, L, E], fully overwritten."""
    first = router_logits[0]
    n_sequences, n_layers, n_experts = rows.shape[0], len(router_logits), first.shape[1]
    # A single layer (the encoder's per-layer call) skips building the pointer table.
    from_table = n_layers > 1
    if from_table:  # built straight on the logits' device
        pointer_table = torch.tensor([t.data_ptr() for t in router_logits], dtype=torch.int64, device=first.device)
        stride_table = torch.tensor([t.stride(0) for t in router_logits], dtype=torch.int64, device=first.device)
    else:
        pointer_table = stride_table = None
    block_b, block_e = _block_sizes(n_sequences, n_experts)
    for launch in launches(n_sequences, n_layers, n_experts):
        _gather_router_softmax_kernel[launch.grid](
            first, pointer_table, stride_table, first.stride(0), rows, out,
            n_sequences, n_layers, n_experts, launch.offset_x, launch.offset_y,
            FROM_TABLE=from_table, BLOCK_B=block_b, BLOCK_E=block_e,
        )
    return out


@triton.jit(do_not_specialize=["layer"])
def _mean_router_softmax_kernel(
    logits,  # [N, E] one layer's router logits over the packed tokens
    row_stride,
    cu_seqlens,  # int64 [B + 1]: sequence b owns packed rows cu_seqlens[b] .. cu_seqlens[b + 1] - 1
    out,  # float32 [B, L, E]
    n_layers,
    layer,
    n_experts,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    # The segment-mean mode: one program per sequence walks its tokens BLOCK_T rows at a time, so
    # each row's softmax is summed as it is computed and no [N, E] probability tensor exists.
    sequence = tl.program_id(0).to(tl.int64)
    start = tl.load(cu_seqlens + sequence)
    end = tl.load(cu_seqlens + sequence + 1)
    experts = tl.arange(0, BLOCK_E)
    in_experts = experts < n_experts
    total = tl.zeros([BLOCK_E], dtype=tl.float32)
    for first in range(start, end, BLOCK_T):
        tokens = first + tl.arange(0, BLOCK_T)
        in_segment = tokens < end
        x = tl.load(logits + tokens[:, None] * row_stride + experts[None, :],
                    mask=in_segment[:, None] & in_experts[None, :], other=-float("inf"))
        # Rows past the segment become zeros (an all -inf row would compute NaN) and add nothing.
        x = tl.where(in_segment[:, None], x.to(tl.float32), 0.0)
        x = tl.exp(x - tl.max(x, axis=1)[:, None])
        probs = x / tl.sum(x, axis=1)[:, None]
        total += tl.sum(tl.where(in_segment[:, None], probs, 0.0), axis=0)
    mean = total / (end - start).to(tl.float32)
    tl.store(out + (sequence * n_layers + layer) * n_experts + experts, mean, mask=in_experts)


def mean_router_softmax(router_logits, cu_seqlens, out):
    """The segment-mean mode: the mean over each sequence's packed rows of the softmax over experts.

    router_logits: L tensors [N, E] (every layer routes the same N packed tokens), inner-contiguous;
    cu_seqlens: int64 [B + 1] on the same device, non-decreasing from 0 to N, every segment
    non-empty; out: contiguous float32 [B, L, E], fully overwritten."""
    n_sequences, n_layers = cu_seqlens.shape[0] - 1, len(router_logits)
    block_e = triton.next_power_of_2(router_logits[0].shape[1])
    block_t = max(1, min(64, 2048 // block_e))
    for layer, logits in enumerate(router_logits):
        # Sequences on grid axis x; more than 2**31 - 1 texts in one forward is out of reach.
        _mean_router_softmax_kernel[(n_sequences,)](
            logits, logits.stride(0), cu_seqlens, out, n_layers, layer, logits.shape[1],
            BLOCK_T=block_t, BLOCK_E=block_e,
        )
    return out
