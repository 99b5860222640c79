"""The encoder's batch format and its plans.

`pack` lays the texts of a batch end to end in one row of tokens, with no padding, and `Packing`
says where each text lies (the model's attention reads it, moee_fast/fastpath/attention.py).
`plan_batches` sorts texts by token length and fills batches up to a token budget: packed, a batch
costs its real tokens and the budget counts exactly those. Where attention takes the padded SDPA
fallback (`count_padding`), a batch costs B x its longest text instead, so padding is bounded by
construction. Sorting keeps neighbours of similar length together, which keeps that padding small.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


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


# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Packing:
    """Where each text of a packed batch lies; built by `pack`, passed as `moee_packing`. The
    padded layout's index tensors are built on first use: only the padded attention reads them."""

    max_len: int
    last: torch.Tensor  # [B] packed position of each text's last token
    cu_seqlens: torch.Tensor  # [B + 1] where each text starts, then the token count (on CPU)
    device_cu_seqlens: torch.Tensor  # cu_seqlens as int32 on the batch's device (varlen_attn)
    pin: bool = False  # host copies to the device go through pinned memory, without blocking

    @property
    def batch_size(self) -> int:
        return self.last.shape[0]

    @functools.cached_property
    def pad_index(self) -> torch.Tensor:
        """[B * T] packed position feeding each padded slot (a text's own token; slots past a
        text's end repeat its last one)."""
        starts, lengths, t = self._layout()
        return self._to_device(starts[:, None] + torch.minimum(t[None, :], lengths[:, None] - 1)).reshape(-1)

    @functools.cached_property
    def unpad_index(self) -> torch.Tensor:
        """[N] padded slot of each packed position."""
        _, lengths, t = self._layout()
        real = t[None, :] < lengths[:, None]
        return self._to_device((torch.arange(len(lengths))[:, None] * self.max_len + t[None, :])[real])

    def _layout(self):
        starts = self.cu_seqlens[:-1]
        return starts, self.cu_seqlens[1:] - starts, torch.arange(self.max_len)

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        return (x.pin_memory() if self.pin else x).to(self.last.device, non_blocking=self.pin)


def pack(seqs: list[list[int]], device: torch.device, pin: bool = False):
    """Token id lists -> (input_ids [1, N], position_ids [1, N], Packing)."""
    lengths = torch.tensor([len(s) for s in seqs])
    width = int(lengths.max())
    ends = lengths.cumsum(0)
    starts = ends - lengths
    t = torch.arange(width)
    real = t[None, :] < lengths[:, None]
    input_ids = torch.tensor([token for s in seqs for token in s]).unsqueeze(0)
    position_ids = t.expand(len(seqs), width)[real].unsqueeze(0)

    def move(x):
        return (x.pin_memory() if pin else x).to(device, non_blocking=pin)

    cu_seqlens = torch.cat([starts, ends[-1:]])
    packing = Packing(width, move(ends - 1), cu_seqlens, move(cu_seqlens.int()), pin)
    return move(input_ids), move(position_ids), packing
