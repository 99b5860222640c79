"""Attention over packed batches (moee_fast.packing: the texts of a batch laid end to end in one
row of tokens, with no padding).

Every per-token step of a decoder (projections, norms, routers, experts) then runs on real
tokens only. Rotary positions restart at each text (`position_ids`), and attention goes through
`packed_attention`, registered with transformers' AttentionInterface as "moee_packed": it reads
where each text starts from the `moee_packing` keyword, which transformers passes from the
model's forward down to every attention call, and attends causally within each text, by one of:

- `cpp` on CPU in fp32: torch.ops.moee_fast.packed_causal_attention (csrc/attention.cpp), which
  reads the packed rows directly;
- `varlen_attention` on CUDA in fp16/bf16 with equal query and value head sizes:
  torch.nn.attention.varlen.varlen_attn (flash attention over cu_seqlens, no padding);
- `padded_attention` everywhere else: SDPA on a padded [B, heads, T, D] view. With right
  padding, causal attention never lets a real query see a padded key, so no mask is needed. Its
  cost is B x longest, so batch plans count padded slots there (`runs_padded`).

With this part off, the model keeps its own attention implementation and still gets packed
batches: transformers reads the restarting `position_ids` and builds a block-diagonal causal
mask (sliding windows included) for its eager and SDPA attention, at N x N mask cost.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..extension import cpp_applies, cpp_op
from ..packing import Packing
from .patching import PartReport, hold

ATTENTION_NAME = "moee_packed"
_VARLEN_DTYPES = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
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
            "argument MoEEncoder passes; to call this model directly, first remove the encoder's fast "
            "path (enc.fast_path.remove()) or call model.set_attn_implementation('sdpa')"
        )
    for unsupported in ("softcap", "s_aux", "sinks"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(f"{type(module).__name__}: packed attention does not support `{unsupported}`")
    window = sliding_window or getattr(module, "sliding_window", None)
    if dropout == 0.0 and _use_cpp(query, key, value):
        return _cpp_attention(query, key, value, moee_packing, scaling, window), None
    if dropout == 0.0 and varlen_applies(query, value):
        return varlen_attention(query, key, value, moee_packing, scaling, window), None
    return padded_attention(query, key, value, moee_packing, scaling, window, dropout), None


def _use_cpp(query, key, value) -> bool:
    return (
        cpp_applies(query, key, value)
        and query.stride(-1) == key.stride(-1) == value.stride(-1) == 1
        and key.stride() == value.stride()
    )


def _cpp_attention(query, key, value, packing: Packing, scale: float | None, window: int | None) -> torch.Tensor:
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [N, heads, D] views
    out = torch.ops.moee_fast.packed_causal_attention(q, k, v, packing.cu_seqlens, scale, window or 0)
    return out.unsqueeze(0)


def varlen_available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def _flash_head_dims(qk_dim: int | None, v_dim: int | None) -> bool:
    """Flash attention's head sizes: equal for queries and values, a multiple of 8, at most 256."""
    return qk_dim is not None and qk_dim == v_dim and qk_dim % 8 == 0 and qk_dim <= 256


def varlen_applies(query: torch.Tensor, value: torch.Tensor) -> bool:
    """CUDA flash attention takes fp16/bf16 tensors with head sizes it supports."""
    return (
        query.is_cuda
        and query.dtype in _VARLEN_DTYPES
        and _flash_head_dims(query.shape[-1], value.shape[-1])
        and varlen_available()
    )


def varlen_attention(query, key, value, packing: Packing, scale: float | None, window: int | None) -> torch.Tensor:
    """[1, heads, N, D] inputs -> [1, N, heads, D], each text attending causally to itself (and
    within `window` keys: distance < window, as transformers' masks count it). scale None: D^-0.5."""
    from torch.nn.attention.varlen import varlen_attn

    # [N, heads, D]: the projections' own rows (rotated in place on CUDA), already contiguous, so
    # no copy; another layout (a rotation that made new tensors) is copied here.
    q, k, v = (x[0].transpose(0, 1).contiguous() for x in (query, key, value))
    out = varlen_attn(
        q, k, v, packing.device_cu_seqlens, packing.device_cu_seqlens, packing.max_len, packing.max_len,
        scale=scale, window_size=(window - 1 if window else -1, 0), enable_gqa=k.shape[1] != q.shape[1],
        num_splits=1,  # one split: a text's result never depends on its batch neighbours
    )
    return out.unsqueeze(0)


def padded_attention(query, key, value, packing: Packing, scale: float | None, window: int | None, dropout: float = 0.0):
    """[1, heads, N, D] inputs -> [1, N, heads, D] through SDPA on a padded [B, heads, T, D] view.
    scale None: SDPA's default, D^-0.5."""
    q, k, v = (_to_padded(x, packing) for x in (query, key, value))
    mask = None
    if window is not None and packing.max_len > window:
        i = torch.arange(packing.max_len, device=q.device)
        distance = i[:, None] - i[None, :]
        mask = (distance >= 0) & (distance < window)  # causal, within the window
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None, scale=scale,
        enable_gqa=k.shape[1] != q.shape[1],
    )  # [B, heads, T, D]
    out = out.transpose(1, 2).reshape(packing.batch_size * packing.max_len, *out.shape[1:2], out.shape[-1])
    return out.index_select(0, packing.unpad_index).unsqueeze(0)


def _to_padded(x: torch.Tensor, packing: Packing) -> torch.Tensor:
    """[1, heads, N, D] -> [B, heads, T, D]."""
    heads, _, dim = x.shape[1:]
    rows = x[0].transpose(0, 1).index_select(0, packing.pad_index)  # [B*T, heads, D]
    return rows.view(packing.batch_size, packing.max_len, heads, dim).transpose(1, 2)


# --------------------------------------------------------------------------------------------
def runs_padded(model: nn.Module, device: torch.device) -> bool:
    """Whether this model's packed attention, computing on `device`, takes the padded SDPA
    fallback, whose cost is B x longest slots: batch plans must then count padding."""
    dtype = next(model.parameters()).dtype
    if device.type == "cpu" and dtype == torch.float32 and cpp_op("packed_causal_attention"):
        return False
    config = model.config
    qk_dim = getattr(config, "qk_head_dim", None) or getattr(config, "head_dim", None)
    if qk_dim is None and getattr(config, "num_attention_heads", None):
        qk_dim = config.hidden_size // config.num_attention_heads
    v_dim = getattr(config, "v_head_dim", None) or qk_dim
    flash = device.type == "cuda" and dtype in _VARLEN_DTYPES and varlen_available()
    return not (flash and _flash_head_dims(qk_dim, v_dim))


def install(model: nn.Module) -> PartReport:
    """Run the model's attention as `packed_attention` (registered as "moee_packed")."""
    from transformers import AttentionInterface

    report = PartReport("attention", f"{ATTENTION_NAME} (C++ on fp32 CPU, varlen_attn on CUDA fp16/bf16, else padded SDPA)")
    before = getattr(model.config, "_attn_implementation", None)
    if not hasattr(model, "set_attn_implementation"):
        report.skip(f"{type(model).__name__} has no set_attn_implementation")
        return report
    report.undo.append(hold(AttentionInterface._global_mapping, ATTENTION_NAME, packed_attention))
    model.set_attn_implementation(ATTENTION_NAME)
    report.undo.append(lambda: model.set_attn_implementation(before))
    report.applied.append("every attention layer")
    return report
