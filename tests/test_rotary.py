"""The fused rotary embedding returns bitwise what the families' apply_rotary_pos_emb returns, and
only inside MoEEncoder's forward."""

import sys
import types

import pytest
import torch

from moee_fast import MoEEncoder
from moee_fast.fastpath import rotary, state

pytestmark = pytest.mark.skipif(not rotary.available(), reason="C++ extension not built")


def _families_functions():
    from transformers.models.llama import modeling_llama
    from transformers.models.mixtral import modeling_mixtral
    from transformers.models.olmoe import modeling_olmoe
    from transformers.models.qwen2_moe import modeling_qwen2_moe

    modules = (modeling_llama, modeling_mixtral, modeling_olmoe, modeling_qwen2_moe)
    return [getattr(m.apply_rotary_pos_emb, "moee_fast_original", m.apply_rotary_pos_emb) for m in modules]


def _inputs(batch, heads, kv_heads, n, d, cos_batch, seed):
    g = torch.Generator().manual_seed(seed)
    # The modules pass [B, heads, N, D] views of [B, N, heads, D] projections.
    q = torch.randn(batch, n, heads, d, generator=g).transpose(1, 2)
    k = torch.randn(batch, n, kv_heads, d, generator=g).transpose(1, 2)
    cos = torch.randn(cos_batch, n, d, generator=g) * 3
    sin = torch.randn(cos_batch, n, d, generator=g) * 3
    return q, k, cos, sin


@pytest.mark.parametrize(
    "batch,heads,kv_heads,n,d,cos_batch",
    [(1, 4, 4, 37, 64, 1), (2, 6, 2, 5, 18, 2), (3, 1, 1, 1, 2, 1), (1, 8, 2, 129, 128, 1), (2, 3, 3, 0, 16, 1)],
)
def test_op_is_bitwise_equal_to_every_family_function(batch, heads, kv_heads, n, d, cos_batch):
    q, k, cos, sin = _inputs(batch, heads, kv_heads, n, d, cos_batch, seed=n + d)
    q[..., 0] = float("nan")  # NaN stays NaN where it was, and only there
    got_q, got_k = torch.ops.moee_fast.rotary(q, k, cos, sin)
    assert got_q.stride() == q.stride() and got_k.stride() == k.stride()  # layout kept for the attention op
    for original in _families_functions():
        want_q, want_k = original(q, k, cos, sin)
        assert torch.equal(got_q.isnan(), want_q.isnan())
        assert torch.equal(got_q.nan_to_num(0.0), want_q.nan_to_num(0.0)) and torch.equal(got_k, want_k)


def test_op_rejects_bad_operands_by_name():
    q, k, cos, sin = _inputs(1, 2, 2, 4, 8, 1, seed=0)
    with pytest.raises(RuntimeError, match="rotary: k"):
        torch.ops.moee_fast.rotary(q, k[:, :, :3], cos, sin)
    with pytest.raises(RuntimeError, match="cos and sin"):
        torch.ops.moee_fast.rotary(q, k, cos[:, :3], sin)
    with pytest.raises(RuntimeError, match="q .* float32"):
        torch.ops.moee_fast.rotary(q.double(), k, cos, sin)
    with pytest.raises(RuntimeError, match="even"):
        torch.ops.moee_fast.rotary(q[..., :7], k[..., :7], cos[..., :7], sin[..., :7])


def _fake_modeling_module(name, function):
    module = types.ModuleType(name)
    module.apply_rotary_pos_emb = function
    sys.modules[name] = module
    return module


def _interleaved(q, k, cos, sin, unsqueeze_dim=1):  # GPT-J style pairs: another rotation
    def rotate(x):
        return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)

    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate(q) * sin, k * cos + rotate(k) * sin


def test_install_wraps_only_what_the_op_reproduces_and_only_inside_encoder_forwards():
    calls = []
    half_rotation = _families_functions()[0]

    def counted(*args, **kwargs):
        calls.append(1)
        return half_rotation(*args, **kwargs)

    same = _fake_modeling_module("moee_test_same_rotary", counted)
    other = _fake_modeling_module("moee_test_other_rotary", _interleaved)
    model = torch.nn.Module()
    model.a = type("SameAttention", (torch.nn.Module,), {"__module__": same.__name__})()
    model.b = type("OtherAttention", (torch.nn.Module,), {"__module__": other.__name__})()
    try:
        first = rotary.install(model)
        second = rotary.install(model)
        assert len(first.applied) == len(second.applied) == 1
        assert same.apply_rotary_pos_emb.moee_fast_original is counted  # not wrapped twice
        assert same.apply_rotary_pos_emb.moee_fast_original is counted
        assert other.apply_rotary_pos_emb is _interleaved
        q, k, cos, sin = _inputs(2, 3, 1, 6, 8, 1, seed=3)
        calls.clear()
        outside = same.apply_rotary_pos_emb(q, k, cos, sin)
        assert len(calls) == 1  # outside an encoder forward: the original runs
        with state.running(state.ForwardState(torch.zeros(1, dtype=torch.long), 1)):
            inside = same.apply_rotary_pos_emb(q, k, cos, sin)
            same.apply_rotary_pos_emb(q.double(), k.double(), cos.double(), sin.double())
            same.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
        assert len(calls) == 2  # only the fp64 call fell back
        assert all(torch.equal(a, b) for a, b in zip(inside, outside))
        for report in (second, first):
            for undo in reversed(report.undo):
                undo()
        assert same.apply_rotary_pos_emb is counted  # the last release restores the original
    finally:
        del sys.modules[same.__name__], sys.modules[other.__name__]


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe"])
def test_encoder_takes_the_fused_rotary_and_changes_no_embedding(checkpoint, family, monkeypatch):
    enc = MoEEncoder.from_pretrained(checkpoint(family), device="cpu")
    texts = ["short", "a somewhat longer text with more tokens in it", "x"]
    takes, taken = rotary._takes, []
    monkeypatch.setattr(rotary, "_takes", lambda *args: taken.append(takes(*args)) or taken[-1])
    fused = enc.encode(texts)
    assert taken and all(taken)  # every call of the encoder's forward took the C++ op
    monkeypatch.setattr(rotary, "_takes", lambda *args: False)
    plain = enc.encode(texts)
    assert torch.equal(fused.hs, plain.hs) and torch.equal(fused.rw, plain.rw)
