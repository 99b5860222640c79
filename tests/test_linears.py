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


FAMILIES = ["olmoe", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_routers_multiply_through_the_op(checkpoint, family, monkeypatch):
    enc = MoEEncoder.from_pretrained(checkpoint(family), device="cpu")
    names = {module: name for name, module in enc.model.named_modules()}
    report = next(r for r in enc.fast_path.reports if r.part == "linears")
    assert {names[r] for r in enc.routers} <= set(report.applied)
    router, calls, real = enc.routers[0], [], torch.ops.moee_fast.linear
    monkeypatch.setattr(torch.ops.moee_fast, "linear", lambda *args: calls.append(args) or real(*args))
    x = torch.randn(13, enc.hidden_size)
    router(x)
    assert len(calls) == 1 and calls[0][1] is router.weight and calls[0][0].shape == (13, enc.hidden_size)
    enc.fast_path.remove()
    assert "forward" not in vars(router)
    router(x)
    assert len(calls) == 1  # undone: F.linear again


@pytest.mark.parametrize("family", FAMILIES)
def test_a_text_gives_the_same_bits_in_any_batch_and_thread_count(checkpoint, family):
    # A one-token text alone makes each router GEMM a single row (BLAS takes its GEMV path there,
    # with another summation order than for a block of rows); the routers' rows now depend only
    # on their own token. DeepSeek-V2's attention (values narrower than queries and keys) runs
    # SDPA on the batch padded to its longest text, so there a text agrees to fp32 rounding only.
    enc = MoEEncoder.from_pretrained(checkpoint(family), device="cpu")
    texts = ["a", "Some longer text that shares its batch with the short ones.", "b c", "Another one, longer still, with more words in it."]
    threads = torch.get_num_threads()
    try:
        together = enc.encode(texts)
        torch.set_num_threads(1)
        alone = [enc.encode([t]) for t in texts]
    finally:
        torch.set_num_threads(threads)
    for i, one in enumerate(alone):
        if family == "deepseek_v2":
            assert relative_error(one.hs, together.hs[i:i + 1]).item() <= 1e-6, texts[i]
            assert relative_error(one.rw, together.rw[i:i + 1]).item() <= 1e-6, texts[i]
        else:
            assert torch.equal(one.hs[0], together.hs[i]) and torch.equal(one.rw[0], together.rw[i]), texts[i]
