"""The router tap: the forward hooks on the MoE routers that keep, inside an encoder forward,
each layer's rows at the last tokens as fp32 scores, so no all-token router tensor outlives its
layer.

One set of hooks per model, however many encoders share it: each install holds that set, and
the last release removes the hooks. What a forward keeps lives in its own `Keeping`, handed to
the hooks through a context variable, so concurrent forwards never share it and an encoder on
another model never fills it.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import ops
from . import state
from .patching import PartReport

SCORINGS = ("softmax", "sigmoid", "logits")


@dataclass
class Keeping:
    """One forward's router rows: how they are scored and what each layer kept so far
    (one [B, E] fp32 tensor per MoE layer, in layer order)."""

    tap: RouterTap
    scoring: str
    kept: list[torch.Tensor] = field(default_factory=list)


_KEEPING: contextvars.ContextVar[Keeping | None] = contextvars.ContextVar("moee_fast_router_rows", default=None)


class RouterTap:
    """The hooks on one model's routers; `logits_index` picks the logits from a router's output
    when it returns a tuple."""

    def __init__(self, routers: list[nn.Module], logits_index: int):
        self.routers = list(routers)
        self.logits_index = logits_index
        self.handles = [router.register_forward_hook(self._hook) for router in self.routers]

    def _hook(self, module, args, output):
        keeping, forward = _KEEPING.get(), state.current()
        if keeping is None or keeping.tap is not self or forward is None:  # not an encoder forward on this model
            return
        logits = output[self.logits_index] if isinstance(output, (tuple, list)) else output
        # A trimmed last layer routes only the B last tokens; every other layer routes N rows.
        if logits.shape[0] == forward.batch_size:
            rows = torch.arange(forward.batch_size, device=logits.device)
        else:
            rows = forward.last_on(logits.device)  # each router's own device under a device_map
        if keeping.scoring == "softmax":
            keeping.kept.append(ops.gather_router_softmax([logits], rows, check_rows=False)[:, 0])
        elif keeping.scoring == "sigmoid":
            keeping.kept.append(torch.sigmoid(logits.index_select(0, rows).float()))
        else:  # "logits": the raw router scores
            keeping.kept.append(logits.index_select(0, rows).float())

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


# id(model) -> [holders, tap, model]; the model is kept alive so its id is never reused while held
_TAPS: dict[int, list] = {}
_LOCK = threading.Lock()


def install(model: nn.Module, routers: list[nn.Module], logits_index: int) -> tuple[PartReport, RouterTap]:
    """Hold the model's router hooks (installing them on the first hold); the report's undo
    releases this hold."""
    names = {id(module): name for name, module in model.named_modules()}
    report = PartReport("router_tap", "each router's last-token rows, scored in fp32")
    for router in routers:
        problem = _probe(router, logits_index)
        if problem is not None:
            raise ValueError(f"router {names.get(id(router), type(router).__name__)!r}: {problem}")
    with _LOCK:
        slot = _TAPS.get(id(model))
        if slot is None or slot[1].routers != list(routers) or slot[1].logits_index != logits_index:
            if slot is not None:
                raise ValueError("this model's routers are already tapped with other routers or logits position")
            slot = _TAPS[id(model)] = [0, RouterTap(routers, logits_index), model]
        slot[0] += 1
    report.applied = [names.get(id(router), "") for router in routers]

    def release():
        with _LOCK:
            slot[0] -= 1
            if slot[0] == 0:
                del _TAPS[id(model)]
                slot[1].remove()

    report.undo.append(release)
    return report, slot[1]


@contextlib.contextmanager
def keeping(tap: RouterTap, scoring: str):
    """Inside the block, `tap`'s hooks append each layer's rows to the yielded `Keeping`."""
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    rows = Keeping(tap, scoring)
    token = _KEEPING.set(rows)
    try:
        yield rows
    finally:
        _KEEPING.reset(token)


def _probe(router: nn.Module, logits_index: int) -> str | None:
    """Why this router's output has no [N, E] logits where the tap reads them, or None. Routers
    whose weight is not in memory (offloaded, quantized) are taken on trust."""
    weight = getattr(router, "weight", None)
    if type(weight) is not nn.Parameter or weight.is_meta or not weight.is_floating_point() or weight.dim() != 2:
        return None
    if hasattr(router, "_hf_hook"):
        return None
    try:
        with torch.no_grad():
            output = router(weight.new_zeros(2, weight.shape[1]))
    except Exception as exc:  # noqa: BLE001 - the message names the router and the cause
        return f"it refuses a [2, {weight.shape[1]}] input ({type(exc).__name__}: {exc})"
    if isinstance(output, (tuple, list)):
        if logits_index >= len(output):
            return f"its output has {len(output)} items, none at position {logits_index}"
        output = output[logits_index]
    if not isinstance(output, torch.Tensor) or output.shape != (2, weight.shape[0]):
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        return f"expected logits of shape (2, {weight.shape[0]}) for 2 rows, got {shape}"
    return None
