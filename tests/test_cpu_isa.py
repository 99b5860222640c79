"""The C++ GEMM tiles (experts, linear, attention) on each instruction set the CPU has (AVX2, and AVX-512 where present):
each against float64, and the two bitwise equal, so the one chosen at run time never changes an
embedding."""

import pytest
import torch

from moee_fast import MoEEncoder
from moee_fast.fastpath import linears
from conftest import random_texts, relative_error
from kernel_references import ATTENTION_CASES, attention_inputs, experts_inputs, float64_attention, float64_experts

pytestmark = pytest.mark.skipif(not linears.available(), reason="C++ panel GEMMs not built (needs an x86-64 AVX2 build)")


def _has_avx512() -> bool:
    before = torch.ops.moee_fast.cpu_isa()
    try:
        torch.ops.moee_fast.cpu_isa("avx512")
        return True
    except RuntimeError:
        return False
    finally:
        torch.ops.moee_fast.cpu_isa(before)


ISAS = ["avx2", pytest.param("avx512", marks=pytest.mark.skipif(
    linears.available() and not _has_avx512(), reason="this CPU has no AVX-512: only the AVX2 kernels can run"))]


@pytest.fixture
def isa(request):
    """Run the test on one instruction set, then restore the one chosen at load."""
    before = torch.ops.moee_fast.cpu_isa()
    torch.ops.moee_fast.cpu_isa(request.param)
    yield request.param
    torch.ops.moee_fast.cpu_isa(before)


def run_on(isa_name, fn, *args):
    before = torch.ops.moee_fast.cpu_isa()
    torch.ops.moee_fast.cpu_isa(isa_name)
    try:
        return fn(*args)
    finally:
        torch.ops.moee_fast.cpu_isa(before)


# Token counts give 1..7 panels of 16 (every tail of the 3-panel AVX-512 tile) and partial panels;
# output widths that are not multiples of the 8-row tile; reductions past one 256-wide block.
EXPERT_SHAPES = [(1, 64, 32, 8, 1), (17, 40, 13, 4, 1), (35, 96, 48, 4, 2), (50, 37, 13, 4, 2),
                 (112, 300, 260, 4, 2), (333, 96, 32, 60, 8)]
LINEAR_SHAPES = [(1, 7, 5), (16, 256, 8), (33, 300, 13), (48, 64, 9), (70, 513, 31), (1700, 256, 768)]


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("shape", EXPERT_SHAPES)
def test_experts_match_float64(isa, shape):
    module, hidden, index, weights = experts_inputs(*shape, seed=3)
    out = torch.full_like(hidden, torch.nan)
    torch.ops.moee_fast.moe_experts.out(hidden, index, weights, module.gate_up_proj, module.down_proj, out=out)
    assert relative_error(out, float64_experts(module, hidden, index, weights)).max() <= 1e-5


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("shape", LINEAR_SHAPES)
def test_linear_matches_float64(isa, shape):
    n, k, m = shape
    g = torch.Generator().manual_seed(n + k + m)
    x, w, b = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g), torch.randn(m, generator=g)
    y = torch.ops.moee_fast.linear(x, w, b)
    assert not y.isnan().any()
    assert relative_error(y, x.double() @ w.double().T + b.double()).max() <= 1e-6


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("lengths,heads,kv_heads,dim,window", ATTENTION_CASES)
def test_attention_matches_float64(isa, lengths, heads, kv_heads, dim, window):
    q, k, v, cu = attention_inputs(lengths, heads, kv_heads, dim)
    out = torch.ops.moee_fast.packed_causal_attention(q, k, v, cu, 0.3, window)
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), float64_attention(q, k, v, lengths, 0.3, window), rtol=1e-5, atol=1e-5)


needs_avx512 = pytest.mark.skipif(linears.available() and not _has_avx512(), reason="this CPU has no AVX-512: nothing to compare")


@needs_avx512
@pytest.mark.parametrize("shape", EXPERT_SHAPES)
def test_experts_bitwise_equal_across_isas(shape):
    module, hidden, index, weights = experts_inputs(*shape, seed=4)
    args = (hidden, index, weights, module.gate_up_proj, module.down_proj)
    assert torch.equal(run_on("avx2", torch.ops.moee_fast.moe_experts, *args),
                       run_on("avx512", torch.ops.moee_fast.moe_experts, *args))


@needs_avx512
@pytest.mark.parametrize("shape", LINEAR_SHAPES)
def test_linear_bitwise_equal_across_isas(shape):
    n, k, m = shape
    g = torch.Generator().manual_seed(7 * n + k)
    x, w = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g)
    assert torch.equal(run_on("avx2", torch.ops.moee_fast.linear, x, w, None),
                       run_on("avx512", torch.ops.moee_fast.linear, x, w, None))


@needs_avx512
@pytest.mark.parametrize("lengths,heads,kv_heads,dim,window", ATTENTION_CASES)
def test_attention_bitwise_equal_across_isas(lengths, heads, kv_heads, dim, window):
    args = (*attention_inputs(lengths, heads, kv_heads, dim), 0.3, window)
    assert torch.equal(run_on("avx2", torch.ops.moee_fast.packed_causal_attention, *args),
                       run_on("avx512", torch.ops.moee_fast.packed_causal_attention, *args))


@needs_avx512
def test_encoder_bitwise_equal_across_isas(checkpoint):
    encoder = MoEEncoder.from_pretrained(checkpoint("mixtral"), device="cpu")
    texts = random_texts(23, seed=23, max_words=40)
    a, b = run_on("avx2", encoder.encode, texts), run_on("avx512", encoder.encode, texts)
    assert torch.equal(a.hs, b.hs) and torch.equal(a.rw, b.rw)


def test_unknown_isa_is_refused():
    with pytest.raises(RuntimeError, match="expected 'avx2' or 'avx512'"):
        torch.ops.moee_fast.cpu_isa("sse2")


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_fma_peak_is_a_finite_rate_and_refuses_bad_arguments(isa):
    # The benchmarks' ceiling: a finite positive rate for one thread and for two (no wall time is
    # asserted); bad arguments, NaN included, are refused by name.
    one = torch.ops.moee_fast.fma_peak(0.05, 1)
    two = torch.ops.moee_fast.fma_peak(0.05, 2)
    assert 0 < one < float("inf") and 0 < two < float("inf")
    for bad in ({"seconds": 0.0}, {"seconds": float("nan")}, {"seconds": 61.0}, {"threads": 0}):
        args = {"seconds": 0.05, "threads": 1, **bad}
        with pytest.raises(RuntimeError, match="fma_peak: (seconds|threads) must be"):
            torch.ops.moee_fast.fma_peak(args["seconds"], args["threads"])
