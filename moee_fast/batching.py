"""Batch plans: sort texts by token length and fill batches up to a token budget.

Batches run packed (moee_fast/packing.py): texts end to end, no padding, so a batch costs its real
tokens and the budget counts exactly those. Sorting still helps: the attention fallback for
non-fp32 or GPU tensors pads to the batch's longest text, and neighbours of similar length keep
that small.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Batch:
    indices: list[int]  # positions in the caller's input order
    tokens: int  # the texts' total token count


def plan_batches(lengths: list[int], token_budget: int, max_batch_size: int | None = None) -> list[Batch]:
    """Group item indices into batches, longest first, each within `token_budget` tokens (a single
    item longer than the budget gets a batch of its own) and `max_batch_size` rows."""
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    if max_batch_size is not None and max_batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {max_batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches, current, tokens = [], [], 0
    for i in order:
        full = len(current) + 1 > (max_batch_size or len(lengths)) or tokens + lengths[i] > token_budget
        if current and full:
            batches.append(Batch(current, tokens))
            current, tokens = [], 0
        current.append(i)
        tokens += lengths[i]
    if current:
        batches.append(Batch(current, tokens))
    return batches
