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
