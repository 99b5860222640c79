"""The fast path: everything that patches a transformers model to encode faster, behind one
entry point.

    handle = install(model, parts="all")   # or "none", or a set such as {"attention", "experts"}
    print(handle)                          # which modules each part patched, with which op, and why
                                           # a part or a module was skipped
    handle.remove()                        # the model, transformers' registries and module
                                           # globals exactly as they were

Parts, one file each: `attention` (packed texts, attention.py), `experts` (experts.py, CPU),
`fused_experts` (fused_experts.py, CUDA), `quantized_experts` (quantized_experts.py, CUDA),
`norms` (norms.py), `linears` (linears.py; the routers' GEMMs too), `rotary` (rotary.py), `trim` (the last layer on the
last tokens, trim.py). Given the MoE routers, `install` also holds the router tap
(router_tap.py), the hooks that keep each layer's last-token router rows; it is not optional, as
RW needs it. Each part admits a module only where a probe or a type check shows it reproduces
the original, and skips quantized weights (quantized_experts excepted), meta weights and modules
accelerate has hooked. The hooks read the per-forward state in state.py.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from . import attention, experts, fused_experts, linears, norms, quantized_experts, rotary, router_tap, state, trim
from .patching import PartReport

_INSTALLERS = {
    "attention": attention.install,
    "experts": experts.install,
    "fused_experts": fused_experts.install,  # the experts on CUDA
    "quantized_experts": quantized_experts.install,  # quantized experts on CUDA
    "norms": norms.install,
    "linears": linears.install,
    "rotary": rotary.install,
    "trim": trim.install,
}
PARTS = tuple(_INSTALLERS)


def resolve_parts(parts: str | Iterable[str]) -> tuple[str, ...]:
    """"all", "none", or an iterable of part names -> the requested parts, in PARTS order."""
    if isinstance(parts, str):
        if parts in ("all", "none"):
            return PARTS if parts == "all" else ()
        parts = (parts,)
    try:
        requested = set(parts)
    except TypeError:
        raise TypeError(f"fast_path must be 'all', 'none' or a set of parts, got {type(parts).__name__}") from None
    unknown = sorted(str(p) for p in requested - set(PARTS))
    if unknown:
        raise ValueError(f"unknown fast-path part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}, 'all' or 'none'")
    return tuple(p for p in PARTS if p in requested)


class FastPathHandle:
    """What `install` applied to a model; `remove()` undoes it."""

    def __init__(self, model: nn.Module, reports: list[PartReport]):
        self.model_name = type(model).__name__
        self.reports = reports
        self.router_tap: router_tap.RouterTap | None = None
        self.removed = False

    @property
    def parts(self) -> frozenset[str]:
        """The optional parts active now (applied to at least one module, and not removed)."""
        return frozenset() if self.removed else frozenset(r.part for r in self.reports if r.applied and r.part in PARTS)

    def remove(self) -> None:
        """Undo every part, last installed first; calling it again does nothing."""
        if self.removed:
            return
        for report in reversed(self.reports):
            for undo in reversed(report.undo):
                undo()
        self.removed = True

    def __str__(self) -> str:
        if self.removed:
            return f"fast path on {self.model_name}: removed"
        lines = [f"fast path on {self.model_name}: {', '.join(sorted(self.parts, key=PARTS.index)) or 'none'}"]
        lines += ["  " + line for report in self.reports for line in report.lines()]
        return "\n".join(lines)

    __repr__ = __str__


def install(
    model: nn.Module, parts: str | Iterable[str] = "all", routers: list[nn.Module] | None = None, logits_index: int = 0,
) -> FastPathHandle:
    """Apply each requested part where its probe or type check admits it, and with `routers`
    the router tap (`logits_index`: where a router's tuple output holds its logits); see the
    module docstring."""
    requested = resolve_parts(parts)
    handle = FastPathHandle(model, [])
    try:
        if routers is not None:
            report, handle.router_tap = router_tap.install(model, routers, logits_index)
            handle.reports.append(report)
        for part in PARTS:
            if part not in requested:
                handle.reports.append(_not_requested(part))
            elif part == "linears":  # the routers' GEMMs too (linears.py says why)
                handle.reports.append(linears.install(model, routers or []))
            else:
                handle.reports.append(_INSTALLERS[part](model))
    except BaseException:
        handle.remove()  # no half-installed fast path
        raise
    return handle


def _not_requested(part: str) -> PartReport:
    report = PartReport(part)
    report.skip("not requested")
    return report


__all__ = ["PARTS", "FastPathHandle", "install", "resolve_parts", "state", "attention", "router_tap"]
