"""The router tap: the forward hooks on the MoE routers that keep, inside an encoder forward,
each layer's rows at the last tokens as fp32 scores (or their mean over each text's tokens), so no
all-token router tensor outlives its layer; and hooks on the decoder layers that keep one layer's
output pooled the same way, when a forward asks for a hidden state other than the final norm's.

One set of hooks per model, however many encoders share it: each install holds that set, and
the last release removes the hooks. What a forward keeps lives in its own `Keeping`, handed to
the hooks through a context variable, so concurrent forwards never share it and an encoder on
another model never fills it.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import threading
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import ops
from . import state
from .patching import PartReport

SCORINGS = ("softmax", "sigmoid", "logits")
POOLINGS = ("last", "mean")


@dataclass
class Keeping:
    """One forward's router rows: how they are scored and pooled, which MoE layers are wanted
    (None: all), and what each layer kept so far (one [B, E] fp32 tensor per MoE layer, in layer
    order; None for a layer not wanted). hs_layer: the decoder layer whose output `hs` keeps,
    pooled by hs_pooling ([B, H] fp32), or None."""

    tap: RouterTap
    scoring: str
    pooling: str = "last"
    layers: frozenset[int] | None = None
    hs_layer: int | None = None
    hs_pooling: str = "last"
    kept: list[torch.Tensor | None] = field(default_factory=list)
    hs: torch.Tensor | None = None


_KEEPING: contextvars.ContextVar[Keeping | None] = contextvars.ContextVar("moee_fast_router_rows", default=None)


class RouterTap:
    """The hooks on one model's routers; `logits_index` picks the logits from a router's output
    when it returns a tuple."""

    def __init__(self, routers: list[nn.Module], logits_index: int, decoder_layers: list[nn.Module]):
        self.routers = list(routers)
        self.logits_index = logits_index
        self.decoder_layers = list(decoder_layers)
        self.handles = [router.register_forward_hook(self._hook) for router in self.routers]
        self.handles += [
            layer.register_forward_hook(functools.partial(self._layer_hook, index))
            for index, layer in enumerate(self.decoder_layers)
        ]

    def _current(self):
        keeping, forward = _KEEPING.get(), state.current()
        if keeping is None or keeping.tap is not self or forward is None:  # not an encoder forward on this model
            return None, None
        return keeping, forward

    def _hook(self, module, args, output):
        keeping, forward = self._current()
        if keeping is None:
            return
        if keeping.layers is not None and len(keeping.kept) not in keeping.layers:
            keeping.kept.append(None)  # a layer not asked for: nothing computed
            return
        logits = output[self.logits_index] if isinstance(output, (tuple, list)) else output
        if keeping.pooling == "mean":  # every layer routes all N packed rows (the encoder turned the trim off)
            keeping.kept.append(_mean_scores(logits, forward.cu_seqlens_on(logits.device), keeping.scoring))
            return
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

    def _layer_hook(self, index, module, args, output):
        keeping, forward = self._current()
        if keeping is None or keeping.hs_layer != index:
            return
        hidden = (output[0] if isinstance(output, (tuple, list)) else output)[0]  # [N, H], before any norm
        keeping.hs = pool_rows(hidden, forward, keeping.hs_pooling)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def pool_rows(rows: torch.Tensor, forward: state.ForwardState, pooling: str) -> torch.Tensor:
    """[B, D] fp32 of packed rows [N, D]: each text's last row, or the mean of all its rows."""
    if pooling == "mean":
        return ops.segment_mean(rows, forward.cu_seqlens_on(rows.device))
    return rows.index_select(0, forward.last_on(rows.device)).float()


def _mean_scores(logits: torch.Tensor, cu_seqlens: torch.Tensor, scoring: str) -> torch.Tensor:
    """[B, E]: the mean over each text's rows of the scored router logits [N, E]."""
    if scoring == "softmax":  # fused: each row's softmax summed as it is made
        return ops.mean_router_softmax([logits], cu_seqlens, check_segments=False)[:, 0]
    return ops.segment_mean(torch.sigmoid(logits.float()) if scoring == "sigmoid" else logits, cu_seqlens)


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
    decoder_layers = list(getattr(model, "layers", None) or [])
    with _LOCK:
        slot = _TAPS.get(id(model))
        if slot is None or slot[1].routers != list(routers) or slot[1].logits_index != logits_index:
            if slot is not None:
                raise ValueError("this model's routers are already tapped with other routers or logits position")
            slot = _TAPS[id(model)] = [0, RouterTap(routers, logits_index, decoder_layers), model]
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
def keeping(tap: RouterTap, scoring: str, pooling: str = "last", layers: frozenset[int] | None = None,
            hs_layer: int | None = None, hs_pooling: str = "last"):
    """Inside the block, `tap`'s hooks append each layer's rows to the yielded `Keeping` (and keep
    decoder layer `hs_layer`'s pooled output, if given)."""
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    if hs_layer is not None and not 0 <= hs_layer < len(tap.decoder_layers):
        raise ValueError(f"hs_layer {hs_layer} is not one of this model's {len(tap.decoder_layers)} decoder layers")
    rows = Keeping(tap, scoring, pooling, layers, hs_layer, hs_pooling)
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
