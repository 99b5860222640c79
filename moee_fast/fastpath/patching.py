"""What every fast-path part shares: its report (what it patched, with which op, what it skipped
and why, how to undo it), the check that a module can be patched at all, and process-wide
entries (transformers' registries, module globals) held while any installed model needs them."""

from __future__ import annotations

import threading
import types
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class PartReport:
    part: str
    op: str = ""
    applied: list[str] = field(default_factory=list)  # module names, or the functions rewrapped
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> module names
    undo: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def skip(self, reason: str, name: str = "") -> None:
        self.skipped.setdefault(reason, []).append(name)

    def lines(self) -> list[str]:
        """'norms      on   13: a, b, c and 10 more -> op', then one line per reason for a skip."""
        reasons = [f"{reason}{_names(names)}" for reason, names in self.skipped.items()]
        if not self.applied:
            return [f"{self.part:<10} off  " + ("; ".join(reasons) or "nothing to patch")]
        head = f"{self.part:<10} on   {len(self.applied)}: {_names(self.applied, bare=True)} -> {self.op}"
        return [head] + [f"{'':<15}skipped {reason}" for reason in reasons]


def _names(names: list[str], bare: bool = False) -> str:
    shown = [name for name in names if name]
    if not shown:
        return ""
    text = ", ".join(shown[:3]) + (f" and {len(shown) - 3} more" if len(shown) > 3 else "")
    return text if bare else f" ({text})"


def unpatchable_reason(module: nn.Module, weights: tuple[str, ...] = ("weight",)) -> str | None:
    """Why a module's forward must not be replaced, or None: its forward is already replaced (an
    accelerate hook for offload or device maps, or an earlier install), or a weight is not a plain
    floating-point Parameter in memory (bitsandbytes Params4bit/Int8Params, meta tensors)."""
    if hasattr(module, "_hf_hook") or "forward" in vars(module):
        return "forward hooked or replaced (accelerate offload or device map, or already patched)"
    for name in weights:
        weight = getattr(module, name, None)
        if type(weight) is not nn.Parameter:
            return f"{name} is a {type(weight).__name__}, not a plain Parameter (quantized)"
        if not weight.is_floating_point():
            return f"{name} is {weight.dtype} (quantized)"
        if weight.is_meta:
            return "weights on the meta device (offloaded)"
    return None


@torch.no_grad()
def reproduces(original: Callable, fused: Callable, inputs: tuple, tolerance: float = 0.0) -> bool:
    """Whether `fused(*inputs)` returns what `original(*inputs)` does: as many tensors, of the same
    shapes and dtypes, equal within `tolerance` (0: bitwise). An original that refuses the
    inputs is another function than the one the fused op reproduces."""
    try:
        expected = original(*inputs)
    except Exception:
        return False
    got = fused(*inputs)
    expected, got = (x if isinstance(x, (tuple, list)) else (x,) for x in (expected, got))
    return len(expected) == len(got) and all(_same(e, g, tolerance) for e, g in zip(expected, got))


def _same(expected, got, tolerance: float) -> bool:
    if not isinstance(expected, torch.Tensor) or expected.shape != got.shape or expected.dtype != got.dtype:
        return False
    if tolerance == 0.0:
        return torch.equal(expected, got)
    return bool(torch.allclose(got.float(), expected.float(), rtol=tolerance, atol=tolerance * 1e-3))


def replace_forward(module: nn.Module, forward: Callable) -> Callable[[], None]:
    """Bind `forward` as the module's own forward; the returned undo deletes it again."""
    module.forward = types.MethodType(forward, module)
    return lambda: vars(module).pop("forward", None)


_MISSING = object()
# (id(target), key) -> [holders, value before the first, target]; the target is kept alive so its
# id is never reused while held
_HELD: dict[tuple[int, str], list] = {}
_LOCK = threading.Lock()


def hold(target: dict, key: str, value) -> Callable[[], None]:
    """Set target[key] = value (a registry's mapping, a module's globals) while held; the last
    release puts back what was there before the first, or removes the key."""
    with _LOCK:
        slot = _HELD.setdefault((id(target), key), [0, target.get(key, _MISSING), target])
        slot[0] += 1
        target[key] = value

    def release():
        with _LOCK:
            slot[0] -= 1
            if slot[0] == 0:
                del _HELD[(id(target), key)]
                if slot[1] is _MISSING:
                    target.pop(key, None)
                else:
                    target[key] = slot[1]

    return release
