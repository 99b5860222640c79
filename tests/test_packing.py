"""Packed batches: texts end to end with no padding, attention kept within each text."""

import pytest
import torch

from moee_fast import MoEEncoder
from moee_fast.fastpath import attention
from moee_fast.fastpath.attention import packed_attention
from moee_fast.packing import pack
from conftest import random_texts, reference_embeddings, relative_error, save_checkpoint


def test_pack_layout():
    input_ids, position_ids, p = pack([[5, 6, 7], [8], [9, 10]], torch.device("cpu"))
    assert input_ids.tolist() == [[5, 6, 7, 8, 9, 10]]
    assert position_ids.tolist() == [[0, 1, 2, 0, 0, 1]]
    assert p.last.tolist() == [2, 3, 5] and p.max_len == 3 and p.batch_size == 3
    assert p.unpad_index.tolist() == [0, 1, 2, 3, 6, 7]
    assert p.pad_index.view(3, 3).tolist() == [[0, 1, 2], [3, 3, 3], [4, 5, 5]]  # padded slots repeat a real row


class _Attention(torch.nn.Module):
    pass


def _float64_per_text(q, k, v, lengths, scale, window):
    """Each text alone, causal within `window`, in float64: [N, heads, D]."""
    heads, kv_heads = q.shape[1], k.shape[1]
    rows, start = [], 0
    for length in lengths:
        sl = slice(start, start + length)
        qi, ki, vi = (x[0, :, sl].double() for x in (q, k, v))
        ki, vi = (x.repeat_interleave(heads // kv_heads, dim=0) for x in (ki, vi))
        i = torch.arange(length, device=q.device)
        allowed = (i[:, None] >= i[None, :]) & ((i[:, None] - i[None, :]) < (window or length))
        scores = (qi @ ki.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
        rows.append((scores.softmax(-1) @ vi).transpose(0, 1))  # [length, heads, dim]
        start += length
    return torch.cat(rows)


def _qkv(lengths, heads, kv_heads, dim, seed, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    q = torch.randn(1, heads, n, dim, generator=g)
    k, v = (torch.randn(1, kv_heads, n, dim, generator=g) for _ in range(2))
    return (x.to(device, dtype) for x in (q, k, v))


@pytest.mark.parametrize("kernel", ["cpp", "sdpa", "padded_attention"])
@pytest.mark.parametrize("kv_heads,window", [(4, None), (2, None), (1, 3)])
def test_packed_attention_matches_float64_per_text(kv_heads, window, kernel, monkeypatch):
    if kernel == "sdpa":  # the padded SDPA path that non-fp32 and GPU tensors take
        monkeypatch.setattr(attention, "_use_cpp", lambda *args: False)
    lengths, heads, dim = [1, 17, 5, 31, 2], 4, 24
    _, _, p = pack([[0] * n for n in lengths], torch.device("cpu"))
    q, k, v = _qkv(lengths, heads, kv_heads, dim, seed=kv_heads)
    if kernel == "padded_attention":  # the public function, as the GPU check calls it
        out = attention.padded_attention(q, k, v, p, 0.3, window)
    else:
        out, weights = packed_attention(_Attention(), q, k, v, None, scaling=0.3, sliding_window=window, moee_packing=p)
        assert weights is None
    assert out.shape == (1, sum(lengths), heads, dim)
    torch.testing.assert_close(out[0].double(), _float64_per_text(q, k, v, lengths, 0.3, window), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not attention.varlen_available(), reason="needs CUDA and torch.nn.attention.varlen")
@pytest.mark.parametrize("kv_heads,window", [(4, None), (2, None), (1, 3)])
def test_varlen_attention_matches_float64_per_text_on_cuda(kv_heads, window):
    lengths, heads, dim = [1, 17, 5, 31, 2], 4, 64
    _, _, p = pack([[0] * n for n in lengths], torch.device("cuda"))
    q, k, v = _qkv(lengths, heads, kv_heads, dim, seed=kv_heads, device="cuda", dtype=torch.bfloat16)
    assert attention.varlen_applies(q, v)
    out = attention.varlen_attention(q, k, v, p, 0.3, window)
    expected = _float64_per_text(q, k, v, lengths, 0.3, window)
    assert out.shape == (1, sum(lengths), heads, dim) and not out.isnan().any()
    torch.testing.assert_close(out[0].double(), expected, rtol=2e-2, atol=2e-2)  # bf16 rounding


def test_model_called_without_packing_says_how_to_use_it(checkpoint):
    enc = MoEEncoder.from_pretrained(checkpoint("olmoe"), device="cpu")
    with pytest.raises(RuntimeError, match="set_attn_implementation"):
        enc.model(input_ids=torch.tensor([[1, 2, 3]]))


@pytest.mark.parametrize("family,overrides", [
    ("mixtral", {"sliding_window": 6}),
    ("qwen2_moe", {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1,
                   "layer_types": ["full_attention", "sliding_attention", "sliding_attention"]}),
])
def test_sliding_window_matches_transformers(tmp_path, tokenizer_corpus, family, overrides):
    path = save_checkpoint(tmp_path, family, tokenizer_corpus, **overrides)
    texts = random_texts(7, seed=3, max_words=30)
    ref_hs, ref_rw = reference_embeddings(path, texts)
    out = MoEEncoder.from_pretrained(path, device="cpu").encode(texts)
    assert relative_error(out.hs, ref_hs).max() <= 1e-5
    assert relative_error(out.rw, ref_rw).max() <= 1e-5
    # The window matters here: full causal attention gives different embeddings.
    full = save_checkpoint(tmp_path / "full", family, tokenizer_corpus)
    assert relative_error(MoEEncoder.from_pretrained(full, device="cpu").encode(texts).hs, ref_hs).max() > 1e-3


def test_attn_implementation_is_ignored_with_a_warning(checkpoint):
    with pytest.warns(UserWarning, match="attn_implementation is ignored"):
        enc = MoEEncoder.from_pretrained(checkpoint("olmoe"), device="cpu", attn_implementation="eager")
    assert enc.model.config._attn_implementation == attention.ATTENTION_NAME


@pytest.mark.parametrize("family", ["olmoe", "mixtral"])
def test_bfloat16_runs_the_torch_paths_and_matches_fp32(checkpoint, family):
    """bf16 (the GPU dtype) takes the padded-SDPA attention, torch RMSNorm and the Python experts
    path; its embeddings stay within bf16 rounding of the fp32 ones."""
    path = checkpoint(family)
    texts = random_texts(9, seed=11, max_words=60)
    ref_hs, ref_rw = reference_embeddings(path, texts)
    enc = MoEEncoder.from_pretrained(path, device="cpu", dtype=torch.bfloat16)
    assert next(enc.model.parameters()).dtype == torch.bfloat16
    out = enc.encode(texts, batch_size=4)
    assert out.hs.dtype == torch.float32 and not out.hs.isnan().any()
    assert relative_error(out.hs, ref_hs).max() <= 2e-2  # measured ~8e-3 (OLMoE)
    assert relative_error(out.rw, ref_rw).max() <= 2e-2


def test_where_attention_pads_the_encoder_counts_padded_slots(checkpoint):
    """bf16 on CPU takes the padded SDPA fallback: each forward's B x longest stays within the
    budget (fp32 CPU runs the C++ packed attention, whose cost is its real tokens)."""
    path = checkpoint("olmoe")
    assert not MoEEncoder.from_pretrained(path, device="cpu")._count_padding
    enc = MoEEncoder.from_pretrained(path, device="cpu", dtype=torch.bfloat16)
    assert enc._count_padding
    enc.token_budget = 300
    shapes = []
    enc.model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append((kwargs["moee_packing"].batch_size, kwargs["moee_packing"].max_len)),
        with_kwargs=True,
    )
    texts = random_texts(30, seed=17, max_words=120)
    out = enc.encode(texts)
    assert sum(b for b, _ in shapes) == len(texts) and not out.hs.isnan().any()
    assert all(b * longest <= 300 or b == 1 for b, longest in shapes)


def test_varlen_path_copies_no_projection_and_builds_no_padded_index(monkeypatch):
    """On the varlen path q, k, v reach flash attention as the projections' own rows (views: no
    copy kernel runs), and the padded layout's index tensors are never built; the padded path
    builds them on first use."""
    from torch.nn.attention import varlen
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    lengths, heads, kv_heads, dim = [5, 1, 9], 4, 2, 16
    _, _, packing = pack([[1] * n for n in lengths], torch.device("cpu"))
    n = sum(lengths)
    # As the attention modules hand them over: [1, heads, N, D] views of [N, heads * D] projections
    # (rotated in place by the rotary part on CUDA).
    projections = [torch.randn(n, h * dim, dtype=torch.bfloat16) for h in (heads, kv_heads, kv_heads)]
    q, k, v = (p.view(1, n, -1, dim).transpose(1, 2) for p in projections)
    received = []

    def fake_varlen_attn(query, key, value, *args, **kwargs):
        received.extend((query, key, value))
        return torch.zeros_like(query)

    monkeypatch.setattr(varlen, "varlen_attn", fake_varlen_attn)
    with Ops() as ops:
        out = attention.varlen_attention(q, k, v, packing, None, None)
    assert out.shape == (1, n, heads, dim)
    assert [t.data_ptr() for t in received] == [p.data_ptr() for p in projections]
    assert not [name for name in ops.names if "copy" in name or "clone" in name or "contiguous" in name], ops.names
    assert "pad_index" not in vars(packing) and "unpad_index" not in vars(packing)
    attention.padded_attention(q.float(), k.float(), v.float(), packing, None, None)
    assert "pad_index" in vars(packing) and "unpad_index" in vars(packing)
