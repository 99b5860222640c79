"""The last decoder layer's MLP/MoE block and the final norm on the last tokens only.

No later layer reads the other positions, so the embedding needs only each text's last row
there. Hooks gather those rows before the block and the norm; the block's output is scattered
back to the packed rows (zeros elsewhere) for the residual add, where positions other than the
last then hold values nothing reads. The hooks act only inside an encoder forward (they read its
`state.ForwardState`); any other call of the model runs in full, and so does a forward whose
mean pooling reads every token of the last layer (`ForwardState.trim` False).
"""

from __future__ import annotations

import weakref

from torch import nn

from . import state
from .patching import PartReport

_TRIMMED: weakref.WeakSet = weakref.WeakSet()  # models whose hooks are installed (never twice)


def _take_last(module, args):
    forward = state.current()
    if forward is None or not forward.trim:
        return None
    hidden = args[0]  # [1, N, H]
    return (hidden.index_select(1, forward.last_on(hidden.device)), *args[1:])


def _scatter_last(module, args, output):
    forward = state.current()
    if forward is None or not forward.trim:
        return None
    rows = output[0] if isinstance(output, tuple) else output  # [1, B, H]
    full = rows.new_zeros(1, forward.tokens, rows.shape[-1]).index_copy_(1, forward.last_on(rows.device), rows)
    return (full, *output[1:]) if isinstance(output, tuple) else full


def install(model: nn.Module) -> PartReport:
    report = PartReport("trim", "the last layer's MLP and the final norm on the last tokens only")
    norm, layers = getattr(model, "norm", None), getattr(model, "layers", None)
    if not isinstance(norm, nn.Module) or not layers:
        report.skip(f"{type(model).__name__} has no `norm` and `layers` to hook")
        return report
    if model in _TRIMMED:
        report.skip("already installed on this model")
        return report
    handles = [norm.register_forward_pre_hook(_take_last)]
    report.applied.append("norm")
    last_mlp = getattr(layers[-1], "mlp", None)
    if last_mlp is not None:
        handles += [last_mlp.register_forward_pre_hook(_take_last), last_mlp.register_forward_hook(_scatter_last)]
        report.applied.append(f"layers.{len(layers) - 1}.mlp")
    _TRIMMED.add(model)

    def undo():
        for handle in handles:
            handle.remove()
        _TRIMMED.discard(model)

    report.undo.append(undo)
    return report
