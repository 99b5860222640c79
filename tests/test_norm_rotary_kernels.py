"""The fused RMSNorm (+ residual) and in-place rotary Triton kernels under the interpreter against
float64 torch, on odd widths and strided views, each dtype, outputs NaN-poisoned first."""

import os

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs on CPU tensors in the interpreter")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}  # relative, per element scale


def gen():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def module_rms_norm(x, weight, eps):
    """The families' RMSNorm forward, as transformers writes it."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [40, 2048, 4100])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_equals_float64_and_the_modules_rounding(dtype, width, with_residual):
    from moee_fast.kernels.rms_norm import rms_norm

    g = gen()
    rows = 7
    x = (torch.randn(rows, width + 3, generator=g) * torch.logspace(-3, 2, rows)[:, None]).to(dtype)[:, :width]  # strided
    residual = torch.randn(rows, width, generator=g).to(dtype) if with_residual else None
    weight = (1 + 0.1 * torch.randn(width, generator=g)).to(dtype)
    out = torch.full((rows, width), float("nan"), dtype=dtype)
    residual_out = torch.full((rows, width), float("nan"), dtype=dtype) if with_residual else None
    rms_norm(x, weight, 1e-6, out, residual, residual_out)
    stream = x if residual is None else (x + residual)
    if with_residual:  # equal, but for the interpreter's fp32 -> bf16 cast, which truncates (the GPU rounds)
        ulp = 2.0**-7 if dtype == torch.bfloat16 else 0.0
        torch.testing.assert_close(residual_out, stream, rtol=ulp, atol=0.0)
    x64 = stream.double()
    expected = weight.double() * x64 / x64.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    assert not out.isnan().any()
    assert ((out.double() - expected).abs() / expected.abs().amax(-1, keepdim=True)).max() <= TOLERANCE[dtype]
    module = module_rms_norm(stream, weight, 1e-6)
    assert (out.double() - module.double()).abs().max() <= (0 if dtype == torch.float32 else 1) * module.double().abs().max() * TOLERANCE[dtype] + 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("heads", "dim"), [(3, 16), (16, 128), (5, 64)])
def test_rotary_in_place_equals_float64_on_transposed_views(dtype, heads, dim):
    from moee_fast.kernels.rotary import rotary_

    g = gen()
    tokens = 11
    base = torch.randn(1, heads, tokens, dim, generator=g).to(dtype)  # as projections are viewed: [1, heads, N, D]
    x = base[0].transpose(0, 1)  # [N, heads, D], not contiguous
    angles = torch.randn(tokens, dim // 2, generator=g) * 3
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(dtype), torch.cat([angles.sin()] * 2, -1).to(dtype)
    x64 = x.double()
    rotated = torch.cat([-x64[..., dim // 2 :], x64[..., : dim // 2]], -1)
    expected = x64 * cos.double()[:, None] + rotated * sin.double()[:, None]
    assert rotary_(x, cos, sin) is x
    assert not base.isnan().any()
    assert (x.double() - expected).abs().max() <= TOLERANCE[dtype] * expected.abs().max()


def test_ops_dispatch_the_packed_layout_and_refuse_bad_shapes_by_name():
    from moee_fast import ops

    g = gen()
    x, residual = (torch.randn(1, 9, 40, generator=g).to(torch.bfloat16) for _ in range(2))
    weight = torch.ones(40, dtype=torch.bfloat16)
    normed, stream = ops.rms_norm(x, weight, 1e-6, residual=residual)
    expected = module_rms_norm(x + residual, weight, 1e-6)
    assert normed.shape == x.shape and (normed.double() - expected.double()).abs().max() <= 2e-2 * expected.abs().max()
    torch.testing.assert_close(stream, x + residual, rtol=2.0**-7, atol=0.0)
    with pytest.raises(ValueError, match="weight"):
        ops.rms_norm(x, weight[:-1], 1e-6)
    q = torch.randn(1, 9, 4, 16, generator=g).transpose(1, 2)  # [1, heads, N, D] view of [1, N, heads, D]
    k = torch.randn(1, 9, 2, 16, generator=g).transpose(1, 2)
    angles = torch.randn(1, 9, 8, generator=g)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)

    def rotate_half(t):
        return torch.cat([-t[..., 8:], t[..., :8]], -1)

    expected = [t.double() * cos[:, None].double() + rotate_half(t.double()) * sin[:, None].double() for t in (q, k)]
    got = ops.rotary_(q, k, cos, sin)
    assert got[0] is q and got[1] is k
    for t, e in zip(got, expected):
        assert (t.double() - e).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="disagree"):
        ops.rotary_(q, k, cos[:, :5], sin)
