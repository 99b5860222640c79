"""RMSNorm modules switched to torch's fused kernel return what their own forward returns."""

import pytest
import torch
from torch import nn

from moee_fast import MoEEncoder, ops
from moee_fast.fastpath import norms


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "deepseek_v2"])
def test_every_family_norm_is_fused_and_exact(checkpoint, family):
    enc = MoEEncoder.from_pretrained(checkpoint(family), device="cpu")
    norms = [m for m in enc.model.modules() if type(m).__name__.endswith("RMSNorm")]
    assert norms and all("forward" in vars(m) for m in norms)
    g = torch.Generator().manual_seed(1)
    for module in norms:
        x = torch.randn(3, 7, module.weight.shape[0], generator=g) * 5
        torch.testing.assert_close(module.forward(x), type(module).forward(module, x), rtol=1e-6, atol=1e-7)


class OffsetRMSNorm(nn.Module):  # Gemma's form: scale by (1 + weight)
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim))
        self.variance_epsilon = 1e-6

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * (1 + self.weight)).to(x.dtype)


class PlainRMSNorm(OffsetRMSNorm):
    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_only_matching_formulas_are_switched(dtype):
    model = nn.Sequential(OffsetRMSNorm(48), PlainRMSNorm(48), PlainRMSNorm(40)).to(dtype)
    assert len(norms.install(model).applied) == 2
    assert "forward" not in vars(model[0])
    x = torch.randn(6, 48, dtype=dtype)
    torch.testing.assert_close(model[1](x), PlainRMSNorm.forward(model[1], x), rtol=0, atol=0)


needs_cpp = pytest.mark.skipif("cpp" not in ops.available_backends(), reason="C++ extension not built")


@needs_cpp
@pytest.mark.parametrize("shape", [(0, 16), (1, 1), (5, 7), (3, 11, 37), (9, 2048)])
def test_cpp_rms_norm_matches_float64(shape):
    g = torch.Generator().manual_seed(shape[-1])
    x = torch.randn(*shape, generator=g) * torch.logspace(-3, 2, shape[-2] if len(shape) > 1 else 1)[..., None]
    w = torch.randn(shape[-1], generator=g)
    y = torch.ops.moee_fast.rms_norm(x, w, 1e-6)
    x64 = x.double()
    expected = w.double() * (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6))
    assert y.shape == x.shape and not y.isnan().any()
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-6)
    strided = x.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, another layout
    torch.testing.assert_close(torch.ops.moee_fast.rms_norm(strided, w, 1e-6), y, rtol=1e-6, atol=1e-7)


@needs_cpp
def test_cpp_rms_norm_refuses_bad_arguments():
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.moee_fast.rms_norm(torch.randn(2, 4).double(), torch.randn(4).double(), 1e-6)
    with pytest.raises(RuntimeError, match=r"weight must be \[4\]"):
        torch.ops.moee_fast.rms_norm(torch.randn(2, 4), torch.randn(5), 1e-6)


@needs_cpp
@pytest.mark.parametrize("shape", [(0, 16), (1, 1), (5, 7), (3, 11, 37), (1, 13, 256), (9, 2048)])
def test_cpp_add_rms_norm_matches_float64(shape):
    g = torch.Generator().manual_seed(7 + shape[-1])
    scale = torch.logspace(-3, 2, shape[-2] if len(shape) > 1 else 1)[..., None]
    x, residual = torch.randn(*shape, generator=g) * scale, torch.randn(*shape, generator=g) * scale
    w = torch.randn(shape[-1], generator=g)
    expected_sum = (x.double() + residual.double()).float()  # one correctly rounded add per element
    unfused = torch.ops.moee_fast.rms_norm(residual + x, w, 1e-6)
    y = torch.ops.moee_fast.add_rms_norm(x, residual, w, 1e-6)
    assert torch.equal(x, expected_sum)  # written in place, every element
    assert y.shape == x.shape and not y.isnan().any()
    assert torch.equal(y, unfused)  # the same bits as the add, then the norm
    s64 = expected_sum.double()
    torch.testing.assert_close(y.double(), w.double() * (s64 * torch.rsqrt(s64.pow(2).mean(-1, keepdim=True) + 1e-6)),
                               rtol=1e-5, atol=1e-6)


@needs_cpp
def test_cpp_add_rms_norm_refuses_bad_arguments():
    x = torch.randn(3, 8)
    with pytest.raises(RuntimeError, match=r"residual must be a float32 CPU tensor of x's shape \[3, 8\]"):
        torch.ops.moee_fast.add_rms_norm(x, torch.randn(3, 7), torch.randn(8), 1e-6)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.moee_fast.add_rms_norm(torch.randn(8, 3).t(), torch.randn(3, 8), torch.randn(8), 1e-6)
    with pytest.raises(RuntimeError, match=r"weight must be \[8\]"):
        torch.ops.moee_fast.add_rms_norm(x, torch.randn(3, 8), torch.randn(5), 1e-6)
    before = x.clone()
    with pytest.raises(RuntimeError, match="single memory location"):
        torch.ops.moee_fast.add_rms_norm(x[1:], x[:-1], torch.randn(8), 1e-6)
    assert torch.equal(x, before)  # refused before anything was written


@needs_cpp
@pytest.mark.parametrize("family", ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "deepseek_v2"])
def test_pre_norm_layers_fuse_the_residual_add_bitwise(checkpoint, family):
    enc = MoEEncoder.from_pretrained(checkpoint(family), device="cpu")
    layers = [m for m in enc.model.modules() if "forward" in vars(m) and hasattr(m, "post_attention_layernorm")]
    assert layers and all(vars(m)["forward"].__func__ is norms._fused_layer_forward for m in layers)
    texts = ["a short one", "the model routes every token to a few experts " * 9, "x"]
    fused = enc.encode(texts)
    for layer in layers:
        del layer.forward  # back to the class's own forward; every other part stays
    plain = enc.encode(texts)
    assert not fused.hs.isnan().any() and not fused.rw.isnan().any()
    assert torch.equal(fused.hs, plain.hs) and torch.equal(fused.rw, plain.rw)


class _Block(nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.self_attn = _Attention(dim, dim)
        self.input_layernorm, self.post_attention_layernorm = PlainRMSNorm(dim), PlainRMSNorm(dim)
        self.mlp = nn.Linear(dim, dim)

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask, **kwargs)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = residual + hidden_states
        return hidden_states


class _Attention(nn.Linear):
    def forward(self, hidden_states, attention_mask=None, **kwargs):
        return super().forward(hidden_states) * (1.0 if attention_mask is None else attention_mask), None


class _SandwichBlock(_Block):  # a norm after the MLP too: another layer, left alone
    def forward(self, hidden_states, attention_mask=None, **kwargs):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask, **kwargs)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.input_layernorm(self.mlp(hidden_states))
        hidden_states = residual + hidden_states
        return hidden_states


class _DroppedArgumentBlock(_Block):  # attention_mask not passed on: **kwargs alone would change it
    def forward(self, hidden_states, attention_mask=None, **kwargs):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(hidden_states=hidden_states, **kwargs)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = residual + hidden_states
        return hidden_states


def test_only_standard_pre_norm_layers_fuse_the_residual_add():
    torch.manual_seed(0)
    model = nn.Sequential(_Block(), _SandwichBlock(), _DroppedArgumentBlock())
    report = norms.install(model)
    assert [name for name in report.applied if "residual" in name] == ["0 (residual add)"]
    assert sum(len(names) for reason, names in report.skipped.items() if "pre-norm" in reason) == 2
    x, mask = torch.randn(5, 16), torch.randn(5, 1)
    with torch.no_grad():
        for block in model:
            expected = type(block).forward(block, x.clone(), attention_mask=mask)
            assert torch.equal(block(x.clone(), attention_mask=mask), expected)
            assert torch.equal(block(x.clone(), mask), expected)  # positional: the class's own forward
