"""(token, k) pairs aligned by expert into blocks of BLOCK_M rows, one expert per block.

The grouped GEMMs (moe_gemm.py) run one program per (block, column tile) and read one expert's
weights per block, so every expert's pairs are laid out contiguously and padded to a multiple of
BLOCK_M with a sentinel (the pair count, never a real pair). Sizes are bounded up front
(pairs + E * (BLOCK_M - 1) rows), so nothing waits for the device to learn them: the GEMM programs
past the real padded total read it from `padded_total` and return.

Three launches and a memset, no host synchronisation: count and rank each pair within its expert
(an atomic increment; the order of pairs inside a block does not change any result, since every
GEMM row is computed alone), then padded offsets and block experts (one program), then scatter.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _count_kernel(expert_of_pair, counts, rank_of_pair, n_pairs, BLOCK: tl.constexpr):
    pairs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = pairs < n_pairs
    expert = tl.load(expert_of_pair + pairs, mask=valid, other=0).to(tl.int32)
    rank = tl.atomic_add(counts + expert, 1, mask=valid)
    tl.store(rank_of_pair + pairs, rank, mask=valid)


@triton.jit
def _offsets_kernel(counts, padded_start, padded_total, expert_of_block, sorted_pairs, n_experts, n_pairs,
                    max_blocks, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_BLOCKS: tl.constexpr):
    experts = tl.arange(0, BLOCK_E)
    in_range = experts < n_experts
    count = tl.load(counts + experts, mask=in_range, other=0)
    padded = (count + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end = tl.cumsum(padded, axis=0)
    start = end - padded
    tl.store(padded_start + experts, start, mask=in_range)
    tl.store(padded_total, tl.sum(padded, axis=0))
    # Padding slots of each expert's last block hold the sentinel n_pairs.
    slot = tl.arange(0, BLOCK_M)
    pad = in_range[:, None] & (slot[None, :] < (padded - count)[:, None])
    tl.store(sorted_pairs + (start + count)[:, None] + slot[None, :], tl.full((BLOCK_E, BLOCK_M), 0, tl.int32) + n_pairs,
             mask=pad)
    # A block's expert: how many experts end at or before its first row (E past the padded total).
    for first in range(0, max_blocks, BLOCK_BLOCKS):
        blocks = first + tl.arange(0, BLOCK_BLOCKS)
        ended = (end[None, :] <= (blocks * BLOCK_M)[:, None]) & in_range[None, :]
        tl.store(expert_of_block + blocks, tl.sum(ended.to(tl.int32), axis=1), mask=blocks < max_blocks)


@triton.jit
def _scatter_kernel(expert_of_pair, rank_of_pair, padded_start, sorted_pairs, n_pairs, BLOCK: tl.constexpr):
    pairs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = pairs < n_pairs
    expert = tl.load(expert_of_pair + pairs, mask=valid, other=0).to(tl.int32)
    rank = tl.load(rank_of_pair + pairs, mask=valid, other=0)
    start = tl.load(padded_start + expert, mask=valid, other=0)
    tl.store(sorted_pairs + start + rank, pairs, mask=valid)


def max_padded_rows(n_pairs: int, n_experts: int, block_m: int) -> int:
    """Rows the aligned layout can need at most: every expert may leave BLOCK_M - 1 slots empty."""
    return triton.cdiv(n_pairs + n_experts * (block_m - 1), block_m) * block_m


def moe_align(top_k_index: torch.Tensor, n_experts: int, block_m: int):
    """top_k_index: integer [T, k] expert ids in [0, n_experts). Returns (sorted_pairs int32
    [max rows]: pair t * k + j per row, n_pairs in padding; expert_of_block int32 [max rows /
    BLOCK_M]: its expert, n_experts past the end; padded_total int32 [1]). Rows past padded_total
    are never written and never read."""
    device, n_pairs = top_k_index.device, top_k_index.numel()
    expert_of_pair = top_k_index.reshape(-1)
    rows = max_padded_rows(n_pairs, n_experts, block_m)
    counts = torch.zeros(n_experts, dtype=torch.int32, device=device)
    rank_of_pair = torch.empty(n_pairs, dtype=torch.int32, device=device)
    padded_start = torch.empty(n_experts, dtype=torch.int32, device=device)
    padded_total = torch.empty(1, dtype=torch.int32, device=device)
    sorted_pairs = torch.empty(rows, dtype=torch.int32, device=device)
    expert_of_block = torch.empty(rows // block_m, dtype=torch.int32, device=device)
    block = 1024
    grid = (triton.cdiv(max(n_pairs, 1), block),)
    _count_kernel[grid](expert_of_pair, counts, rank_of_pair, n_pairs, BLOCK=block)
    _offsets_kernel[(1,)](counts, padded_start, padded_total, expert_of_block, sorted_pairs, n_experts, n_pairs,
                          rows // block_m, BLOCK_M=block_m, BLOCK_E=triton.next_power_of_2(n_experts),
                          BLOCK_BLOCKS=max(16, 4096 // triton.next_power_of_2(n_experts)), num_warps=8)
    _scatter_kernel[grid](expert_of_pair, rank_of_pair, padded_start, sorted_pairs, n_pairs, BLOCK=block)
    return sorted_pairs, expert_of_block, padded_total
