"""The fast path as one subsystem: install(model, parts) applies what its probes admit, says so,
and handle.remove() puts the model and transformers' process-wide state back exactly."""

import copy
import sys

import pytest
import torch
from torch import nn

from moee_fast import MoEEncoder, fastpath
from moee_fast.adapters import adapter_for
from moee_fast.fastpath import PARTS, state

from conftest import random_texts, reference_embeddings, relative_error

CPU_PARTS = set(PARTS) - {"fused_experts", "quantized_experts"}  # the fused Triton experts admit CUDA weights only


def _load(path):
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(path)


def _process_wide_state(model):
    from transformers import AttentionInterface
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    modeling = {type(m).__module__ for m in model.modules()}
    return (
        dict(AttentionInterface._global_mapping),
        dict(type(ALL_EXPERTS_FUNCTIONS)._global_mapping),
        {name: getattr(sys.modules[name], "apply_rotary_pos_emb", None) for name in modeling},
        model.config._attn_implementation,
        model.config._experts_implementation,
    )


def _outputs(model, input_ids):
    out = model(input_ids=input_ids, output_hidden_states=True, output_router_logits=True)
    return [out.last_hidden_state, *out.hidden_states, *out.router_logits]


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "mixtral"])
def test_install_then_remove_leaves_a_model_whose_forward_equals_a_fresh_copys_bitwise(checkpoint, family):
    model, tokenizer = _load(checkpoint(family))
    fresh = copy.deepcopy(model)
    before = _process_wide_state(model)
    input_ids = torch.tensor([tokenizer(random_texts(1, seed=2)[0])["input_ids"]])

    handles = [fastpath.install(model), fastpath.install(copy.deepcopy(model))]  # two models share the registries
    assert handles[0].parts == CPU_PARTS and "forward" in vars(model.norm)
    with pytest.raises(RuntimeError, match="enc.fast_path.remove"):  # packed attention needs the encoder's layout
        model(input_ids=input_ids)
    handles[0].remove()
    handles[0].remove()  # a second call does nothing
    assert handles[0].parts == frozenset() and "removed" in str(handles[0])
    handles[1].remove()

    assert _process_wide_state(model) == before
    for module in model.modules():
        assert "forward" not in vars(module) and not module._forward_hooks and not module._forward_pre_hooks
    for got, expected in zip(_outputs(model, input_ids), _outputs(fresh, input_ids), strict=True):
        assert torch.equal(got, expected)


def test_a_second_model_keeps_the_registry_entry_until_its_own_removal(checkpoint):
    from transformers import AttentionInterface

    first, _ = _load(checkpoint("olmoe"))
    second = copy.deepcopy(first)
    had_entry = "moee_packed" in AttentionInterface._global_mapping
    a, b = fastpath.install(first), fastpath.install(second)
    a.remove()
    assert AttentionInterface._global_mapping["moee_packed"] is fastpath.attention.packed_attention
    assert second.config._attn_implementation == "moee_packed"
    b.remove()
    assert ("moee_packed" in AttentionInterface._global_mapping) == had_entry


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe"])
def test_each_part_switched_off_alone_still_gives_the_same_embeddings(checkpoint, family):
    path = checkpoint(family)
    texts = random_texts(9, seed=13, max_words=70)
    ref_hs, ref_rw = reference_embeddings(path, texts)
    every = MoEEncoder.from_pretrained(path, device="cpu").encode(texts, batch_size=4)
    for parts in [set(PARTS) - {part} for part in PARTS] + ["none"]:
        enc = MoEEncoder.from_pretrained(path, device="cpu", fast_path=parts)
        assert enc.fast_path.parts == (set() if parts == "none" else parts & CPU_PARTS)
        out = enc.encode(texts, batch_size=4)
        assert not out.hs.isnan().any() and not out.rw.isnan().any()
        assert relative_error(out.hs, every.hs).max() <= 1e-5, parts
        assert relative_error(out.rw, every.rw).max() <= 1e-5, parts
        assert relative_error(out.hs, ref_hs).max() <= 1e-5 and relative_error(out.rw, ref_rw).max() <= 1e-5


@pytest.mark.parametrize("parts", ["all", {"attention", "norms"}])
def test_both_construction_paths_run_the_same_parts(checkpoint, parts):
    path = checkpoint("qwen2_moe")
    loaded = MoEEncoder.from_pretrained(path, device="cpu", fast_path=parts)
    model, tokenizer = _load(path)
    built = MoEEncoder(model, tokenizer, adapter_for(model.config.model_type, type(model)), name=path, fast_path=parts)
    assert str(built.fast_path) == str(loaded.fast_path)
    assert built.model.config._experts_implementation == loaded.model.config._experts_implementation
    texts = random_texts(6, seed=8)
    a, b = built.encode(texts), loaded.encode(texts)
    assert torch.equal(a.hs, b.hs) and torch.equal(a.rw, b.rw)


def test_unknown_parts_are_refused_naming_them():
    with pytest.raises(ValueError, match="unknown fast-path part.*flash.*choose from attention"):
        fastpath.resolve_parts({"attention", "flash"})
    with pytest.raises(TypeError, match="fast_path must be"):
        fastpath.resolve_parts(3)
    assert fastpath.resolve_parts("experts") == ("experts",) and fastpath.resolve_parts("none") == ()


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.plain = nn.Linear(8, 8)
        self.hooked = nn.Linear(8, 8)
        self.half = nn.Linear(8, 8).half()


def test_quantized_hooked_and_meta_modules_are_skipped_and_named():
    import bitsandbytes as bnb
    from accelerate.hooks import ModelHook, add_hook_to_module

    model = _Block()
    model.int8 = bnb.nn.Linear8bitLt(8, 8, has_fp16_weights=False)
    model.nf4 = bnb.nn.Linear4bit(8, 8)
    with torch.device("meta"):
        model.offloaded = nn.Linear(8, 8)
    add_hook_to_module(model.hooked, ModelHook())
    report = fastpath.linears.install(model)
    if not fastpath.linears.available():
        pytest.skip("C++ linear not built")
    assert report.applied == ["plain"]
    reasons = {name: reason for reason, names in report.skipped.items() for name in names}
    assert "accelerate" in reasons["hooked"] and "quantized" in reasons["int8"] and "quantized" in reasons["nf4"]
    assert "meta" in reasons["offloaded"] and "fp32 CPU" in reasons["half"]
    summary = "\n".join(report.lines())
    assert "skipped" in summary and "int8" in summary
    for undo in report.undo:
        undo()
    assert "forward" not in vars(model.plain)


def test_parts_are_inactive_outside_an_encoder_forward(checkpoint):
    """The hooks read the per-forward state: the same model called directly runs in full."""
    model, tokenizer = _load(checkpoint("olmoe"))
    fresh = copy.deepcopy(model)
    handle = fastpath.install(model, set(PARTS) - {"attention"})
    assert state.current() is None
    input_ids = torch.tensor([tokenizer("a text of a few words")["input_ids"]])
    torch.testing.assert_close(model(input_ids=input_ids).last_hidden_state, fresh(input_ids=input_ids).last_hidden_state)
    handle.remove()


def test_the_native_deepseek_model_runs_the_same_parts_and_restores_exactly(tmp_path, tokenizer_corpus):
    from deepseek_reference import write_checkpoint
    from moee_fast.loading.models import load_deepseek

    path = write_checkpoint(tmp_path, tokenizer_corpus, seed=5)
    texts = random_texts(7, seed=6, max_words=40)
    every = MoEEncoder.from_pretrained(path, device="cpu")
    assert every.fast_path.parts >= {"attention", "experts", "norms", "trim"}
    expected = every.encode(texts, batch_size=3)
    for parts in ("none", set(PARTS) - {"attention"}, set(PARTS) - {"experts"}):
        out = MoEEncoder.from_pretrained(path, device="cpu", fast_path=parts).encode(texts, batch_size=3)
        assert relative_error(out.hs, expected.hs).max() <= 1e-5 and relative_error(out.rw, expected.rw).max() <= 1e-5

    model = load_deepseek(path)
    fresh = copy.deepcopy(model)
    before = _process_wide_state(model)
    fastpath.install(model).remove()
    assert _process_wide_state(model) == before
    input_ids = torch.tensor([every.tokenizer(texts[2])["input_ids"]])
    assert torch.equal(model(input_ids=input_ids).last_hidden_state, fresh(input_ids=input_ids).last_hidden_state)


def test_a_model_accelerate_offloads_keeps_its_hooked_modules_and_still_encodes_alike(checkpoint):
    from accelerate import cpu_offload

    path = checkpoint("olmoe")
    model, tokenizer = _load(path)
    cpu_offload(model, execution_device=torch.device("cpu"))  # weights wait on meta, hooks bring them in
    enc = MoEEncoder(model, tokenizer, adapter_for("olmoe", type(model)))
    summary = str(enc.fast_path)
    for part in ("experts", "norms", "linears"):
        assert part not in enc.fast_path.parts
        assert f"{part:<10} off  forward hooked or replaced (accelerate" in summary
    texts = random_texts(6, seed=12, max_words=50)
    out, expected = enc.encode(texts), MoEEncoder.from_pretrained(path, device="cpu").encode(texts)
    assert relative_error(out.hs, expected.hs).max() <= 1e-5 and relative_error(out.rw, expected.rw).max() <= 1e-5


def _router_hooks(model) -> int:
    """Forward hooks anywhere in the model: the tap's are one per router and one per decoder layer
    (the layer hooks keep an earlier layer's hidden state when `hs_layer` asks for one)."""
    return sum(len(module._forward_hooks) for module in model.modules())


def test_ten_encoders_on_one_model_share_one_set_of_router_hooks_and_remove_restores_it(checkpoint):
    path = checkpoint("olmoe")
    model, tokenizer = _load(path)
    adapter = adapter_for("olmoe", type(model))
    fresh = copy.deepcopy(model)
    hooks_before = {name: dict(module._forward_hooks) for name, module in model.named_modules()}
    texts = random_texts(5, seed=21, max_words=30)
    encoders = [MoEEncoder(model, tokenizer, adapter, fast_path="none") for _ in range(10)]
    routers = adapter.routers(model)
    assert all(len(router._forward_hooks) == 1 for router in routers)
    assert _router_hooks(model) == len(routers) + len(model.layers)  # one set, whatever the number of encoders
    assert "router_tap" in str(encoders[0].fast_path) and encoders[0].fast_path.parts == frozenset()
    first = encoders[0].encode(texts)
    for enc in encoders[1:]:
        out = enc.encode(texts)
        assert torch.equal(out.hs, first.hs) and torch.equal(out.rw, first.rw)
        assert out.rw.shape[1] == len(routers)  # each layer's rows kept once
    for enc in encoders[:-1]:
        enc.fast_path.remove()
    assert _router_hooks(model) == len(routers) + len(model.layers)  # the last encoder still reads its routers
    assert torch.equal(encoders[-1].encode(texts).rw, first.rw)
    with pytest.raises(RuntimeError, match="fast path .* was removed"):
        encoders[0].encode(texts)
    encoders[-1].fast_path.remove()
    assert _router_hooks(model) == 0
    assert {name: dict(module._forward_hooks) for name, module in model.named_modules()} == hooks_before
    input_ids = torch.tensor([tokenizer(texts[0])["input_ids"]])
    for got, expected in zip(_outputs(model, input_ids), _outputs(fresh, input_ids), strict=True):
        assert torch.equal(got, expected)


def test_every_part_and_the_router_tap_come_off_with_remove(checkpoint):
    model, tokenizer = _load(checkpoint("qwen2_moe"))
    enc = MoEEncoder(model, tokenizer, adapter_for("qwen2_moe", type(model)))
    assert _router_hooks(model) > 0
    enc.fast_path.remove()
    for module in model.modules():
        assert "forward" not in vars(module) and not module._forward_hooks and not module._forward_pre_hooks


def test_a_router_without_logits_where_the_tap_reads_is_refused_naming_it():
    class Router(nn.Linear):
        def forward(self, x):
            return (super().forward(x),)

    model = nn.Module()
    model.gate = Router(4, 3)
    with pytest.raises(ValueError, match="router 'gate'.*position 2"):
        fastpath.install(model, "none", [model.gate], logits_index=2)
    assert not model.gate._forward_hooks
