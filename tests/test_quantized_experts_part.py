"""The `quantized_experts` fast-path part: quantized routed experts (int8 rows, NF4 blocks) run
through the fused Triton MoE that decodes them inside its GEMMs, admitted where it reproduces the
module's own forward, the model's output unchanged within bf16 rounding, and undone exactly. Run
on CPU tensors in Triton's interpreter (the part admits CPU weights only when asked, as here)."""

import os

import pytest
import torch

from conftest import family_config
from moee_fast.fastpath import quantized_experts

pytest.importorskip("bitsandbytes", reason="the quantized path needs pip install moee-fast[quant]")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs on CPU tensors in the interpreter")


def quantized_model(family, method, dtype=torch.bfloat16):
    from transformers import AutoModel

    from moee_fast.loading.quantization.experts import make_quantized, quantizable_experts

    torch.manual_seed(0)
    model = AutoModel.from_config(family_config(family, vocab_size=100)).to(dtype).eval()
    for module in [m for m in model.modules() if quantizable_experts(m)]:
        stacked = {name: getattr(module, name).detach().float() for name in ("gate_up_proj", "down_proj")}
        make_quantized(module, method)
        for name, tensor in stacked.items():
            module.store_stacked(name, tensor)
    return model


@pytest.mark.parametrize(("family", "method"), [("olmoe", "nf4"), ("olmoe", "int8"), ("qwen2_moe", "nf4")])
def test_part_runs_the_fused_kernels_and_keeps_the_output(family, method):
    model = quantized_model(family, method)
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).last_hidden_state.double()
    report = quantized_experts.install(model, devices=("cpu",))
    assert len(report.applied) >= 2 and not report.skipped, report.lines()
    calls = []
    original = quantized_experts.ops.fused_moe_quantized_experts
    quantized_experts.ops.fused_moe_quantized_experts = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        with torch.no_grad():
            got = model(ids).last_hidden_state.double()
    finally:
        quantized_experts.ops.fused_moe_quantized_experts = original
    assert len(calls) == len(report.applied)  # each MoE layer once
    assert not torch.isnan(got).any()
    error = ((got - expected).norm(dim=-1) / expected.norm(dim=-1)).max().item()
    assert error < 5e-2, error
    for undo in reversed(report.undo):
        undo()
    assert not any("forward" in vars(m) for m in model.modules())


def test_part_skips_other_devices_fp32_and_unquantized_models():
    model = quantized_model("olmoe", "int8")
    report = quantized_experts.install(model)  # CPU weights, default devices: CUDA only
    assert not report.applied and any("run on cuda" in reason for reason in report.skipped)
    report = quantized_experts.install(quantized_model("olmoe", "int8", torch.float32), devices=("cpu",))
    assert not report.applied and any("bf16/fp16" in reason for reason in report.skipped)
    from transformers import AutoModel

    plain = AutoModel.from_config(family_config("olmoe", vocab_size=100))
    assert quantized_experts.install(plain, devices=("cpu",)).skipped == {"no quantized experts modules": [""]}
