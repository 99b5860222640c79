"""The C++ packed causal attention op against float64 attention, one text at a time."""

import pytest
import torch

from moee_fast import ops

pytestmark = pytest.mark.skipif("cpp" not in ops.available_backends(), reason="C++ extension not built")


def float64_attention(q, k, v, lengths, scale, window):
    heads, kv_heads = q.shape[1], k.shape[1]
    out, start = [], 0
    for n in lengths:
        qi, ki, vi = (x[start : start + n].double().transpose(0, 1) for x in (q, k, v))
        ki, vi = (x.repeat_interleave(heads // kv_heads, dim=0) for x in (ki, vi))
        i = torch.arange(n)
        distance = i[:, None] - i[None, :]
        allowed = (distance >= 0) & (distance < (window or max(n, 1)))
        scores = (qi @ ki.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
        out.append((scores.softmax(-1) @ vi).transpose(0, 1))
        start += n
    return torch.cat(out)


CASES = [  # lengths, heads, kv_heads, dim, window
    ([1, 17, 5, 31, 2], 4, 4, 64, 0),  # short texts, the common case
    ([70, 130, 3], 4, 2, 24, 0),  # grouped-query heads; several query blocks per text
    ([200, 1, 99], 2, 1, 128, 5),  # sliding window, head_dim of two 64-wide slices
    ([300], 3, 3, 72, 0),  # head_dim with a remainder slice
    ([0, 9, 0, 4], 2, 2, 20, 1),  # empty texts, head_dim not a multiple of 8, window of one
]


def attention_inputs(lengths, heads, kv_heads, dim):
    g = torch.Generator().manual_seed(sum(lengths))
    n = sum(lengths)
    q = torch.randn(n, heads, dim, generator=g) * 2
    k, v = (torch.randn(n, kv_heads, dim, generator=g) for _ in range(2))
    return q, k, v, torch.tensor([0] + lengths).cumsum(0)


@pytest.mark.parametrize("lengths,heads,kv_heads,dim,window", CASES)
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
