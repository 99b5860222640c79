"""The C++ packed causal attention op against float64 attention, one text at a time."""

import pytest
import torch

from kernel_references import ATTENTION_CASES, attention_inputs, float64_attention
from moee_fast import ops

pytestmark = pytest.mark.skipif("cpp" not in ops.available_backends(), reason="C++ extension not built")


@pytest.mark.parametrize("lengths,heads,kv_heads,dim,window", ATTENTION_CASES)
def test_matches_float64(lengths, heads, kv_heads, dim, window):
    q, k, v, cu = attention_inputs(lengths, heads, kv_heads, dim)
    out = torch.ops.moee_fast.packed_causal_attention(q, k, v, cu, 0.3, window)
    assert out.shape == q.shape and out.dtype == torch.float32 and not out.isnan().any()
    torch.testing.assert_close(out.double(), float64_attention(q, k, v, lengths, 0.3, window), rtol=1e-5, atol=1e-5)


def test_strided_views_as_the_attention_modules_pass_them():
    g = torch.Generator().manual_seed(0)
    lengths, heads, dim = [13, 40], 4, 32
    qkv = torch.randn(1, sum(lengths), 3 * heads * dim, generator=g)  # one fused projection
    q, k, v = (x.view(sum(lengths), heads, dim) for x in qkv[0].split(heads * dim, dim=-1))
    assert not q.is_contiguous()
    cu = torch.tensor([0] + lengths).cumsum(0)
    out = torch.ops.moee_fast.packed_causal_attention(q, k, v, cu, 0.2, 0)
    torch.testing.assert_close(out.double(), float64_attention(q, k, v, lengths, 0.2, 0), rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_refused():
    q = torch.randn(5, 2, 8)
    cu = torch.tensor([0, 5])
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.moee_fast.packed_causal_attention(q.double(), q.double(), q.double(), cu, 1.0, 0)
    with pytest.raises(RuntimeError, match="multiple"):
        torch.ops.moee_fast.packed_causal_attention(torch.randn(5, 3, 8), q, q, cu, 1.0, 0)
    with pytest.raises(RuntimeError, match="cu_seqlens"):
        torch.ops.moee_fast.packed_causal_attention(q, q, q, torch.tensor([0, 4]), 1.0, 0)
    with pytest.raises(RuntimeError, match="decrease"):
        torch.ops.moee_fast.packed_causal_attention(q, q, q, torch.tensor([0, 3, 2, 5]), 1.0, 0)
