"""4-bit / 8-bit loading (bitsandbytes, on CPU here) and device maps with offload (accelerate).

Quantized encoders are compared with transformers' own eager forward, each text alone, of a
model whose every module the paper's setting quantized (every nn.Linear of the family's
transformers-4.x code: linears, routed experts, the routers where they were nn.Linear) holds
bitsandbytes' quantization of the checkpoint's weight, decoded in float64 by conftest's decoder.
NF4 computes in the load dtype, fp32 here: the two forwards agree to fp32 rounding (EXACT, every
row). int8 is LLM.int8(), whose linears quantize each activation row to 127 steps of its absolute
maximum: the forwards agree to fp32 rounding until one such rounding falls the other way, which
moves that element by one step and carries it through the layers. So for int8: the median row
within 1e-5 (most rows hit no flip), every row within 2e-2 (a few flipped steps). In both, the
unquantized model's median row lies more than 1e-4 away (the comparison tells them apart).
"""

import os
import random
import sys

import pytest
import torch
from torch import nn

from conftest import (
    assert_slot_is_bitsandbytes_own,
    bitsandbytes_parameter,
    bitsandbytes_roundtrip,
    decode_reference,
    expected_quantized_bytes,
    random_texts,
    relative_error,
)
from deepseek_reference import write_checkpoint
from moee_fast import MoEEncoder
from moee_fast.loading.quantization import decode_4bit_linears_on_cpu, quantization_config
from moee_fast.loading.quantization.experts import QuantizedExperts, quantized_nbytes
from moee_fast.loading.quantization.routers import QuantizedRouter

bnb = pytest.importorskip("bitsandbytes", reason="the quantized path needs pip install moee-fast[quant]")

EXACT = 1e-4  # NF4 in fp32: every row
TYPICAL, WORST, MOVED = 1e-5, 2e-2, 1e-4  # int8: median row, any row; the unquantized median
HF_FAMILIES = ["olmoe", "qwen2_moe", "mixtral"]
# Whether the family's router (`mlp.gate`) was an nn.Linear in its transformers-4.x modeling code,
# which bitsandbytes then quantized: DeepSeek's MoEGate held a bare weight parameter.
ROUTER_WAS_LINEAR = {"olmoe": True, "qwen2_moe": True, "mixtral": True, "qwen3_moe": True, "deepseek": False, "deepseek_v2": False}
GATE_LINEARS = ("shared_expert_gate",)  # gating linears kept with the routers by quantize_routers=False


@pytest.fixture(autouse=True)
def quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    yield
    hf_logging.set_verbosity(level)


def eager_model(path, quantization=None):
    """transformers' own model of the checkpoint in fp32, eager attention and experts; with
    `quantization` ("int8"), its linears quantized by transformers' own bitsandbytes integration."""
    from transformers import AutoModel, BitsAndBytesConfig

    kwargs = {}
    if quantization is not None:
        kwargs = dict(quantization_config=BitsAndBytesConfig.from_dict(quantization_config(quantization).to_dict()), device_map="cpu")
    return AutoModel.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager", **kwargs,
    ).eval()


def hold_paper_quantization(model, family, method, quantize_routers=True):
    """Give every module of `model` that the paper's setting quantized bitsandbytes' `method`
    quantization of its weight, decoded in float64: plain nn.Linear modules (the gating ones only
    with quantize_routers), the routers where the family's were nn.Linear (with quantize_routers),
    each routed expert's gate, up and down matrix. Returns how many matrices."""
    changed = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            is_gate = name.endswith(GATE_LINEARS)
            is_router = name.endswith("mlp.gate") and type(module) is not nn.Linear
            if (type(module) is nn.Linear and (quantize_routers or not is_gate)) or (
                    is_router and quantize_routers and ROUTER_WAS_LINEAR[family]):
                module.weight.copy_(bitsandbytes_roundtrip(module.weight, method))
                changed += 1
            elif isinstance(getattr(module, "gate_up_proj", None), torch.Tensor):
                inter = module.gate_up_proj.shape[1] // 2
                for e in range(module.gate_up_proj.shape[0]):
                    module.gate_up_proj[e, :inter] = bitsandbytes_roundtrip(module.gate_up_proj[e, :inter], method)
                    module.gate_up_proj[e, inter:] = bitsandbytes_roundtrip(module.gate_up_proj[e, inter:], method)
                    module.down_proj[e] = bitsandbytes_roundtrip(module.down_proj[e], method)
                    changed += 3
    assert changed > 0
    return changed


def forward_each_alone(model, tokenizer, texts):
    """HS and RW from transformers' forward, each text alone: last_hidden_state at the last
    position, fp32 softmax of each recorded router row."""
    hs, rw = [], []
    with torch.no_grad():
        for text in texts:
            out = model(tokenizer(text, return_tensors="pt")["input_ids"], output_router_logits=True)
            hs.append(out.last_hidden_state[0, -1].float())
            rw.append(torch.stack([torch.softmax(logits[-1].float(), dim=-1) for logits in out.router_logits]))
    return torch.stack(hs), torch.stack(rw)


def assert_close_in_any_batching(enc, texts, ref_hs, ref_rw, seed, typical=TYPICAL, worst=WORST):
    rng = random.Random(seed)
    for batch_size in (1, 3, None):
        order = list(range(len(texts)))
        rng.shuffle(order)
        out = enc.encode([texts[i] for i in order], batch_size=batch_size)
        for got, expected in ((out.hs, ref_hs[order]), (out.rw, ref_rw[order])):
            error = relative_error(got, expected)
            assert error.median() <= typical and error.max() <= worst, (error.median().item(), error.max().item())


def assert_quantization_moved_it(path, texts, ref_hs, ref_rw):
    """The unquantized model lies outside the bounds: the comparison can tell them apart."""
    plain = MoEEncoder.from_pretrained(path, device="cpu").encode(texts)
    assert relative_error(plain.hs, ref_hs).median() > MOVED
    assert relative_error(plain.rw, ref_rw).median() > MOVED


def assert_routers_as_asked(model, family, quantize_routers):
    """Routers quantized exactly where the paper's were (and asked for); gating linears with them."""
    routers = [m for name, m in model.named_modules() if name.endswith("mlp.gate")]
    assert routers and all(isinstance(m, QuantizedRouter) == (quantize_routers and ROUTER_WAS_LINEAR[family]) for m in routers)
    assert not [name for name, p in model.named_parameters() if name.endswith("mlp.gate.weight") and quantize_routers
                and ROUTER_WAS_LINEAR[family]]
    gates = [m for name, m in model.named_modules() if name.endswith(GATE_LINEARS)]
    assert all((type(m) is not nn.Linear) == quantize_routers for m in gates)


# --- configs and the optional extra ---------------------------------------------------------


def test_configs_are_the_papers(checkpoint):
    nf4 = quantization_config("nf4")
    assert nf4.load_in_4bit and nf4.bnb_4bit_quant_type == "nf4" and nf4.bnb_4bit_use_double_quant
    assert nf4.bnb_4bit_compute_dtype == torch.bfloat16 and nf4.quantize_routers
    assert quantization_config("int8").load_in_8bit and quantization_config("int8").quantize_routers
    with pytest.raises(ValueError, match="nf4, int8"):
        quantization_config("int4")
    # quantize= computes in the load dtype: fp32 on CPU, whatever kernel bitsandbytes would pick
    enc = MoEEncoder.from_pretrained(checkpoint("olmoe"), device="cpu", quantize="nf4")
    linears = [m for m in enc.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linears and all(m.compute_dtype == torch.float32 for m in linears)
    enc.encode(random_texts(3, seed=1))
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in linears)


@pytest.mark.parametrize("module", ["bitsandbytes", "accelerate"])
def test_missing_extra_is_named(checkpoint, monkeypatch, module):
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_8bit=True)  # built while the extra is still importable
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(ImportError, match=rf"{module}: pip install moee-fast\[quant\]"):
        quantization_config("nf4")
    with pytest.raises(ImportError, match=r"pip install moee-fast\[quant\]"):
        MoEEncoder.from_pretrained(checkpoint("olmoe"), device="cpu", quantize="int8")
    with pytest.raises(ImportError, match=r"pip install moee-fast\[quant\]"):
        MoEEncoder.from_pretrained(checkpoint("olmoe"), device="cpu", quantization_config=config)


def test_a_users_bitsandbytes_config_quantizes_the_experts_with_its_settings(checkpoint):
    """FP4 without double quantization (BitsAndBytesConfig's defaults): the experts take them too."""
    from transformers import BitsAndBytesConfig

    enc = MoEEncoder.from_pretrained(checkpoint("olmoe"), device="cpu", quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    experts = enc.model.layers[1].mlp.experts
    assert experts.gate.method == "fp4" and not experts.gate.double_quant and not hasattr(experts.gate, "nested_absmax")
    router = enc.model.layers[1].mlp.gate
    assert isinstance(router, QuantizedRouter) and router.quantized_weight.method == "fp4"
    weights = eager_model(checkpoint("olmoe")).layers[1].mlp.experts
    inter = weights.gate_up_proj.shape[1] // 2
    for e in range(weights.gate_up_proj.shape[0]):
        assert_slot_is_bitsandbytes_own(experts.up, e, weights.gate_up_proj[e, inter:])
        assert_slot_is_bitsandbytes_own(experts.down, e, weights.down_proj[e])
    assert torch.isfinite(enc.encode(random_texts(4, seed=3)).hs).all()


def test_quantize_and_quantization_config_conflict(checkpoint):
    with pytest.raises(ValueError, match="either quantize or quantization_config"):
        MoEEncoder.from_pretrained(checkpoint("olmoe"), device="cpu", quantize="nf4", quantization_config=quantization_config("int8"))
    with pytest.raises(ValueError, match="quantize_routers applies to quantized loading"):
        MoEEncoder.from_pretrained(checkpoint("olmoe"), device="cpu", quantize_routers=False)


# --- transformers' families -----------------------------------------------------------------


@pytest.mark.parametrize("quantize_routers", [True, False])
@pytest.mark.parametrize("family", HF_FAMILIES + ["qwen3_moe", "deepseek_v2"])
def test_nf4_equals_the_papers_quantization(checkpoint, family, quantize_routers):
    """HS and RW under quantize="nf4" equal transformers' eager forward of the checkpoint whose
    every module the paper quantized holds bitsandbytes' NF4 of its weight (decoded in float64),
    routers included where the paper's were quantized, or kept in full precision on request."""
    path = checkpoint(family)
    texts = random_texts(9, seed=21, max_words=90)
    enc = MoEEncoder.from_pretrained(path, device="cpu", quantize="nf4", quantize_routers=quantize_routers)
    assert_routers_as_asked(enc.model, family, quantize_routers)
    reference = eager_model(path)
    hold_paper_quantization(reference, family, "nf4", quantize_routers)
    ref_hs, ref_rw = forward_each_alone(reference, enc.tokenizer, texts)
    assert_close_in_any_batching(enc, texts, ref_hs, ref_rw, seed=family, typical=EXACT, worst=EXACT)
    assert_quantization_moved_it(path, texts, ref_hs, ref_rw)
    if ROUTER_WAS_LINEAR[family]:  # the routers' quantization shows in RW: the other setting lies outside
        other = eager_model(path)
        hold_paper_quantization(other, family, "nf4", not quantize_routers)
        _, other_rw = forward_each_alone(other, enc.tokenizer, texts)
        assert relative_error(enc.encode(texts).rw, other_rw).median() > MOVED


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_int8_matches_transformers_forward(checkpoint, family):
    """Linears by transformers' LLM.int8(), routed experts and routers weight-only int8 by
    moee-fast: HS and RW equal transformers' eager forward of its own int8 model whose experts
    and routers hold bitsandbytes' int8 of the checkpoint's, decoded in float64."""
    path = checkpoint(family)
    texts = random_texts(9, seed=21, max_words=90)
    enc = MoEEncoder.from_pretrained(path, device="cpu", quantize="int8")
    assert_routers_as_asked(enc.model, family, True)
    reference = eager_model(path, "int8")
    fp32_experts_hs, fp32_experts_rw = forward_each_alone(reference, enc.tokenizer, texts)
    hold_paper_quantization(reference, family, "int8")
    ref_hs, ref_rw = forward_each_alone(reference, enc.tokenizer, texts)

    quantized = [m for m in enc.model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert quantized and all("forward" not in vars(m) for m in quantized)  # no fast-path patch on them
    assert_close_in_any_batching(enc, texts, ref_hs, ref_rw, seed=family)
    # the experts' and routers' quantization shows: the same model with fp32 ones lies outside the bounds
    got = enc.encode(texts)
    assert relative_error(got.hs, fp32_experts_hs).median() > MOVED
    assert relative_error(got.rw, fp32_experts_rw).median() > MOVED
    assert_quantization_moved_it(path, texts, ref_hs, ref_rw)


def test_router_is_decoded_once_per_forward_and_scored_in_fp32(checkpoint, monkeypatch):
    """Loaded in bf16 (compute bf16): each quantized router decodes its weight once per model
    forward, and its logits, hence RW, are fp32 products of the decoded weight."""
    enc = MoEEncoder.from_pretrained(checkpoint("mixtral"), device="cpu", quantize="nf4", dtype=torch.bfloat16)
    routers = [m for m in enc.model.modules() if isinstance(m, QuantizedRouter)]
    assert len(routers) == 3
    forwards, inside, decoded = [], [], {i: [] for i in range(len(routers))}
    enc.model.register_forward_pre_hook(lambda m, a: (forwards.append(1), inside.append(1)) and None)
    enc.model.register_forward_hook(lambda m, a, o: inside.pop() and None)
    for i, router in enumerate(routers):
        original = router.quantized_weight.dequantize
        monkeypatch.setattr(router.quantized_weight, "dequantize", lambda index, dtype, original=original, i=i: (
            decoded[i].append(dtype) if inside else None) or original(index, dtype))
    texts = random_texts(5, seed=9, max_words=30)
    out = enc.encode(texts, batch_size=2)
    assert len(forwards) == 3 and all(calls == [torch.float32] * 3 for calls in decoded.values())
    assert out.rw.dtype == torch.float32 and torch.isfinite(out.rw).all()
    x = torch.randn(4, enc.hidden_size, dtype=torch.bfloat16)
    weight = decode_reference(routers[0].quantized_weight.data[0], routers[0].quantized_weight.quant_state(0, torch.float32))
    logits = routers[0](x)[0]
    assert logits.dtype == torch.float32
    assert torch.allclose(logits.double(), x.double() @ weight.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(40, 48), (64, 32), (7, 9), (1, 64), (48, 64)])
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_4bit_linear_on_cpu_is_its_decoded_weight(shape, compute_dtype):
    """A Linear4bit on CPU computes with its weight as the float64 reference decodes it (odd
    shapes, where bitsandbytes' own CPU decoding goes wrong), in its compute dtype, never packed."""
    torch.manual_seed(sum(shape))
    out_features, in_features = shape
    linear = bnb.nn.Linear4bit(in_features, out_features, bias=True, compute_dtype=compute_dtype, quant_type="nf4",
                               compress_statistics=True)
    param = bitsandbytes_parameter(torch.randn(shape), "nf4")
    linear.weight, linear.bias = param, nn.Parameter(torch.randn(out_features))
    model = nn.Sequential(linear).to("cpu")
    assert decode_4bit_linears_on_cpu(model) == 1 and isinstance(model[0], bnb.nn.Linear4bit)
    x = torch.randn(5, 3, in_features)
    weight = decode_reference(param.data, param.quant_state)
    expected = x.double() @ weight.T + linear.bias.double()
    terms = x.double().abs() @ weight.abs().T + linear.bias.double().abs()  # the scale rounding acts on
    with torch.no_grad():
        got = model(x)
    assert got.dtype == torch.float32 and got.shape == (5, 3, out_features)
    bound = 1e-6 if compute_dtype == torch.float32 else 2e-2
    assert ((got.double() - expected).abs() / terms).max() <= bound
    assert not getattr(model[0].weight.quant_state, "packing_format_for_cpu", False)


@pytest.mark.parametrize("method", ["nf4", "int8"])
@pytest.mark.parametrize("family", HF_FAMILIES + ["deepseek"])
def test_routed_experts_are_quantized(checkpoint, request, family, method):
    """No floating-point 3-D expert tensor is left, the experts hold their computed quantized size,
    and the fast path says what it did with them."""
    from moee_fast.fastpath.experts import QUANTIZED_REASON

    path = request.getfixturevalue("deepseek_path") if family == "deepseek" else checkpoint(family)
    enc = MoEEncoder.from_pretrained(path, device="cpu", quantize=method)
    tensors = list(enc.model.named_parameters()) + list(enc.model.named_buffers())
    assert not [name for name, t in tensors if t.dim() == 3 and t.is_floating_point()]
    experts = [(name, m) for name, m in enc.model.named_modules() if isinstance(m, QuantizedExperts)]
    assert experts
    for name, module in experts:
        assert quantized_nbytes(module) == expected_quantized_bytes(module.num_experts, module.gate.cols, module.gate.rows, method)
    report = next(r for r in enc.fast_path.reports if r.part == "experts")
    assert sorted(report.skipped[QUANTIZED_REASON]) == sorted(name for name, _ in experts)
    assert QUANTIZED_REASON in str(enc.fast_path)
    assert_routers_as_asked(enc.model, family, True)


def test_experts_are_quantized_while_loading(checkpoint, monkeypatch):
    """transformers' loader hands each layer's stacked tensor to the quantizer one at a time: each
    is quantized before the next is read, and the stacked parameter never lands in the model."""
    seen = []
    original = QuantizedExperts.store_stacked

    def recording(self, attr, stacked):
        ready = [m.gate.allocated and m.down.allocated for m in experts_modules]
        seen.append((attr, tuple(stacked.shape), stacked.is_meta, sum(ready)))
        original(self, attr, stacked)
        assert attr not in self._parameters

    experts_modules = []
    monkeypatch.setattr(QuantizedExperts, "store_stacked", recording)
    from moee_fast.loading import quantization

    make = quantization.make_quantized
    monkeypatch.setattr(quantization, "make_quantized", lambda module, *a, **kw: (make(module, *a, **kw), experts_modules.append(module)))
    MoEEncoder.from_pretrained(checkpoint("mixtral"), device="cpu", quantize="nf4")
    layers = len(experts_modules)
    assert layers == 3 and len(seen) == 2 * layers
    assert all(not is_meta and shape[0] == 8 for _, shape, is_meta, _ in seen)
    assert [ready for *_, ready in seen] == sorted(ready for *_, ready in seen)  # layer after layer
    assert seen[0][3] == 0 and seen[-1][3] == layers - 1


# --- DeepSeekMoE, loaded natively -----------------------------------------------------------


@pytest.fixture(scope="module")
def deepseek_path(tmp_path_factory, tokenizer_corpus):
    return write_checkpoint(tmp_path_factory.mktemp("deepseek-quant"), tokenizer_corpus, seed=5)


def plain_deepseek(path):
    from moee_fast.loading.models import load_deepseek

    model = load_deepseek(path, dtype=torch.float32, device="cpu")
    model.config._attn_implementation = "eager"
    return model


def quantize_after_plain_load(path, method):
    """A plain fp32 load, then every nn.Linear swapped for its bitsandbytes module built directly
    from bitsandbytes (not through moee-fast or transformers); its routed experts stay fp32."""
    model = plain_deepseek(path)
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear:
            continue
        weight = module.weight.data.clone()
        if method == "nf4":
            new = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=False, compute_dtype=torch.bfloat16,
                                    compress_statistics=True, quant_type="nf4")
            new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True).to("cpu")
        else:
            new = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=False, has_fp16_weights=False, threshold=6.0)
            new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to("cpu")
        model.set_submodule(name, new.eval())
    return model


def deepseek_forward_each_alone(model, tokenizer, texts):
    """last_hidden_state at the last position and fp32 softmax of every gate's last row, via hooks."""
    from moee_fast.loading.models.deepseek import DeepseekTopkRouter

    rows = []
    gates = [m for m in model.modules() if isinstance(m, DeepseekTopkRouter)]
    handles = [g.register_forward_hook(lambda m, a, out: rows.append(out[0][-1].float().softmax(-1))) for g in gates]
    hs, rw = [], []
    with torch.no_grad():
        for text in texts:
            rows.clear()
            out = model(input_ids=tokenizer(text, return_tensors="pt")["input_ids"], use_cache=False)
            hs.append(out.last_hidden_state[0, -1].float())
            rw.append(torch.stack(rows))
    for handle in handles:
        handle.remove()
    return torch.stack(hs), torch.stack(rw)


def quantized_state(model):
    return {name: m.weight.data for name, m in model.named_modules()
            if any(cls.__module__.startswith("bitsandbytes") for cls in type(m).__mro__)}


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_deepseek_streamed_quantization_is_quantizing_after_load(deepseek_path, method):
    enc = MoEEncoder.from_pretrained(deepseek_path, device="cpu", quantize=method)
    streamed, expected = quantized_state(enc.model), quantized_state(quantize_after_plain_load(deepseek_path, method))
    assert streamed.keys() == expected.keys() and len(streamed) > 0
    for name in expected:  # the same bits, whether quantized as read or after a full load
        assert torch.equal(streamed[name].view(torch.uint8), expected[name].view(torch.uint8)), name


@pytest.mark.parametrize("quantize_routers", [True, False])
def test_deepseek_nf4_equals_the_papers_quantization(deepseek_path, quantize_routers):
    """Every nn.Linear (shared experts of width 48 included) and routed expert in NF4, the router
    (a bare weight in the authors' code too) in fp32 whatever quantize_routers says."""
    texts = random_texts(8, seed=4, max_words=40)
    enc = MoEEncoder.from_pretrained(deepseek_path, device="cpu", quantize="nf4", quantize_routers=quantize_routers)
    assert_routers_as_asked(enc.model, "deepseek", quantize_routers)
    reference = plain_deepseek(deepseek_path)
    hold_paper_quantization(reference, "deepseek", "nf4")
    ref_hs, ref_rw = deepseek_forward_each_alone(reference, enc.tokenizer, texts)
    assert_close_in_any_batching(enc, texts, ref_hs, ref_rw, seed=quantize_routers, typical=EXACT, worst=EXACT)
    assert_quantization_moved_it(deepseek_path, texts, ref_hs, ref_rw)


def test_deepseek_int8_matches_quantizing_after_load(deepseek_path):
    texts = random_texts(8, seed=4, max_words=40)
    enc = MoEEncoder.from_pretrained(deepseek_path, device="cpu", quantize="int8")
    reference = quantize_after_plain_load(deepseek_path, "int8")
    fp32_experts_hs, _ = deepseek_forward_each_alone(reference, enc.tokenizer, texts)
    hold_paper_quantization(reference, "deepseek", "int8")  # the experts: bitsandbytes' int8, decoded
    ref_hs, ref_rw = deepseek_forward_each_alone(reference, enc.tokenizer, texts)
    assert_close_in_any_batching(enc, texts, ref_hs, ref_rw, seed="int8")
    assert relative_error(enc.encode(texts).hs, fp32_experts_hs).median() > MOVED
    assert_quantization_moved_it(deepseek_path, texts, ref_hs, ref_rw)


def test_deepseek_refuses_sharding(deepseek_path):
    with pytest.raises(ValueError, match="one device"):
        MoEEncoder.from_pretrained(deepseek_path, device="cpu", device_map={"layers.0": "cpu", "layers.1": "disk"})


# --- device maps and offload ----------------------------------------------------------------


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe"])
def test_device_map_with_disk_offload_equals_unsharded(checkpoint, tmp_path, family):
    path = checkpoint(family)
    texts = random_texts(10, seed=8, max_words=80)
    plain = MoEEncoder.from_pretrained(path, device="cpu")
    expected = plain.encode(texts)
    plain_bytes = sum(p.numel() * p.element_size() for p in plain.model.parameters())

    # accelerate keeps room for the largest layer beside what it places: 85% leaves the embedding
    # and the first layer in memory and the rest on disk.
    offload = tmp_path / "offload"
    enc = MoEEncoder.from_pretrained(
        path, device="cpu", device_map="auto", max_memory={"cpu": int(plain_bytes * 0.85)}, offload_folder=str(offload),
    )
    layers = {name: place for name, place in enc.model.hf_device_map.items() if name.startswith("layers.")}
    assert "cpu" in layers.values() and "disk" in layers.values(), enc.model.hf_device_map
    assert any(name.endswith(".safetensors") for name in os.listdir(offload))
    assert enc.device == torch.device("cpu")
    for batch_size in (1, None):
        out = enc.encode(texts, batch_size=batch_size)
        assert relative_error(out.hs, expected.hs).max() <= 1e-5
        assert relative_error(out.rw, expected.rw).max() <= 1e-5


def test_everything_offloaded_to_disk(checkpoint, tmp_path):
    path = checkpoint("mixtral")
    texts = random_texts(6, seed=2, max_words=50)
    expected = MoEEncoder.from_pretrained(path, device="cpu").encode(texts)
    enc = MoEEncoder.from_pretrained(path, device="cpu", device_map={"": "disk"}, offload_folder=str(tmp_path / "offload"))
    assert all(p.is_meta for p in enc.model.layers.parameters())  # nothing resident until its forward
    out = enc.encode(texts)
    assert relative_error(out.hs, expected.hs).max() <= 1e-5
    assert relative_error(out.rw, expected.rw).max() <= 1e-5


# --- command line ---------------------------------------------------------------------------


def test_cli_quantize_flag(checkpoint, tmp_path):
    from moee_fast.cli import main
    from moee_fast.demo import SAMPLE_TEXTS
    from moee_fast.embeddings import MoEEmbeddings

    path = checkpoint("olmoe")
    assert main(["encode", "--model", path, "--device", "cpu", "--quantize", "int8", "--output", str(tmp_path / "e.safetensors")]) == 0
    written = MoEEmbeddings.load(str(tmp_path / "e.safetensors"))
    expected = MoEEncoder.from_pretrained(path, device="cpu", quantize="int8").encode(list(SAMPLE_TEXTS))
    assert relative_error(written.hs, expected.hs).max() <= 1e-5
    plain = MoEEncoder.from_pretrained(path, device="cpu").encode(list(SAMPLE_TEXTS))
    assert relative_error(plain.hs, expected.hs).max() > 1e-5
    assert main(["encode", "--model", path, "--quantize", "int4"]) == 2  # a usage error: one line, exit 2
    assert main(["encode", "--model", path, "--full-precision-routers", "--output", str(tmp_path / "f.safetensors")]) == 2
    assert main(["encode", "--model", path, "--device", "cpu", "--quantize", "nf4", "--full-precision-routers",
                 "--output", str(tmp_path / "f.safetensors")]) == 0
    expected = MoEEncoder.from_pretrained(path, device="cpu", quantize="nf4", quantize_routers=False).encode(list(SAMPLE_TEXTS))
    assert torch.equal(MoEEmbeddings.load(str(tmp_path / "f.safetensors")).rw, expected.rw)
    texts = tmp_path / "texts.txt"
    texts.write_text("one\ntwo\n")
    assert main(["encode", "--model", path, "--quantize", "nf4", "--input", str(texts), "--output", str(tmp_path / "job")]) == 2


# --- docs/memory.md: the memory table ----------------------------------------------------------------


def load_model_sizes():
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "model_sizes.py")
    spec = importlib.util.spec_from_file_location("model_sizes", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_documented_memory_table_is_the_computed_one():
    sizes = load_model_sizes()
    mixtral = sizes.sizes(sizes.REAL_MODELS[0])
    assert mixtral["params"] == 46_702_792_704 - 32000 * 4096  # Mixtral-8x7B's published count, less its LM head
    assert mixtral["nf4 moee-fast"] < mixtral["int8 moee-fast"] < mixtral["nf4 transformers 5"] < mixtral["bf16"]
    assert mixtral["nf4 moee-fast"] == mixtral["nf4 every linear"]  # the paper's modules, routers included
    assert 0 < mixtral["nf4 moee-fast routers bf16"] - mixtral["nf4 moee-fast"] < 1e-3 * mixtral["nf4 moee-fast"]
    deepseek = sizes.sizes(sizes.REAL_MODELS[1])  # its router was never quantized
    assert deepseek["nf4 moee-fast routers bf16"] == deepseek["nf4 moee-fast"] == deepseek["nf4 every linear"]
    with open(os.path.join(os.path.dirname(__file__), os.pardir, "docs", "memory.md"), encoding="utf-8") as f:
        readme = f.read()
    block = readme.split("<!-- memory-table:begin -->\n")[1].split("\n<!-- memory-table:end -->")[0]
    assert block == sizes.markdown_table()


# --- bitsandbytes' 8-bit linears on inputs of more than 3 dimensions --------------------------


def test_int8_linear_runs_on_the_rows_of_a_4d_input():
    """bitsandbytes' own 8-bit matmul of the 2-D rows is the reference (it fails on the 4-D input
    itself on CPU); the result keeps the input's leading shape."""
    from moee_fast.loading.quantization import run_int8_linears_on_rows

    torch.manual_seed(3)
    model = nn.Sequential(bnb.nn.Linear8bitLt(24, 10, bias=True, has_fp16_weights=False))
    model[0].load_state_dict(nn.Linear(24, 10).state_dict())
    model = model.to("cpu")
    x = torch.randn(2, 1, 7, 24) * 3
    rows = bnb.nn.Linear8bitLt.forward(model[0], x.reshape(-1, 24))
    assert run_int8_linears_on_rows(model) == 1 and run_int8_linears_on_rows(model) == 0
    assert isinstance(model[0], bnb.nn.Linear8bitLt)
    out = model(x)
    assert out.shape == (2, 1, 7, 10) and torch.equal(out.reshape(-1, 10), rows)
    assert torch.equal(model(x[0, 0]), bnb.nn.Linear8bitLt.forward(model[0], x[0, 0]))  # 2-D: untouched


def test_deepseek_v2_in_int8(checkpoint):
    """DeepSeek-V2's attention feeds kv_b_proj a 4-D tensor: in 8 bits it encodes, close to fp32."""
    path = checkpoint("deepseek_v2")
    texts = random_texts(5, seed=8, max_words=30)
    got = MoEEncoder.from_pretrained(path, device="cpu", quantize="int8").encode(texts)
    full = MoEEncoder.from_pretrained(path, device="cpu").encode(texts)
    assert torch.isfinite(got.hs).all() and torch.isfinite(got.rw).all()
    assert relative_error(got.hs, full.hs).max() < 0.2 and relative_error(got.rw, full.rw).max() < 0.2
