"""Packed batches: the texts of a batch laid end to end in one row of tokens, with no padding.

Every per-token step of a decoder (projections, norms, routers, experts) then runs on real
tokens only. Rotary positions restart at each text (`position_ids`), and attention goes through
`packed_attention`, registered with transformers' AttentionInterface as "moee_packed": it reads
where each text starts from the `moee_packing` keyword, which transformers passes from the
model's forward down to every attention call, and attends causally within each text.

On CPU in fp32, attention is the C++ op torch.ops.moee_fast.packed_causal_attention
(csrc/attention.cpp), which reads the packed rows directly. Other dtypes and devices run SDPA on
a padded view of the batch (texts are length-sorted, so it is little padding): queries, keys and
values are gathered to [B, heads, T, D], one causal SDPA call computes them, and the result is
gathered back to the packed rows. With right padding, causal attention never lets a real query
see a padded key, so no mask is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

ATTENTION_NAME = "moee_packed"


@dataclass(frozen=True)
class Packing:
    """Where each text of a packed batch lies; built by `pack`, passed as `moee_packing`."""

    max_len: int
    last: torch.Tensor  # [B] packed position of each text's last token
    cu_seqlens: torch.Tensor  # [B + 1] where each text starts, then the token count (on CPU)
    pad_index: torch.Tensor  # [B * T] packed position feeding each padded slot (a text's own token)
    unpad_index: torch.Tensor  # [N] padded slot of each packed position

    @property
    def batch_size(self) -> int:
        return self.last.shape[0]


def pack(seqs: list[list[int]], device: torch.device, pin: bool = False):
    """Token id lists -> (input_ids [1, N], position_ids [1, N], Packing)."""
    lengths = torch.tensor([len(s) for s in seqs])
    width = int(lengths.max())
    ends = lengths.cumsum(0)
    starts = ends - lengths
    t = torch.arange(width)
    real = t[None, :] < lengths[:, None]
    pad_index = (starts[:, None] + torch.minimum(t[None, :], lengths[:, None] - 1)).reshape(-1)
    unpad_index = (torch.arange(len(seqs))[:, None] * width + t[None, :])[real]
    input_ids = torch.tensor([token for s in seqs for token in s]).unsqueeze(0)
    position_ids = t.expand(len(seqs), width)[real].unsqueeze(0)

    def move(x):
        return (x.pin_memory() if pin else x).to(device, non_blocking=pin)

    cu_seqlens = torch.cat([starts, ends[-1:]])
    packing = Packing(width, move(ends - 1), cu_seqlens, move(pad_index), move(unpad_index))
    return move(input_ids), move(position_ids), packing


def _to_padded(x: torch.Tensor, packing: Packing) -> torch.Tensor:
    """[1, heads, N, D] -> [B, heads, T, D]."""
    heads, _, dim = x.shape[1:]
    rows = x[0].transpose(0, 1).index_select(0, packing.pad_index)  # [B*T, heads, D]
    return rows.view(packing.batch_size, packing.max_len, heads, dim).transpose(1, 2)


def _use_cpp(query, key, value, dropout: float) -> bool:
    from .extension import cpp_applies

    return (
        cpp_applies(query, key, value)
        and dropout == 0.0
        and query.stride(-1) == key.stride(-1) == value.stride(-1) == 1
        and key.stride() == value.stride()
    )


def packed_attention(
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    moee_packing: Packing | None = None,
    **kwargs,
):
    """transformers attention function over packed texts: returns ([1, N, heads, D], None)."""
    if moee_packing is None:
        raise RuntimeError(
            f"{type(module).__name__} runs moee-fast's packed attention, which needs the `moee_packing` "
            "argument MoEEncoder passes; to call this model directly, first call "
            "model.set_attn_implementation('sdpa')"
        )
    for unsupported in ("softcap", "s_aux", "sinks"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(f"{type(module).__name__}: packed attention does not support `{unsupported}`")
    p = moee_packing
    window = sliding_window or getattr(module, "sliding_window", None)
    if _use_cpp(query, key, value, dropout):
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [N, heads, D] views
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        out = torch.ops.moee_fast.packed_causal_attention(q, k, v, p.cu_seqlens, scale, window or 0)
        return out.unsqueeze(0), None
    q, k, v = (_to_padded(x, p) for x in (query, key, value))
    mask = None
    if window is not None and p.max_len > window:
        i = torch.arange(p.max_len, device=q.device)
        distance = i[:, None] - i[None, :]
        mask = (distance >= 0) & (distance < window)  # causal, within the window
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None, scale=scaling,
        enable_gqa=k.shape[1] != q.shape[1],
    )  # [B, heads, T, D]
    out = out.transpose(1, 2).reshape(p.batch_size * p.max_len, *out.shape[1:2], out.shape[-1])
    return out.index_select(0, p.unpad_index).unsqueeze(0), None


def register() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, packed_attention)
    return ATTENTION_NAME
