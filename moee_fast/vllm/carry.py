"""Router rows carried through a vLLM model's own forward.

vLLM compiles each model's forward (torch.compile, CUDA graphs on GPU); a value handed to the
pooler through a hook or a module attribute would not survive that. So the router rows travel
with the residual stream, which the decoder stack only hands from one layer to the next and
finally to its norm, and the norm returns them as extra channels of the hidden states the pooler
gathers:

    layer input   hidden [T, H], (residual [T, H], [rows of the MoE layers before it])
      -> the decoder layer runs on hidden and residual as vLLM wrote it
      -> its MoE block returns (out [T, H], its router scores [T, E])   (scoring function, fp32,
         from the block's own gate call where the block makes it)
    layer output  out [T, H], (residual [T, H], [rows up to this layer])
    final norm    on hidden and residual; the model returns [T, H | L*E]

The rows are never copied from layer to layer (a list grows), and the hidden states keep their
shape until the final norm joins them once. Every module keeps its class's code and its
parameter names: each one's class is swapped for a subclass that only unpacks and packs around
the original forward. The router scores are the block's own gate applied to the block's own
input, which every tensor- or expert-parallel rank holds in full, so each rank carries the rows
of all tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..loading.quantization import mixed_class


@dataclass(frozen=True)
class RowLayout:
    """Where HS and the router rows lie in the channels a MoEE model returns."""

    hidden_size: int
    num_moe_layers: int
    num_experts: int
    dtype: torch.dtype  # the model's dtype, which the carried channels share

    @property
    def rows_per_score(self) -> int:
        """Channels per fp32 score: one in fp32, a (high, low) pair in 16-bit dtypes."""
        return 1 if self.dtype == torch.float32 else 2

    def split(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, H | carried] -> HS [N, H] and RW [N, L, E], both fp32."""
        hs, carried = hidden.split([self.hidden_size, hidden.shape[-1] - self.hidden_size], dim=-1)
        width = self.num_moe_layers * self.num_experts * self.rows_per_score
        if carried.shape[-1] != width:
            raise ValueError(f"the model returned {carried.shape[-1]} router channels, expected {width} for {self}")
        scores = carried.reshape(-1, self.num_moe_layers, self.rows_per_score, self.num_experts).float()
        return hs.float(), scores.sum(dim=2)


def as_channels(scores: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 scores as channels of `dtype`. A 16-bit dtype gets each score as two values, high
    and low (high + low recovers about 16 bits of mantissa); a plain copy of the fp32 bits would
    not survive a compiler that upcasts 16-bit copies and rounds NaN patterns on the way back."""
    if dtype == torch.float32:
        return scores
    high = scores.to(dtype)
    low = (scores - high.float()).to(dtype)
    return torch.cat([high, low], dim=-1)


def _scores(logits: torch.Tensor | tuple, scoring: str) -> torch.Tensor:
    logits = logits[0] if isinstance(logits, tuple) else logits  # vLLM linears return (out, bias)
    logits = logits.float()
    return torch.sigmoid(logits) if scoring == "sigmoid" else torch.softmax(logits, dim=-1)


class KeptGate:
    """A router that leaves its scores (fp32, in the family's scoring function) in `moee_kept`
    for its block to take, so the block's one gate call gives both the routing and the rows."""

    moee_scoring: str
    moee_kept: list

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        # Scored at once: a fused-experts kernel may later write over the logits or the input.
        self.moee_kept.append(_scores(out, self.moee_scoring))
        return out


class RoutedBlock:
    """A MoE block that also returns its router scores: (out, scores [T, E] fp32)."""

    moee_scoring: str
    moee_gate_in_block: bool  # the block's own forward calls its gate (else the experts' runner does)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if not self.moee_gate_in_block:
            # The runner calls the gate, maybe inside an op compilation does not trace into: score
            # the input here, before a fused-experts kernel may write its output over it.
            scores = _scores(self.gate(hidden_states.reshape(-1, hidden_states.shape[-1])), self.moee_scoring)
            return super().forward(hidden_states, *args, **kwargs), scores
        kept = self.gate.moee_kept
        kept.clear()
        out = super().forward(hidden_states, *args, **kwargs)
        if len(kept) != 1:
            raise RuntimeError(
                f"{type(self).__name__}: its gate ran {len(kept)} times in one forward where the family's "
                "vLLM code calls it once; this vLLM version routes differently from the one the plugin knows"
            )
        return out, kept.pop()


class CarryingLayer:
    """A decoder layer whose residual comes and goes as (residual, rows so far), with its own MoE
    block's rows appended."""

    moee_routed: bool

    def forward(self, positions, hidden_states, residual, *args, **kwargs):
        residual, rows = (None, []) if residual is None else residual
        out, residual = super().forward(positions, hidden_states, residual, *args, **kwargs)
        if self.moee_routed:
            if not isinstance(out, tuple):
                raise TypeError(f"{type(self).__name__}: its MoE block's (output, router scores) did not reach the layer's output")
            out, scores = out
            rows = [*rows, scores]
        return out, (residual, rows)


class CarryingNorm:
    """The final norm; its output gets the carried rows as extra channels: [T, H | L*E]."""

    moee_dtype: torch.dtype

    def forward(self, hidden_states, residual=None):
        residual, rows = residual
        out = super().forward(hidden_states, residual)
        rows = as_channels(torch.cat(rows, dim=-1), self.moee_dtype)
        if isinstance(out, tuple):
            return torch.cat([out[0], rows], dim=-1), out[1]
        return torch.cat([out, rows], dim=-1)


def moe_block(layer: nn.Module) -> nn.Module | None:
    """The layer's MoE block: its child with a router (`gate`) and routed `experts`, else None
    (a dense layer)."""
    for child in layer.children():
        if isinstance(getattr(child, "gate", None), nn.Module) and isinstance(getattr(child, "experts", None), nn.Module):
            return child
    return None


def carry_router_rows(model: nn.Module, scoring: str, dtype: torch.dtype, gate_in_block: bool = True) -> RowLayout:
    """Swap the classes of `model`'s decoder layers, MoE blocks (and their gates) and final norm
    so its forward returns [T, H | L*E router scores]. `model` is a vLLM decoder stack (`layers`,
    `norm`); `gate_in_block`: its MoE blocks call their gate themselves (so the rows come from that
    call), rather than handing it to the experts' runner (then each block scores its input again)."""
    hidden_size = model.config.hidden_size
    layers = list(model.layers)[model.start_layer:model.end_layer]
    experts = set()
    for index, layer in enumerate(layers):
        block = moe_block(layer)
        _swap(layer, CarryingLayer, moee_routed=block is not None)
        if block is not None:
            _swap(block, RoutedBlock, moee_scoring=scoring, moee_gate_in_block=gate_in_block)
            if gate_in_block:
                _swap(block.gate, KeptGate, moee_scoring=scoring, moee_kept=[])
            experts.add(_gate_outputs(block.gate, index))
    if not experts:
        raise ValueError(f"{type(model).__name__}: no MoE block (a child with `gate` and `experts`) in any layer")
    if len(experts) > 1:
        raise ValueError(f"{type(model).__name__}: MoE layers route to different expert counts {sorted(experts)}")
    _swap(model.norm, CarryingNorm, moee_dtype=dtype)
    num_moe_layers = sum(moe_block(layer) is not None for layer in layers)
    return RowLayout(hidden_size, num_moe_layers, experts.pop(), dtype)


def _gate_outputs(gate: nn.Module, layer: int) -> int:
    size = getattr(gate, "output_size", None) or getattr(getattr(gate, "weight", None), "shape", (None,))[0]
    if not size:
        raise ValueError(f"layer {layer}: cannot tell how many experts its router scores")
    return int(size)


def _swap(module: nn.Module, mixin: type, **attributes) -> None:
    if not isinstance(module, mixin):
        cls = type(module)
        module.__class__ = mixed_class(mixin, cls, f"{mixin.__name__}{cls.__name__}")
    for name, value in attributes.items():
        setattr(module, name, value)
