"""The C++ GEMM behind nn.Linear on CPU, against float64."""

import pytest
import torch
from torch import nn

from moee_fast import MoEEncoder
from moee_fast.fastpath import linears
from conftest import relative_error

pytestmark = pytest.mark.skipif(not linears.available(), reason="C++ linear not built (needs an AVX2 build)")


@pytest.mark.parametrize("shape", [(1, 7, 5), (37, 300, 13), (2, 5, 33, 64), (1700, 256, 768), (0, 8, 4), (3, 0, 4)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_float64(shape, bias):
    *lead, K, M = shape
    g = torch.Generator().manual_seed(K + M)
    x = torch.randn(*lead, K, generator=g)
    w = torch.randn(M, K, generator=g)
    b = torch.randn(M, generator=g) if bias else None
    y = torch.ops.moee_fast.linear(x, w, b)
    expected = x.double() @ w.double().T + (b.double() if bias else 0)
    assert y.shape == (*lead, M) and not y.isnan().any()
    if K == 0 or y.numel() == 0:
        assert torch.equal(y.double(), expected)
    else:
        assert relative_error(y.reshape(-1, M), expected.reshape(-1, M)).max() <= 1e-6


def test_a_row_does_not_depend_on_its_neighbours():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(300, 64, generator=g), torch.randn(40, 64, generator=g)
    full = torch.ops.moee_fast.linear(x, w, None)
    assert torch.equal(torch.ops.moee_fast.linear(x[5:6], w, None), full[5:6])
    assert torch.equal(torch.ops.moee_fast.linear(x[17:140], w, None), full[17:140])


def test_switched_modules_and_fallbacks():
    model = nn.Sequential(nn.Linear(8, 4), nn.Bilinear(3, 3, 2), nn.Linear(4, 4, bias=False))
    assert len(linears.install(model).applied) == 2 and "forward" not in vars(model[1])
    x = torch.randn(5, 8)
    torch.testing.assert_close(model[0](x), nn.functional.linear(x, model[0].weight, model[0].bias), rtol=1e-6, atol=1e-6)
    bf = model[0].to(torch.bfloat16)  # other dtypes, and anything needing gradients, run F.linear
    torch.testing.assert_close(bf(x.bfloat16()), nn.functional.linear(x.bfloat16(), bf.weight, bf.bias))
    model[2].weight.requires_grad_(True)
    model[2](torch.randn(2, 4)).sum().backward()
    assert model[2].weight.grad is not None


def test_refuses_bad_arguments():
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.moee_fast.linear(torch.randn(2, 4).double(), torch.randn(3, 4).double(), None)
    with pytest.raises(RuntimeError, match=r"weight must be \[out, 4\]"):
        torch.ops.moee_fast.linear(torch.randn(2, 4), torch.randn(3, 5), None)
    with pytest.raises(RuntimeError, match="bias"):
        torch.ops.moee_fast.linear(torch.randn(2, 4), torch.randn(3, 4), torch.randn(2))


def test_encoder_switches_its_linears(checkpoint):
    enc = MoEEncoder.from_pretrained(checkpoint("qwen2_moe"), device="cpu")  # q/k/v biases, dense and shared MLPs
    switched = [m for m in enc.model.modules() if type(m) is nn.Linear and "forward" in vars(m)]
    assert switched and len(switched) == sum(1 for m in enc.model.modules() if type(m) is nn.Linear)
