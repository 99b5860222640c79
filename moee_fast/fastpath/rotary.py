"""Rotary position embedding in one pass on CPU.

The families' attention modules call their modeling module's `apply_rotary_pos_emb(q, k, cos,
sin)`, written as q * cos + rotate_half(q) * sin: six elementwise passes over q and k, about 4%
of a CPU encode. `install` wraps that function, per modeling module, so that calls made inside
an encoder forward (while a `state.ForwardState` runs) with fp32 CPU tensors take
torch.ops.moee_fast.rotary (csrc/rotary.cpp), which computes the same products and sums in the
same order and returns bitwise-equal tensors. Every other call, from any other model or outside
an encoder forward, runs the original function. A module's function is wrapped only if, on a probe input, the fused op
reproduces it exactly, so a family with another rotation (interleaved pairs, partial rotary)
keeps its own.
"""

from __future__ import annotations

import functools
import sys

import torch
from torch import nn

from ..extension import cpp_applies
from . import state
from .patching import PartReport, hold, reproduces


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


def _takes_cuda(q, k, cos, sin, args, kwargs) -> bool:
    """The packed encoder layout on CUDA: [1, heads, N, D] q and k, [1, N, D] cos and sin."""
    if args or any(key != "unsqueeze_dim" or value != 1 for key, value in kwargs.items()):
        return False
    tensors = (q, k, cos, sin)
    return (
        all(isinstance(t, torch.Tensor) and t.is_cuda and t.stride(-1) == 1 for t in tensors)
        and q.dim() == k.dim() == 4 and cos.dim() == sin.dim() == 3
        and q.shape[0] == k.shape[0] == cos.shape[0] == 1 and q.shape[-1] % 2 == 0
        and not torch.is_grad_enabled()
    )


def _wrap(original):
    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if state.current() is not None and _takes(q, k, cos, sin, args, kwargs):
            return torch.ops.moee_fast.rotary(q, k, cos, sin)
        if state.current() is not None and _takes_cuda(q, k, cos, sin, args, kwargs):
            from .. import ops

            return ops.rotary_(q, k, cos, sin)  # in place: the projections' views are not read again
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb.moee_fast_original = original
    return apply_rotary_pos_emb


def _agrees(original) -> bool:
    generator = torch.Generator().manual_seed(0)
    # [B, heads, N, D] views of [B, N, heads, D], as the attention modules pass them
    q = torch.randn(2, 5, 6, 2, 16, generator=generator)[..., 0, :].transpose(1, 2)
    k = torch.randn(2, 5, 2, 16, generator=generator).transpose(1, 2)
    cos, sin = torch.randn(2, 2, 5, 16, generator=generator).unbind(0)
    return reproduces(original, torch.ops.moee_fast.rotary, (q, k, cos, sin))


def install(model: nn.Module) -> PartReport:
    """Wrap the `apply_rotary_pos_emb` of every modeling module whose classes make up `model` and
    that the fused op reproduces (a module's function already wrapped is held, not rewrapped)."""
    report = PartReport("rotary", "C++ rotary (fp32 CPU, inside encoder forwards only)")
    if not available():
        report.skip("the C++ rotary op is not built")
        return report
    for name in sorted({type(module).__module__ for module in model.modules()}):
        namespace = sys.modules.get(name)
        function = getattr(namespace, "apply_rotary_pos_emb", None)
        if not callable(function):
            continue
        if not hasattr(function, "moee_fast_original"):
            if not _agrees(function):
                report.skip("apply_rotary_pos_emb computes another rotation (probe)", name)
                continue
            function = _wrap(function)
        report.undo.append(hold(vars(namespace), "apply_rotary_pos_emb", function))
        report.applied.append(f"{name}.apply_rotary_pos_emb")
    if not report.applied and not report.skipped:
        report.skip("no apply_rotary_pos_emb in the model's modeling modules")
    return report
