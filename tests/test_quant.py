"""4-bit / 8-bit loading (bitsandbytes, on CPU here) and device maps with offload (accelerate).

Quantized encoders are compared with the same quantized model run by transformers' own eager
forward, each text alone. Both quantized kernels round their input: NF4 computes in bfloat16
(the paper's setting; 2^-8 relative per element), int8 quantizes each activation row to 127
steps of its absolute maximum. The two forwards agree to fp32 rounding (moee-fast's packed
attention, C++ norms and experts against eager torch) until one such rounding falls the other
way, which moves that element by one step and carries it through the layers. So: the median row
within 1e-5 (fp32 rounding: most rows hit no flip), every row within 2e-2 (a few flipped steps),
and the unquantized model's median row more than 1e-4 away (the comparison tells them apart).
"""

import os
import random
import sys

import pytest
import torch
from torch import nn

from conftest import random_texts, relative_error
from deepseek_reference import write_checkpoint
from moee_fast import MoEEncoder
from moee_fast.loading.quantization import avoid_unsupported_cpu_packing, quantization_config
from moee_fast.loading.quantization.experts import QuantizedExperts, quantized_nbytes
from test_quant_experts import assert_slot_is_bitsandbytes_own, dequantize_reference, expected_quantized_bytes

bnb = pytest.importorskip("bitsandbytes", reason="the quantized path needs pip install moee-fast[quant]")

TYPICAL, WORST, MOVED = 1e-5, 2e-2, 1e-4  # median row, any row, the unquantized median
HF_FAMILIES = ["olmoe", "qwen2_moe", "mixtral"]


@pytest.fixture(autouse=True)
def quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    yield
    hf_logging.set_verbosity(level)


def transformers_quantized(path, method):
    """The model as transformers' own bitsandbytes integration loads it (linears quantized, routed
    experts in fp32), eager attention and experts; `method` is "nf4", "int8" or a BitsAndBytesConfig."""
    from transformers import AutoModel, BitsAndBytesConfig

    if isinstance(method, str):  # the same settings as moee-fast's, in transformers' own class
        method = BitsAndBytesConfig.from_dict(quantization_config(method).to_dict())
    model = AutoModel.from_pretrained(
        path, quantization_config=method, device_map="cpu", dtype=torch.float32, attn_implementation="eager",
        experts_implementation="eager",
    ).eval()
    avoid_unsupported_cpu_packing(model)  # the kernel bitsandbytes picks, not the arithmetic
    return model


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


def decode_experts_into(reference, encoder_model):
    """Give each of the reference's fp32 experts the encoder's quantized experts, decoded in
    float64 from their bytes, after checking those bytes are bitsandbytes' own quantization of the
    reference's (the checkpoint's) weights, expert by expert and matrix by matrix."""
    quantized = dict(encoder_model.named_modules())
    count = 0
    for name, experts in reference.named_modules():
        if not isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor):
            continue
        target, inter = quantized[name], experts.gate_up_proj.shape[1] // 2
        with torch.no_grad():
            for e in range(experts.gate_up_proj.shape[0]):
                for matrices, weight in ((target.gate, experts.gate_up_proj[e, :inter]), (target.up, experts.gate_up_proj[e, inter:]),
                                         (target.down, experts.down_proj[e])):
                    assert_slot_is_bitsandbytes_own(matrices, e, weight)
                experts.gate_up_proj[e] = torch.cat([dequantize_reference(target.gate, e), dequantize_reference(target.up, e)])
                experts.down_proj[e] = dequantize_reference(target.down, e)
        count += 1
    assert count > 0


def assert_close_in_any_batching(enc, texts, ref_hs, ref_rw, seed):
    rng = random.Random(seed)
    for batch_size in (1, 3, None):
        order = list(range(len(texts)))
        rng.shuffle(order)
        out = enc.encode([texts[i] for i in order], batch_size=batch_size)
        for got, expected in ((out.hs, ref_hs[order]), (out.rw, ref_rw[order])):
            error = relative_error(got, expected)
            assert error.median() <= TYPICAL and error.max() <= WORST


def assert_quantization_moved_it(path, texts, ref_hs, ref_rw):
    """The unquantized model lies outside the bounds: the comparison can tell them apart."""
    plain = MoEEncoder.from_pretrained(path, device="cpu").encode(texts)
    assert relative_error(plain.hs, ref_hs).median() > MOVED
    assert relative_error(plain.rw, ref_rw).median() > MOVED


# --- configs and the optional extra ---------------------------------------------------------


def test_configs_are_the_papers():
    nf4 = quantization_config("nf4")
    assert nf4.load_in_4bit and nf4.bnb_4bit_quant_type == "nf4" and nf4.bnb_4bit_use_double_quant
    assert nf4.bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization_config("int8").load_in_8bit
    with pytest.raises(ValueError, match="nf4, int8"):
        quantization_config("int4")


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
    reference = transformers_quantized(checkpoint("olmoe"), BitsAndBytesConfig(load_in_4bit=True))
    experts = enc.model.layers[1].mlp.experts
    assert experts.gate.method == "fp4" and not experts.gate.double_quant and not hasattr(experts.gate, "nested_absmax")
    weights = reference.layers[1].mlp.experts
    inter = weights.gate_up_proj.shape[1] // 2
    for e in range(weights.gate_up_proj.shape[0]):
        assert_slot_is_bitsandbytes_own(experts.up, e, weights.gate_up_proj[e, inter:])
        assert_slot_is_bitsandbytes_own(experts.down, e, weights.down_proj[e])
    assert torch.isfinite(enc.encode(random_texts(4, seed=3)).hs).all()


def test_quantize_and_quantization_config_conflict(checkpoint):
    with pytest.raises(ValueError, match="either quantize or quantization_config"):
        MoEEncoder.from_pretrained(checkpoint("olmoe"), device="cpu", quantize="nf4", quantization_config=quantization_config("int8"))


# --- transformers' families -----------------------------------------------------------------


@pytest.mark.parametrize("method", ["nf4", "int8"])
@pytest.mark.parametrize("family", HF_FAMILIES)
def test_quantized_matches_transformers_forward(checkpoint, family, method):
    """Linears quantized by transformers, routed experts by moee-fast: HS and RW equal transformers'
    eager forward of its own quantized model whose experts hold the encoder's decoded ones."""
    path = checkpoint(family)
    texts = random_texts(9, seed=21, max_words=90)
    enc = MoEEncoder.from_pretrained(path, device="cpu", quantize=method)
    reference = transformers_quantized(path, method)
    fp32_experts_hs, fp32_experts_rw = forward_each_alone(reference, enc.tokenizer, texts)
    decode_experts_into(reference, enc.model)
    ref_hs, ref_rw = forward_each_alone(reference, enc.tokenizer, texts)

    linear_type = bnb.nn.Linear4bit if method == "nf4" else bnb.nn.Linear8bitLt
    quantized = [m for m in enc.model.modules() if isinstance(m, linear_type)]
    assert quantized and all("forward" not in vars(m) for m in quantized)  # no fast-path patch on them
    assert_close_in_any_batching(enc, texts, ref_hs, ref_rw, seed=family + method)
    # the experts' quantization shows: the same model with fp32 experts lies outside the bounds
    got = enc.encode(texts)
    assert relative_error(got.hs, fp32_experts_hs).median() > MOVED
    assert relative_error(got.rw, fp32_experts_rw).median() > MOVED
    assert_quantization_moved_it(path, texts, ref_hs, ref_rw)


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


def quantize_after_plain_load(path, method):
    """The reference: a plain fp32 load, then every nn.Linear swapped for its bitsandbytes module
    built directly from bitsandbytes (not through moee-fast or transformers); its routed experts
    stay fp32 until `decode_experts_into`."""
    from moee_fast.loading.models import load_deepseek

    model = load_deepseek(path, dtype=torch.float32, device="cpu")
    model.config._attn_implementation = "eager"
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
    avoid_unsupported_cpu_packing(model)
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
def test_deepseek_streamed_quantization_matches_quantizing_after_load(deepseek_path, method):
    texts = random_texts(8, seed=4, max_words=40)
    enc = MoEEncoder.from_pretrained(deepseek_path, device="cpu", quantize=method)
    reference = quantize_after_plain_load(deepseek_path, method)

    streamed, expected = quantized_state(enc.model), quantized_state(reference)
    assert streamed.keys() == expected.keys() and len(streamed) > 0
    for name in expected:  # the same bits, whether quantized as read or after a full load
        assert torch.equal(streamed[name].view(torch.uint8), expected[name].view(torch.uint8)), name

    fp32_experts_hs, _ = deepseek_forward_each_alone(reference, enc.tokenizer, texts)
    decode_experts_into(reference, enc.model)  # the experts too: bitsandbytes' bytes of the streamed weights
    ref_hs, ref_rw = deepseek_forward_each_alone(reference, enc.tokenizer, texts)
    assert_close_in_any_batching(enc, texts, ref_hs, ref_rw, seed=method)
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
    texts = tmp_path / "texts.txt"
    texts.write_text("one\ntwo\n")
    assert main(["encode", "--model", path, "--quantize", "nf4", "--input", str(texts), "--output", str(tmp_path / "job")]) == 2


# --- README: the memory table ----------------------------------------------------------------


def load_model_sizes():
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "model_sizes.py")
    spec = importlib.util.spec_from_file_location("model_sizes", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_readme_memory_table_is_the_computed_one():
    sizes = load_model_sizes()
    mixtral = sizes.sizes(sizes.REAL_MODELS[0])
    assert mixtral["params"] == 46_702_792_704 - 32000 * 4096  # Mixtral-8x7B's published count, less its LM head
    assert mixtral["nf4 moee-fast"] < mixtral["int8 moee-fast"] < mixtral["nf4 transformers 5"] < mixtral["bf16"]
    assert 0 < mixtral["nf4 moee-fast"] - mixtral["nf4 every linear"] < 1e-3 * mixtral["nf4 every linear"]  # routers bf16
    with open(os.path.join(os.path.dirname(__file__), os.pardir, "README.md"), encoding="utf-8") as f:
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
