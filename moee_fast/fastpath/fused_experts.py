"""The routed experts on CUDA through moee-fast's fused Triton MoE (ops.fused_moe_experts),
registered with transformers' ExpertsInterface as "moee_fused".

Where transformers' grouped_mm path gathers, permutes, scales and scatters the activations around
its GEMMs (an atomic index_add_ at the end), the fused path reads activation rows through the
aligned pair ids inside the gate_up GEMM, applies SiLU * up and the routing weight in the GEMM
epilogues, and adds each token's top-k rows in a fixed order. Admitted per model: every stacked
experts module in bf16/fp16 on CUDA with the standard layout (SiLU gate, concatenated gate/up, no
bias), each one checked on a probe input against its own original forward.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .experts import use_experts_implementation
from .patching import PartReport, unpatchable_reason

NAME = "moee_fused"
_SILU = ("silu", "swish")
PROBE_TOLERANCE = 3e-2  # max row relative error, both sides rounded to bf16; another formula is off by O(1)


def fused_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    return ops.fused_moe_experts(hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj)


def layout_reason(module: nn.Module) -> str | None:
    """Why the fused kernels do not compute this module's formula, or None."""
    from transformers.integrations.moe import _default_apply_gate

    if getattr(module, "has_bias", True) or not getattr(module, "has_gate", False) or getattr(module, "is_transposed", True) \
            or not getattr(module, "is_concatenated", False) or getattr(module, "has_post_expert_norm", True):
        return "not the standard experts layout (concatenated gate/up, no bias, no post-expert norm)"
    if getattr(getattr(module, "config", None), "hidden_act", None) not in _SILU or \
            getattr(type(module), "_apply_gate", None) is not _default_apply_gate:
        return "activation other than SiLU(gate) * up"
    if module.gate_up_proj.dtype not in (torch.bfloat16, torch.float16):
        return f"{module.gate_up_proj.dtype} weights: the fused kernels take bf16/fp16 (fp32 stays on grouped_mm)"
    return None


@torch.no_grad()
def probe_error(module: nn.Module) -> float:
    """Row relative error of the fused forward against the module's original one on random routing."""
    n_experts, _, hidden = module.gate_up_proj.shape
    generator = torch.Generator().manual_seed(0)
    top_k = min(4, n_experts)
    x = torch.randn(37, hidden, generator=generator).to(module.gate_up_proj.device, module.gate_up_proj.dtype)
    weights, index = torch.softmax(torch.randn(37, n_experts, generator=generator), -1).topk(top_k, -1)
    index, weights = index.to(x.device), weights.to(x.device, x.dtype)
    expected = type(module).forward.__wrapped__(module, x, index, weights).double()
    got = fused_experts_forward(module, x, index, weights).double()
    error = ((got - expected).norm(dim=1) / expected.norm(dim=1).clamp_min(1e-12)).max()
    return float("nan") if error.isnan() else float(error)


def install(model: nn.Module, devices: tuple[str, ...] = ("cuda",)) -> PartReport:
    """Run every experts module through `fused_experts_forward` where all of them are admitted (the
    implementation is chosen per model). `devices`: where the weights may be; a test passes "cpu"
    to run the kernels in Triton's interpreter."""
    report = PartReport("fused_experts", f"{NAME} (Triton fused MoE: aligned blocks, fused SiLU * up and weights)")
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(getattr(m, "gate_up_proj", None), torch.Tensor) and isinstance(getattr(m, "down_proj", None), torch.Tensor)]
    if not found:
        report.skip("no stacked experts modules (gate_up_proj, down_proj)")
    for name, module in found:
        reason = unpatchable_reason(module, ("gate_up_proj", "down_proj"))
        if reason is None and module.gate_up_proj.device.type not in devices:
            reason = f"weights on {module.gate_up_proj.device.type}: the fused kernels run on {', '.join(devices)}"
        if reason is None and "triton" not in ops.available_backends():
            reason = "Triton is not available"
        reason = reason or layout_reason(module)
        if reason is None and not probe_error(module) <= PROBE_TOLERANCE:  # NaN fails
            reason = f"{type(module).__name__} computes another formula (probe)"
        if reason is not None:
            report.skip(reason, name)
    return use_experts_implementation(model, report, NAME, fused_experts_forward, found)
