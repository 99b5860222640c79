"""The router rows' channel carrying (moee_fast.vllm.carry) on a small stand-in for a vLLM decoder
stack, eager and under torch.compile; this needs no vllm. The real engines: tests/test_vllm.py."""

import pytest
import torch
from torch import nn

from moee_fast.vllm.carry import RowLayout, as_channels, carry_router_rows


class Gate(nn.Linear):
    def forward(self, x):  # vLLM's linears return (output, bias)
        return super().forward(x), None


class MoE(nn.Module):
    def __init__(self, hidden, experts):
        super().__init__()
        self.gate = Gate(hidden, experts, bias=False)
        self.experts = nn.Linear(hidden, hidden)

    def forward(self, x):
        weights = torch.softmax(self.gate(x)[0], dim=-1)
        return self.experts(x) * weights[:, :1]


class Norm(nn.Module):
    def forward(self, x, residual=None):
        if residual is None:
            return torch.nn.functional.rms_norm(x, x.shape[-1:])
        x = x + residual
        return torch.nn.functional.rms_norm(x, x.shape[-1:]), x


class Layer(nn.Module):
    def __init__(self, hidden, experts, routed):
        super().__init__()
        self.norm = Norm()
        self.mlp = MoE(hidden, experts) if routed else nn.Linear(hidden, hidden)

    def forward(self, positions, hidden_states, residual):
        if residual is None:
            residual, hidden_states = hidden_states, self.norm(hidden_states)
        else:
            hidden_states, residual = self.norm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class Stack(nn.Module):
    def __init__(self, hidden=24, experts=5, routed=(True, False, True, True)):
        super().__init__()
        self.config = type("Config", (), {"hidden_size": hidden})()
        self.layers = nn.ModuleList(Layer(hidden, experts, r) for r in routed)
        self.start_layer, self.end_layer = 0, len(routed)
        self.norm = Norm()

    def forward(self, x):
        residual = None
        for layer in self.layers:
            x, residual = layer(None, x, residual)
        out, _ = self.norm(x, residual)
        return out


def expected(stack: Stack, x: torch.Tensor):
    """HS and the router softmax rows, by running the unmodified stack with forward hooks."""
    rows = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, out: rows.append(torch.softmax(out[0].float(), -1)))
             for layer in stack.layers if isinstance(layer.mlp, MoE)]
    hs = stack(x)
    for hook in hooks:
        hook.remove()
    return hs, torch.stack(rows, dim=1)


def gate_calls(stack: Stack) -> list[int]:
    """A counter of each MoE block's gate calls (by a forward pre-hook: it counts eager runs)."""
    calls = []
    for layer in stack.layers:
        if isinstance(layer.mlp, MoE):
            calls.append(0)
            index = len(calls) - 1
            layer.mlp.gate.register_forward_pre_hook(lambda *_, i=index: calls.__setitem__(i, calls[i] + 1))
    return calls


@pytest.mark.parametrize("gate_in_block", [True, False])
@pytest.mark.parametrize("compiled", [False, True])
def test_carried_rows_equal_the_routers_own(compiled, gate_in_block):
    torch.manual_seed(0)
    stack = Stack()
    x = torch.randn(11, 24)
    hs_ref, rw_ref = expected(stack, x)
    names = [name for name, _ in stack.named_parameters()]
    layout = carry_router_rows(stack, "softmax", torch.float32, gate_in_block=gate_in_block)
    assert [name for name, _ in stack.named_parameters()] == names  # weights load under the same names
    assert (layout.num_moe_layers, layout.num_experts, layout.hidden_size) == (3, 5, 24)
    run = torch.compile(stack, fullgraph=True, backend="aot_eager") if compiled else stack
    wide = run(x)
    assert wide.shape == (11, 24 + 3 * 5)
    hs, rw = layout.split(wide)
    torch.testing.assert_close(hs, hs_ref, rtol=0, atol=0)
    torch.testing.assert_close(rw, rw_ref, rtol=1e-6, atol=1e-7)
    if not compiled:  # the block's own gate call gives the rows: one router GEMM per layer, not two
        calls = gate_calls(stack)
        stack(x)
        assert calls == [1 if gate_in_block else 2] * 3


class TwiceRoutedMoE(MoE):
    def forward(self, x):
        self.gate(x)
        return super().forward(x)


def test_a_block_calling_its_gate_twice_is_refused():
    stack = Stack()
    stack.layers[0].mlp.__class__ = TwiceRoutedMoE
    carry_router_rows(stack, "softmax", torch.float32, gate_in_block=True)
    with pytest.raises(RuntimeError, match="its gate ran 2 times in one forward"):
        stack(torch.randn(3, 24))


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 0.0), (torch.bfloat16, 2e-5), (torch.float16, 1e-6)])
def test_scores_survive_16_bit_channels(dtype, tolerance):
    scores = torch.softmax(torch.randn(7, 2, 9) * 3, dim=-1)
    layout = RowLayout(hidden_size=4, num_moe_layers=2, num_experts=9, dtype=dtype)
    channels = torch.cat([as_channels(scores[:, layer], dtype) for layer in range(2)], dim=-1)
    wide = torch.cat([torch.full((7, 4), float("nan"), dtype=dtype), channels], dim=-1)
    hs, rw = layout.split(wide)
    assert hs.isnan().all() and hs.dtype == rw.dtype == torch.float32
    assert (rw - scores).abs().max().item() <= tolerance * scores.abs().max().item()


def test_a_stack_without_moe_blocks_is_refused():
    stack = Stack(routed=(False, False))
    with pytest.raises(ValueError, match="no MoE block"):
        carry_router_rows(stack, "softmax", torch.float32)


def test_wrong_channel_count_is_named():
    layout = RowLayout(hidden_size=4, num_moe_layers=2, num_experts=3, dtype=torch.float32)
    with pytest.raises(ValueError, match="returned 5 router channels, expected 6"):
        layout.split(torch.zeros(2, 9))
