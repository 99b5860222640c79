"""Rotary position embedding in one pass on CPU.

The families' attention modules call their modeling module's `apply_rotary_pos_emb(q, k, cos,
sin)`, written as q * cos + rotate_half(q) * sin: six elementwise passes over q and k, about 4%
of a CPU encode. `install` wraps that function, per modeling module, so that calls made inside
`fused()` (MoEEncoder's forward) with fp32 CPU tensors take torch.ops.moee_fast.rotary
(csrc/rotary.cpp), which computes the same products and sums in the same order and returns
bitwise-equal tensors. Every other call, from any other model or outside `fused()`, runs the
original function. A module's function is wrapped only if, on a probe input, the fused op
reproduces it exactly, so a family with another rotation (interleaved pairs, partial rotary)
keeps its own.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import sys

import torch
from torch import nn

from .extension import cpp_applies

_FUSED = contextvars.ContextVar("moee_fast_rotary_fused", default=False)


@contextlib.contextmanager
def fused():
    """Calls to wrapped `apply_rotary_pos_emb` functions inside this block may take the C++ op."""
    token = _FUSED.set(True)
    try:
        yield
    finally:
        _FUSED.reset(token)


def available() -> bool:
    return cpp_applies() and hasattr(torch.ops.moee_fast, "rotary")


def _takes(q, k, cos, sin, args, kwargs) -> bool:
    if args or any(key != "unsqueeze_dim" or value != 1 for key, value in kwargs.items()):
        return False
    tensors = (q, k, cos, sin)
    return (
        all(isinstance(t, torch.Tensor) for t in tensors)
        and q.dim() == k.dim() == 4
        and cos.dim() == sin.dim() == 3
        and q.shape[-1] % 2 == 0
        and all(t.stride(-1) == 1 for t in tensors)
        and cpp_applies(*tensors)
    )


def _wrap(original):
    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if _FUSED.get() and _takes(q, k, cos, sin, args, kwargs):
            return torch.ops.moee_fast.rotary(q, k, cos, sin)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb.moee_fast_original = original
    return apply_rotary_pos_emb


@torch.no_grad()
def _agrees(original) -> bool:
    generator = torch.Generator().manual_seed(0)
    # [B, heads, N, D] views of [B, N, heads, D], as the attention modules pass them
    q = torch.randn(2, 5, 6, 2, 16, generator=generator)[..., 0, :].transpose(1, 2)
    k = torch.randn(2, 5, 2, 16, generator=generator).transpose(1, 2)
    cos, sin = torch.randn(2, 2, 5, 16, generator=generator).unbind(0)
    try:
        expected = original(q, k, cos, sin)
    except Exception:  # another signature: not the function this op reproduces
        return False
    got = torch.ops.moee_fast.rotary(q, k, cos, sin)
    return all(isinstance(e, torch.Tensor) and torch.equal(e, g) for e, g in zip(expected, got)) and len(expected) == 2


def install(model: nn.Module) -> int:
    """Wrap the `apply_rotary_pos_emb` of every modeling module whose classes make up `model` and
    that the fused op reproduces; returns how many modules' functions are (now) wrapped."""
    if not available():
        return 0
    wrapped = 0
    for name in sorted({type(module).__module__ for module in model.modules()}):
        namespace = sys.modules.get(name)
        function = getattr(namespace, "apply_rotary_pos_emb", None)
        if not callable(function):
            continue
        if not hasattr(function, "moee_fast_original"):
            if not _agrees(function):
                continue
            setattr(namespace, "apply_rotary_pos_emb", _wrap(function))
        wrapped += 1
    return wrapped
