"""The `fused_experts` fast-path part: admitted where the fused Triton MoE reproduces a module's
own forward, the model's output unchanged within bf16 rounding, and undone exactly. Run on CPU
tensors in Triton's interpreter (the part admits CPU weights only when asked, as here)."""

import os

import pytest
import torch

from conftest import family_config
from moee_fast.fastpath import fused_experts

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs on CPU tensors in the interpreter")


def tiny_model(family, dtype):
    from transformers import AutoModel

    config = family_config(family, vocab_size=100)
    torch.manual_seed(0)
    return AutoModel.from_config(config).to(dtype).eval()


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe"])
def test_part_runs_the_fused_kernels_and_keeps_the_output(family):
    model = tiny_model(family, torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).last_hidden_state.double()
    before = model.config._experts_implementation
    report = fused_experts.install(model, devices=("cpu",))
    assert report.applied and not report.skipped and model.config._experts_implementation == fused_experts.NAME
    calls = []
    original = fused_experts.ops.fused_moe_experts
    fused_experts.ops.fused_moe_experts = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        with torch.no_grad():
            got = model(ids).last_hidden_state.double()
    finally:
        fused_experts.ops.fused_moe_experts = original
    assert len(calls) == len(report.applied) >= 2  # each MoE layer once (the tiny Qwen2-MoE has a dense layer)
    error = ((got - expected).norm(dim=-1) / expected.norm(dim=-1)).max().item()
    assert error < 5e-2, error
    for undo in reversed(report.undo):
        undo()
    assert model.config._experts_implementation == before


def test_part_skips_cpu_fp32_and_other_formulas():
    model = tiny_model("olmoe", torch.float32)
    assert fused_experts.install(model).skipped  # CPU weights, default devices: CUDA only
    report = fused_experts.install(model, devices=("cpu",))
    assert not report.applied and any("bf16/fp16" in reason for reason in report.skipped)
    model = tiny_model("olmoe", torch.bfloat16)
    model.config.hidden_act = "gelu"
    report = fused_experts.install(model, devices=("cpu",))
    assert not report.applied and any("SiLU" in reason for reason in report.skipped)
