"""Routed experts in 4 and 8 bits (moee_fast.loading.quantization.experts): each expert matrix stored exactly
as bitsandbytes' own per-matrix parameter (Params4bit / Int8Params) holds it, and dequantized to
what an independent float64 decoding of those bytes gives."""

import pytest
import torch

from conftest import assert_slot_is_bitsandbytes_own, decode_reference, expected_quantized_bytes
from moee_fast.loading.quantization.experts import QuantizedExperts, QuantizedMatrices, make_quantized, quantized_nbytes

bnb = pytest.importorskip("bitsandbytes", reason="the quantized path needs pip install moee-fast[quant]")

METHODS = ["nf4", "int8"]


def dequantize_reference(matrices: QuantizedMatrices, index: int) -> torch.Tensor:
    """Slot `index` decoded in float64 from its stored bytes and statistics (conftest's decoder)."""
    if matrices.method == "int8":
        return decode_reference(matrices.data[index], matrices.scale[index])
    return decode_reference(matrices.data[index], matrices.quant_state(index, torch.float32))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(40, 72), (40, 48), (64, 32), (7, 9)])
def test_each_slot_is_what_bitsandbytes_stores(method, shape):
    torch.manual_seed(sum(shape))
    weights = torch.randn(3, *shape) * torch.tensor([0.02, 1.0, 30.0])[:, None, None]  # spread scales per slot
    matrices = QuantizedMatrices(3, *shape, method=method)
    for index in range(3):
        matrices.store(index, weights[index])
    for index in range(3):
        assert_slot_is_bitsandbytes_own(matrices, index, weights[index])
        reference = dequantize_reference(matrices, index)
        got = matrices.dequantize(index, torch.float32)
        assert got.dtype == torch.float32 and got.shape == shape
        assert torch.allclose(got.double(), reference, rtol=1e-6, atol=1e-7 * reference.abs().max().item())
        step = (weights[index].double() - reference).abs().max() / weights[index].abs().max()
        assert 0 < step < (0.2 if method == "nf4" else 0.01)  # quantized, and to the expected grain
    assert torch.isfinite(matrices.dequantize(2, torch.bfloat16).float()).all()


def test_wrong_shape_names_the_expert():
    matrices = QuantizedMatrices(4, 8, 64, method="nf4")
    with pytest.raises(ValueError, match=r"expert 2: weight of shape \(64, 8\), expected \(8, 64\)"):
        matrices.store(2, torch.randn(64, 8))


def test_experts_without_weights_refuse_to_run():
    module = _Experts(4, 16, 8)
    make_quantized(module, "nf4")
    module.store_stacked("down_proj", torch.randn(4, 16, 8))
    with pytest.raises(ValueError, match="no weights were loaded for gate, up"):
        module(torch.randn(3, 16), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1))


class _Experts(torch.nn.Module):
    """transformers' stacked experts layout with its eager per-expert forward, for the module tests."""

    def __init__(self, experts: int, hidden: int, inter: int):
        super().__init__()
        self.num_experts = experts
        self.gate_up_proj = torch.nn.Parameter(torch.randn(experts, 2 * inter, hidden) / hidden**0.5)
        self.down_proj = torch.nn.Parameter(torch.randn(experts, hidden, inter) / inter**0.5)
        self.act_fn = torch.nn.functional.silu

    def _apply_gate(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for expert in range(self.num_experts):
            token, slot = torch.where(top_k_index == expert)
            h = self._apply_gate(hidden_states[token] @ self.gate_up_proj[expert].T) @ self.down_proj[expert].T
            out.index_add_(0, token, h * top_k_weights[token, slot, None])
        return out


@pytest.mark.parametrize("method", METHODS)
def test_quantized_experts_forward_equals_eager_on_decoded_weights(method):
    torch.manual_seed(7)
    experts, hidden, inter, tokens = 6, 48, 40, 37
    module = _Experts(experts, hidden, inter)
    stacked = {name: p.detach().clone() for name, p in module.named_parameters()}
    make_quantized(module, method)
    for name, tensor in stacked.items():
        module.store_stacked(name, tensor)
    assert isinstance(module, QuantizedExperts) and not list(module.parameters())  # the stacked tensors are gone
    for expert in range(experts):
        assert_slot_is_bitsandbytes_own(module.gate, expert, stacked["gate_up_proj"][expert, :inter])
        assert_slot_is_bitsandbytes_own(module.up, expert, stacked["gate_up_proj"][expert, inter:])
        assert_slot_is_bitsandbytes_own(module.down, expert, stacked["down_proj"][expert])

    reference = _Experts(experts, hidden, inter).double()
    with torch.no_grad():
        for expert in range(experts):
            gate_up = torch.cat([dequantize_reference(module.gate, expert), dequantize_reference(module.up, expert)])
            reference.gate_up_proj[expert] = gate_up
            reference.down_proj[expert] = dequantize_reference(module.down, expert)
    hidden_states = torch.randn(tokens, hidden)
    top_k_index = torch.stack([torch.randperm(experts)[:2] for _ in range(tokens)])
    top_k_index[:, 0] = torch.where(top_k_index[:, 0] == 5, 0, top_k_index[:, 0])  # some expert may idle
    top_k_weights = torch.rand(tokens, 2)
    with torch.no_grad():
        got = module(hidden_states, top_k_index, top_k_weights)
        expected = reference(hidden_states.double(), top_k_index, top_k_weights.double())
        unquantized = _Experts(experts, hidden, inter)
        unquantized.load_state_dict(stacked)
        before = unquantized(hidden_states, top_k_index, top_k_weights)
    assert torch.isfinite(got).all()
    error = (got.double() - expected).norm(dim=1) / expected.norm(dim=1)
    assert error.max() < 1e-6
    assert ((before.double() - expected).norm(dim=1) / expected.norm(dim=1)).median() > 1e-3  # quantization shows


@pytest.mark.parametrize("method", METHODS)
def test_quantized_size_is_the_computed_one(method):
    experts, hidden, inter = 8, 64, 24
    module = _Experts(experts, hidden, inter)
    stacked = {name: p.detach().clone() for name, p in module.named_parameters()}
    make_quantized(module, method)
    for name, tensor in stacked.items():
        module.store_stacked(name, tensor)
    assert quantized_nbytes(module) == expected_quantized_bytes(experts, hidden, inter, method)
