"""RMSNorm modules switched to torch's fused kernel return what their own forward returns."""

import pytest
import torch
from torch import nn

from moee_fast import MoEEncoder
from moee_fast.norms import fuse_rms_norms


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
    assert fuse_rms_norms(model) == 2
    assert "forward" not in vars(model[0])
    x = torch.randn(6, 48, dtype=dtype)
    torch.testing.assert_close(model[1](x), PlainRMSNorm.forward(model[1], x), rtol=0, atol=0)
