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

    torch.manual_seed(0)
    if family == "deepseek":  # DeepSeekMoE, loaded natively: two shared experts, layer 0 dense
        from moee_fast.loading.models import DeepseekConfig, DeepseekModel

        config = DeepseekConfig(vocab_size=100, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                num_key_value_heads=2, intermediate_size=80, moe_intermediate_size=24, n_shared_experts=2,
                                n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1)
        model = DeepseekModel(config)
        with torch.no_grad():
            for parameter in model.parameters():  # its loader fills them; here random, norms at 1
                parameter.normal_(0, 0.05) if parameter.dim() > 1 else parameter.fill_(1.0)
        return model.to(dtype).eval()
    return AutoModel.from_config(family_config(family, vocab_size=100)).to(dtype).eval()


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "deepseek_v2", "deepseek"])
def test_part_runs_the_fused_kernels_and_keeps_the_output(family):
    """Qwen2-MoE (sigmoid-gated), DeepSeek-V2 and DeepSeekMoE (ungated) run their shared expert
    inside the same fused call: the shared MLP's own forward is never called, the output is the
    model's own eager one."""
    model = tiny_model(family, torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).last_hidden_state.double()
    before = model.config._experts_implementation
    report = fused_experts.install(model, devices=("cpu",))
    assert report.applied and not report.skipped and model.config._experts_implementation == fused_experts.NAME
    blocks = [m for m in model.modules() if any(isinstance(getattr(m, a, None), torch.nn.Module) for a in fused_experts.SHARED_EXPERTS)
              and hasattr(m, "experts")]
    n_moe = len(report.applied) - len(blocks)
    assert sum(name.endswith("(shared expert)") for name in report.applied) == len(blocks) == (0 if family == "olmoe" else n_moe)
    calls, shared_calls = [], []
    original = fused_experts.ops.fused_moe_experts
    fused_experts.ops.fused_moe_experts = lambda *a, **k: calls.append(k.get("shared") is not None) or original(*a, **k)
    hooks = [m.register_forward_hook(lambda *_: shared_calls.append(1)) for block in blocks
             for m in (getattr(block, a, None) for a in fused_experts.SHARED_EXPERTS) if m is not None]
    try:
        with torch.no_grad():
            got = model(ids).last_hidden_state.double()
    finally:
        fused_experts.ops.fused_moe_experts = original
        for hook in hooks:
            hook.remove()
    assert len(calls) == n_moe >= 1 and sum(calls) == len(blocks) and not shared_calls  # each MoE layer once
    assert not torch.isnan(got).any()
    error = ((got - expected).norm(dim=-1) / expected.norm(dim=-1)).max().item()
    assert error < 5e-2, error
    for undo in reversed(report.undo):
        undo()
    assert model.config._experts_implementation == before and not any("forward" in vars(m) for m in model.modules())


def test_part_skips_cpu_fp32_and_other_formulas():
    model = tiny_model("olmoe", torch.float32)
    assert fused_experts.install(model).skipped  # CPU weights, default devices: CUDA only
    report = fused_experts.install(model, devices=("cpu",))
    assert not report.applied and any("bf16/fp16" in reason for reason in report.skipped)
    model = tiny_model("olmoe", torch.bfloat16)
    model.config.hidden_act = "gelu"
    report = fused_experts.install(model, devices=("cpu",))
    assert not report.applied and any("SiLU" in reason for reason in report.skipped)
