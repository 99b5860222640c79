"""Pooling and layer choices (rw_pooling, hs_pooling, rw_layers, hs_layer) against transformers'
eager forward with output_hidden_states and output_router_logits, one text at a time."""

import pytest
import torch

from moee_fast import MoEEncoder, ops
from moee_fast.fastpath import router_tap, state
from conftest import random_texts

FAMILIES = ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "deepseek_v2"]


def reference(path: str, texts: list[str], scoring: str):
    """Per text, from the causal LM's eager forward: every hidden state [layers + 1, T, H] (the
    last is the final norm's output) and every MoE layer's scored router rows [L, T, E], fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    score = {"softmax": lambda x: torch.softmax(x, -1), "sigmoid": torch.sigmoid, "logits": lambda x: x}[scoring]
    out = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            result = model(ids, output_hidden_states=True, output_router_logits=True)
            hidden = torch.stack([h[0].double() for h in result.hidden_states])
            rows = torch.stack([score(logits.double()) for logits in result.router_logits])
            out.append((hidden, rows))
    return out


def pooled(per_text, pooling, hs_index, rw_layers):
    pick = (lambda x: x[..., -1, :]) if pooling[1] == "last" else (lambda x: x.mean(-2))
    hs = torch.stack([pick(hidden[hs_index]) for hidden, _ in per_text])
    take = (lambda x: x[..., -1, :]) if pooling[0] == "last" else (lambda x: x.mean(-2))
    rw = torch.stack([take(rows[rw_layers]) for _, rows in per_text])
    return hs, rw


@pytest.fixture(scope="module")
def texts():
    texts = random_texts(9, seed=3, max_words=60)
    texts[4] = ""  # BOS alone: one token, whose mean is its last token
    return texts


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_pooling_and_layer_choice_matches_eager(checkpoint, family, texts, backend, monkeypatch):
    path = checkpoint(family)
    enc = MoEEncoder.from_pretrained(path, device="cpu")
    if backend not in ops.available_backends():
        pytest.skip(f"{backend} is not available here")
    monkeypatch.setitem(ops._CPU_AUTO, "gather_router_softmax", backend)
    monkeypatch.setitem(ops._CPU_AUTO, "mean_router_softmax", backend)
    per_text = reference(path, texts, enc.adapter.scoring)
    n_layers, n_moe = enc.num_layers, enc.num_moe_layers
    choices = [
        # (rw_pooling, hs_pooling, rw_layers, hs_layer) -> reference hidden state index, router layers
        (("last", "last", None, None), n_layers, list(range(n_moe))),
        (("mean", "mean", None, None), n_layers, list(range(n_moe))),
        (("mean", "last", None, None), n_layers, list(range(n_moe))),
        (("last", "mean", None, None), n_layers, list(range(n_moe))),
        (("mean", "mean", slice(0, 1), 0), 1, [0]),  # the first layer's output, before any norm
        (("last", "mean", [-1, 0], 1), 2, [n_moe - 1, 0]),
        (("mean", "last", slice(-1, None), -2), n_layers - 1, [n_moe - 1]),
    ]
    for (rw_pooling, hs_pooling, rw_layers, hs_layer), hs_index, layers in choices:
        out = enc.encode(texts, rw_pooling=rw_pooling, hs_pooling=hs_pooling, rw_layers=rw_layers, hs_layer=hs_layer)
        ref_hs, ref_rw = pooled(per_text, (rw_pooling, hs_pooling), hs_index, layers)
        what = f"{family} rw_pooling={rw_pooling} hs_pooling={hs_pooling} rw_layers={rw_layers} hs_layer={hs_layer}"
        assert out.rw.shape == ref_rw.shape, what
        assert not out.hs.isnan().any() and not out.rw.isnan().any(), what
        torch.testing.assert_close(out.rw.double(), ref_rw, rtol=1e-5, atol=1e-5, msg=what)
        scale = ref_hs.abs().amax(1, keepdim=True)  # hidden states grow with depth: relative to each row's size
        torch.testing.assert_close(out.hs.double() / scale, ref_hs / scale, rtol=1e-5, atol=1e-5, msg=what)


def test_metadata_names_the_choices_other_than_the_default(checkpoint, texts):
    enc = MoEEncoder.from_pretrained(checkpoint("olmoe"), device="cpu")
    default = enc.encode(texts[:2]).metadata
    assert not {"rw_pooling", "hs_pooling", "rw_layers", "hs_layer"} & set(default)
    out = enc.encode(texts[:2], rw_pooling="mean", hs_pooling="mean", rw_layers=[1], hs_layer=0)
    assert {k: out.metadata[k] for k in ("rw_pooling", "hs_pooling", "rw_layers", "hs_layer")} == {
        "rw_pooling": "mean", "hs_pooling": "mean", "rw_layers": "1", "hs_layer": "0"}
    assert enc.encode(texts[:2], rw_layers=slice(None), hs_layer=-1).metadata == default  # the defaults spelled out
    assert enc.encode([], rw_layers=[0]).rw.shape == (0, 1, enc.num_experts)


def test_bad_choices_are_named(checkpoint):
    enc = MoEEncoder.from_pretrained(checkpoint("olmoe"), device="cpu")
    with pytest.raises(ValueError, match="rw_pooling must be one of last, mean, got 'first'"):
        enc.encode(["a"], rw_pooling="first")
    with pytest.raises(ValueError, match="hs_pooling"):
        enc.encode(["a"], hs_pooling=None)
    with pytest.raises(ValueError, match=r"rw_layers\[1\] must be an integer layer index"):
        enc.encode(["a"], rw_layers=[0, 9])
    with pytest.raises(ValueError, match="names a layer twice"):
        enc.encode(["a"], rw_layers=[0, -enc.num_moe_layers])
    with pytest.raises(ValueError, match="picks no layer"):
        enc.encode(["a"], rw_layers=slice(5, 5))
    with pytest.raises(TypeError, match="rw_layers must be a slice or a list"):
        enc.encode(["a"], rw_layers="0")
    with pytest.raises(ValueError, match="hs_layer must be an integer layer index"):
        enc.encode(["a"], hs_layer=enc.num_layers)


def test_the_trim_stays_on_only_where_it_is_exact(checkpoint, monkeypatch):
    enc = MoEEncoder.from_pretrained(checkpoint("olmoe"), device="cpu")
    assert "trim" in enc.fast_path.parts
    seen = []
    real = state.ForwardState.__init__

    def recording(self, *args, **kwargs):
        real(self, *args, **kwargs)
        seen.append(self.trim)

    monkeypatch.setattr(state.ForwardState, "__init__", recording)
    last = enc.num_moe_layers - 1
    expected = [
        (("last", "last", None, None), True),
        (("mean", "last", None, None), False),  # the last MoE layer's router must see every token
        (("last", "mean", None, None), False),  # the final norm's output at every token
        (("mean", "last", [0], None), True),  # the last layer's router is not read
        (("last", "mean", None, 0), True),  # an earlier layer's output: the last layer's rows unread
        (("mean", "mean", [last], 0), False),
    ]
    for (rw_pooling, hs_pooling, rw_layers, hs_layer), trim in expected:
        seen.clear()
        enc.encode(["one text", "another"], rw_pooling=rw_pooling, hs_pooling=hs_pooling, rw_layers=rw_layers, hs_layer=hs_layer)
        assert seen == [trim], (rw_pooling, hs_pooling, rw_layers, hs_layer)


# ------------------------------------------------------------------ the segment-mean op alone
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_experts", [1, 7, 60, 128])
def test_mean_router_softmax_backends_match_float64(dtype, n_experts):
    generator = torch.Generator().manual_seed(n_experts)
    lengths = [1, 5, 200, 3, 64, 65]
    n_rows = sum(lengths) + 4  # rows past the last segment are never read
    logits = [(torch.randn(n_rows, n_experts, generator=generator) * 4).to(dtype) for _ in range(3)]
    logits[1] = torch.randn(n_experts, n_rows, generator=generator).to(dtype).T  # a strided layer
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0)
    expected = torch.stack([
        torch.stack([torch.softmax(x[a:b].double(), -1).mean(0) for a, b in zip(cu_seqlens, cu_seqlens[1:])]) for x in logits
    ], dim=1)
    for backend in ops.available_backends():
        out = torch.full(expected.shape, float("nan"))
        ops.mean_router_softmax(logits, cu_seqlens, backend=backend, out=out)
        torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6, msg=backend)


def test_mean_router_softmax_refuses_bad_segments():
    logits = [torch.randn(10, 4)]
    with pytest.raises(ValueError, match="sequence 1 has rows 3..3"):
        ops.mean_router_softmax(logits, torch.tensor([0, 3, 3]))
    with pytest.raises(IndexError, match="end within the 10 router rows"):
        ops.mean_router_softmax(logits, torch.tensor([0, 11]))
    with pytest.raises(ValueError, match="cu_seqlens must be a 1-D integer tensor"):
        ops.mean_router_softmax(logits, torch.tensor([0.0, 3.0]))
    assert ops.mean_router_softmax(logits, torch.tensor([0])).shape == (0, 1, 4)


def test_pool_rows_is_the_segment_mean():
    rows = torch.randn(7, 3)
    forward = state.ForwardState(torch.tensor([1, 2, 6]), 7)
    torch.testing.assert_close(router_tap.pool_rows(rows, forward, "mean"),
                               torch.stack([rows[0:2].mean(0), rows[2:3].mean(0), rows[3:7].mean(0)]))
    torch.testing.assert_close(router_tap.pool_rows(rows, forward, "last"), rows[[1, 2, 6]])


def test_corpus_job_takes_the_pooling_and_records_it(checkpoint, texts, tmp_path):
    import json

    from moee_fast.corpus import encode_corpus

    enc = MoEEncoder.from_pretrained(checkpoint("olmoe"), device="cpu")
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    corpus = encode_corpus(enc, [str(path)], tmp_path / "out", shard_size=4, rw_pooling="mean", hs_pooling="mean", progress=False)
    alone = enc.encode(texts, rw_pooling="mean", hs_pooling="mean")
    torch.testing.assert_close(corpus.rw, alone.rw, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(corpus.hs, alone.hs, rtol=1e-6, atol=1e-6)
    options = json.loads((tmp_path / "out" / "_manifest.json").read_text())["options"]
    assert (options["rw_pooling"], options["hs_pooling"]) == ("mean", "mean")
    with pytest.raises(ValueError, match="rw_pooling"):
        encode_corpus(enc, [str(path)], tmp_path / "bad", rw_pooling="max", progress=False)
    # A resumed job must ask for the pooling its shards were made with; the default "last" included.
    with pytest.raises(ValueError, match=r"different rw_pooling \('mean', now 'last'\)"):
        encode_corpus(enc, [str(path)], tmp_path / "out", shard_size=4, hs_pooling="mean", progress=False)
    assert encode_corpus(enc, [str(path)], tmp_path / "out", shard_size=4, rw_pooling="mean", hs_pooling="mean",
                         progress=False).ids == corpus.ids
