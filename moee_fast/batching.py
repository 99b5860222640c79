"""Batch plans: sort texts by token length and fill batches up to a token budget.

Sorting keeps neighbours of similar length together, so right padding stays small; the budget
counts padded tokens (batch rows x longest row), which is what the forward actually computes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Batch:
    indices: list[int]  # positions in the caller's input order
    max_len: int

    @property
    def padded_tokens(self) -> int:
        return len(self.indices) * self.max_len


def plan_batches(lengths: list[int], token_budget: int, max_batch_size: int | None = None) -> list[Batch]:
    """Group item indices into batches, longest first, each within `token_budget` padded tokens
    (a single item longer than the budget gets a batch of its own) and `max_batch_size` rows."""
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    if max_batch_size is not None and max_batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {max_batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches, current = [], []
    for i in order:
        # Longest first: the first row of a batch fixes its padded length.
        width = lengths[current[0]] if current else lengths[i]
        full = len(current) + 1 > (max_batch_size or len(lengths)) or (len(current) + 1) * width > token_budget
        if current and full:
            batches.append(Batch(current, lengths[current[0]]))
            current = []
        current.append(i)
    if current:
        batches.append(Batch(current, lengths[current[0]]))
    return batches
