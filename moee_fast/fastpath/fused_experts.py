"""The routed experts on CUDA through moee-fast's fused Triton MoE (ops.fused_moe_experts),
registered with transformers' ExpertsInterface as "moee_fused".

Where transformers' grouped_mm path gathers, permutes, scales and scatters the activations around
its GEMMs (an atomic index_add_ at the end), the fused path reads activation rows through the
aligned pair ids inside the gate_up GEMM, applies SiLU * up and the routing weight in the GEMM
epilogues, and adds each token's top-k rows in a fixed order. Admitted per model: every stacked
experts module in bf16/fp16 on CUDA with the standard layout (SiLU gate, concatenated gate/up, no
bias), each one checked on a probe input against its own original forward.

Where the MoE block has a shared expert (Qwen2-MoE's, scaled by sigmoid(shared_expert_gate(x));
DeepSeekMoE's and DeepSeek-V2's, added as it is), the block's forward is replaced too, so the
shared expert's two GEMMs run in the same fused call and its row joins the same fixed-order sum:
no separate MLP, no extra add over the hidden states. SHARED_EXPERTS names each family's
attributes; a block is admitted where its shared MLP is plain bias-free SiLU linears and the fused
block reproduces its own forward on a probe input.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .experts import use_experts_implementation
from .patching import PartReport, replace_forward, unpatchable_reason

NAME = "moee_fused"
_SILU = ("silu", "swish")
PROBE_TOLERANCE = 3e-2  # max row relative error, both sides rounded to bf16; another formula is off by O(1)


# block attribute of the shared MLP -> attribute of its scalar gate (None: added ungated), per family:
# Qwen2-MoE (shared_expert, shared_expert_gate), DeepSeekMoE and DeepSeek-V2 (shared_experts).
SHARED_EXPERTS = {"shared_expert": "shared_expert_gate", "shared_experts": None}


def fused_block_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """An MoE block with a shared expert: router, routed and shared experts in one fused call."""
    shape = hidden_states.shape
    flat = hidden_states.reshape(-1, shape[-1])
    _, top_k_weights, top_k_index = self.gate(flat)
    return _fused_block(self, flat, top_k_index, top_k_weights).view(shape)


def _fused_block(block, flat, top_k_index, top_k_weights):
    mlp_name, gate_name = _shared_attributes(block)
    mlp = getattr(block, mlp_name)
    gate_value = None if gate_name is None else torch.sigmoid(getattr(block, gate_name)(flat))
    shared = (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, gate_value)
    return ops.fused_moe_experts(flat, top_k_index, top_k_weights, block.experts.gate_up_proj, block.experts.down_proj,
                                 shared=shared)


def is_silu(act) -> bool:
    """Whether an activation module or function is SiLU (torch's, or transformers' ACT2FN entry)."""
    from transformers.activations import SiLUActivation

    return isinstance(act, (nn.SiLU, SiLUActivation)) or act is torch.nn.functional.silu


def _shared_attributes(block: nn.Module) -> tuple[str, str | None]:
    name = next(name for name in SHARED_EXPERTS if isinstance(getattr(block, name, None), nn.Module))
    return name, SHARED_EXPERTS[name]


def shared_block_reason(block: nn.Module) -> str | None:
    """Why the fused kernels cannot run this block's shared expert, or None."""
    mlp_name, gate_name = _shared_attributes(block)
    mlp = getattr(block, mlp_name)
    linears = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    if gate_name is not None:
        linears.append(getattr(block, gate_name, None))
    if not all(type(linear) is nn.Linear and linear.bias is None for linear in linears):
        return "shared expert not plain bias-free linears"
    if any(linear.weight.dtype != block.experts.gate_up_proj.dtype for linear in linears):
        return "shared expert in another dtype than the routed experts"
    if not is_silu(getattr(mlp, "act_fn", None)):
        return "shared expert activation other than SiLU(gate) * up"
    return unpatchable_reason(block, ())


@torch.no_grad()
def shared_probe_error(block: nn.Module) -> float:
    """Row relative error of the fused block against its routed experts' own forward plus its shared
    expert's own modules, on random routing (the router is left out: its hooks may hold state)."""
    experts = block.experts
    n_experts, _, hidden = experts.gate_up_proj.shape
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(29, hidden, generator=generator).to(experts.gate_up_proj.device, experts.gate_up_proj.dtype)
    weights, index = torch.softmax(torch.randn(29, n_experts, generator=generator), -1).topk(min(4, n_experts), -1)
    index, weights = index.to(x.device), weights.to(x.device, x.dtype)
    mlp_name, gate_name = _shared_attributes(block)
    shared = getattr(block, mlp_name)(x)
    if gate_name is not None:
        shared = torch.sigmoid(getattr(block, gate_name)(x)) * shared
    expected = (type(experts).forward.__wrapped__(experts, x, index, weights) + shared).double()
    got = _fused_block(block, x, index, weights).double()
    error = ((got - expected).norm(dim=1) / expected.norm(dim=1).clamp_min(1e-12)).max()
    return float("nan") if error.isnan() else float(error)


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
    report = use_experts_implementation(model, report, NAME, fused_experts_forward, found)
    if report.applied:
        _fuse_shared_experts(model, report, {id(module) for _, module in found})
    return report


def _fuse_shared_experts(model: nn.Module, report: PartReport, admitted: set[int]) -> None:
    """Replace the forward of each MoE block whose experts were admitted and which has a shared
    expert the fused call can run."""
    for name, block in model.named_modules():
        if id(getattr(block, "experts", None)) not in admitted or not any(
                isinstance(getattr(block, attr, None), nn.Module) for attr in SHARED_EXPERTS):
            continue
        reason = shared_block_reason(block)
        if reason is None and not shared_probe_error(block) <= PROBE_TOLERANCE:  # NaN fails
            reason = "the block with its shared expert computes another formula (probe)"
        if reason is not None:
            report.skip(reason, name)
            continue
        report.undo.append(replace_forward(block, fused_block_forward))
        report.applied.append(f"{name} (shared expert)")
