"""A CPU-friendly experts implementation, registered with transformers' ExpertsInterface.

transformers' `grouped_mm` path on CPU sorts all (token, expert) pairs into one large gathered
tensor and runs every elementwise step over it; with 64 experts and top-8 that is eight copies
of the activations streamed through memory several times. Here each expert gathers its tokens,
runs its two GEMMs and scatters its weighted output while that slice is still in cache.

The standard layout (SiLU gate, concatenated gate/up weights, no bias) on fp32 CPU tensors runs
the fused C++ op torch.ops.moee_fast.moe_experts (csrc/moe_experts.cpp): the same per-expert
steps with the experts shared among the threads, each running single-threaded GEMMs (its own
AVX2 kernels, switching to AVX-512 ones where the CPU has them, or ATen's matmul on other builds).
Everything else runs `sorted_experts_python`, the readable reference of the same computation.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .patching import PartReport, hold, unpatchable_reason

NAME = "moee_sorted"

# Why the C++ op where it applies: it keeps each expert's slice in cache and shares the experts
# among threads, and its own GEMM kernels skip the per-call weight packing a BLAS GEMM pays
# (measurements: benchmarks/results/cpu_ops_auto.md).
_SILU = ("silu", "swish")
QUANTIZED_REASON = "quantized routed experts: their own loop on CPU, the quantized_experts part on CUDA"


def _use_cpp(self, hidden_states: torch.Tensor) -> bool:
    from transformers.integrations.moe import _default_apply_gate

    from ..extension import cpp_applies

    return (
        cpp_applies(hidden_states, self.gate_up_proj, self.down_proj)  # training takes the Python path
        and getattr(self.config, "hidden_act", None) in _SILU
        and getattr(type(self), "_apply_gate", None) is _default_apply_gate
    )


def sorted_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    if self.has_bias or not self.has_gate or self.is_transposed or not self.is_concatenated or getattr(self, "has_post_expert_norm", False):
        from transformers.integrations.moe import grouped_mm_experts_forward

        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    if _use_cpp(self, hidden_states):
        return torch.ops.moee_fast.moe_experts(hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj)
    return sorted_experts_python(self, hidden_states, top_k_index, top_k_weights)


def sorted_experts_python(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    return sorted_experts_loop(self, hidden_states, top_k_index, top_k_weights,
                               lambda e: self.gate_up_proj[e], lambda e: self.down_proj[e])


def sorted_experts_loop(self, hidden_states, top_k_index, top_k_weights, gate_up_of, down_of):
    """Each expert's tokens gathered, run through `gate_up_of(e)` and `down_of(e)` (its [2I, H] and
    [H, I] weights: stacked slices, or quantized ones dequantized on demand) and scattered back."""
    top_k = top_k_index.shape[1]
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=self.num_experts).tolist()
    token_of = order // top_k
    weight_of = top_k_weights.reshape(-1).index_select(0, order).unsqueeze(1)
    final = torch.zeros_like(hidden_states)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        end = start + count
        tokens = token_of[start:end]
        hidden = self._apply_gate(F.linear(hidden_states.index_select(0, tokens), gate_up_of(expert)))
        out = F.linear(hidden, down_of(expert))
        final.index_add_(0, tokens, out.mul_(weight_of[start:end].to(out.dtype)))
        start = end
    return final


def install(model: nn.Module) -> PartReport:
    """Run every experts module through `sorted_experts_forward` (registered as "moee_sorted"), on
    CPU only: on CUDA the fused_experts part (fused_experts.py) runs them. The implementation is
    chosen per model, so one unpatchable experts module keeps the whole model on its own; quantized
    experts (moee_fast.loading.quantization) run the same loop through their own forward, and are
    named in the report."""

    report = PartReport("experts", f"{NAME} (C++ moe_experts on fp32 CPU, per-expert torch loop otherwise)")
    found = [(name, m) for name, m in model.named_modules() if _is_experts(m)]
    for name, module in model.named_modules():
        if getattr(module, "runs_own_experts_loop", False):  # quantized experts
            report.skip(QUANTIZED_REASON, name)
    for name, module in found:
        reason = unpatchable_reason(module, ("gate_up_proj", "down_proj"))
        if reason is None and module.gate_up_proj.device.type != "cpu":
            reason = f"weights on {module.gate_up_proj.device.type}: transformers' experts kernels run there"
        if reason is not None:
            report.skip(reason, name)
    if not found and not report.skipped:
        report.skip("no stacked experts modules (gate_up_proj, down_proj)")
    return use_experts_implementation(model, report, NAME, sorted_experts_forward, found)


def use_experts_implementation(model: nn.Module, report: PartReport, name: str, forward, found) -> PartReport:
    """Register `forward` as transformers experts implementation `name` and switch the model to it,
    unless the report skipped a module (the implementation is chosen per model); undone by the report."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if report.skipped or not hasattr(model, "set_experts_implementation"):
        return report
    before = model.config._experts_implementation
    report.undo.append(hold(type(ALL_EXPERTS_FUNCTIONS)._global_mapping, name, forward))
    model.set_experts_implementation(name)
    report.undo.append(lambda: model.set_experts_implementation(before))
    report.applied.extend(module_name for module_name, _ in found)
    return report


def _is_experts(module: nn.Module) -> bool:
    return isinstance(getattr(module, "gate_up_proj", None), torch.Tensor) and isinstance(
        getattr(module, "down_proj", None), torch.Tensor
    )
