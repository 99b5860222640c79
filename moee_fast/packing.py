"""Batch plans: sort texts by token length and fill batches up to a token budget.

Batches run packed (moee_fast/fastpath/attention.py): texts end to end, no padding, so a batch
costs its real tokens and the budget counts exactly those. Where attention takes the padded SDPA
fallback (`count_padding`), a batch costs B x its longest text instead, so padding is bounded by
construction. Sorting keeps neighbours of similar length together, which keeps that padding small.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Batch:
    indices: list[int]  # positions in the caller's input order
    tokens: int  # the texts' total token count
    slots: int = 0  # B x the longest text: what a padded attention computes

    def cost(self, count_padding: bool) -> int:
        return self.slots if count_padding else self.tokens


def plan_batches(
    lengths: list[int], token_budget: int, max_batch_size: int | None = None, count_padding: bool = False
) -> list[Batch]:
    """Group item indices into batches, longest first, each costing at most `token_budget` (real
    tokens, or B x longest with `count_padding`; a single item over the budget gets a batch of its
    own) and holding at most `max_batch_size` rows."""
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    if max_batch_size is not None and max_batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {max_batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches, current, tokens = [], [], 0
    for i in order:
        # Longest first: the batch's first item is its longest, whatever is added after it.
        cost = (len(current) + 1) * lengths[current[0] if current else i] if count_padding else tokens + lengths[i]
        full = len(current) + 1 > (max_batch_size or len(lengths)) or cost > token_budget
        if current and full:
            batches.append(_batch(current, tokens, lengths))
            current, tokens = [], 0
        current.append(i)
        tokens += lengths[i]
    if current:
        batches.append(_batch(current, tokens, lengths))
    return batches


def _batch(indices: list[int], tokens: int, lengths: list[int]) -> Batch:
    return Batch(indices, tokens, len(indices) * lengths[indices[0]])
