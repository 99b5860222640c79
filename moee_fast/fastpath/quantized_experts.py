"""Quantized routed experts on CUDA (moee_fast.loading.quantization: bitsandbytes' int8 rows or
NF4/FP4 blocks per expert matrix) through the fused Triton MoE, decoding the weights inside the
GEMMs' weight loads (ops.fused_moe_quantized_experts).

Their own forward loops over the experts in Python, waits for the device to count each expert's
tokens and dequantizes every active expert per batch; here one layer is the fused path's few
launches, with no host synchronisation and no dequantized copy. Admitted per module: quantized
experts in a bf16/fp16 model whose activation is SiLU(gate) * up, each checked on a probe input
against its own forward; the module's forward is replaced (undone by the report).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .fused_experts import is_silu
from .patching import PartReport, replace_forward, unpatchable_reason

_SILU = ("silu", "swish")
PROBE_TOLERANCE = 3e-2  # as fused_experts: both sides round to bf16 differently; another formula is off by O(1)


def kernel_weight(matrices):
    """A QuantizedMatrices' slots as the fused GEMM reads them (kernels/moe_gemm.py)."""
    from ..kernels.moe_gemm import Blockwise4Bit, Int8Rows

    if matrices.method == "int8":
        return Int8Rows(matrices.data, matrices.scale)
    nested = (matrices.nested_absmax, matrices.nested_code, matrices.offset) if matrices.double_quant else None
    return Blockwise4Bit(matrices.data, matrices.absmax, matrices.code, (matrices.rows, matrices.cols),
                         matrices.blocksize, nested)


def quantized_fused_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    return ops.fused_moe_quantized_experts(hidden_states, top_k_index, top_k_weights, kernel_weight(self.gate),
                                           kernel_weight(self.up), kernel_weight(self.down))


def _is_silu(module: nn.Module) -> bool:
    return getattr(getattr(module, "config", None), "hidden_act", None) in _SILU or is_silu(getattr(module, "act_fn", None))


@torch.no_grad()
def probe_error(module: nn.Module, dtype: torch.dtype) -> float:
    """Row relative error of the fused forward against the module's own one on random routing."""
    n_experts, hidden = module.gate.count, module.gate.cols
    generator = torch.Generator().manual_seed(0)
    top_k = min(4, n_experts)
    x = torch.randn(37, hidden, generator=generator).to(module.gate.data.device, dtype)
    weights, index = torch.softmax(torch.randn(37, n_experts, generator=generator), -1).topk(top_k, -1)
    index, weights = index.to(x.device), weights.to(x.device, dtype)
    expected = type(module).forward(module, x, index, weights).double()
    got = quantized_fused_forward(module, x, index, weights).double()
    error = ((got - expected).norm(dim=1) / expected.norm(dim=1).clamp_min(1e-12)).max()
    return float("nan") if error.isnan() else float(error)


def _model_dtype(model: nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def install(model: nn.Module, devices: tuple[str, ...] = ("cuda",)) -> PartReport:
    """Run every quantized experts module through `quantized_fused_forward` where it is admitted.
    `devices`: where the weights may be; a test passes "cpu" to run the kernels in Triton's
    interpreter."""
    report = PartReport("quantized_experts", "Triton fused MoE decoding int8 / 4-bit weights in its GEMMs")
    found = [(name, m) for name, m in model.named_modules() if getattr(m, "runs_own_experts_loop", False)]
    if not found:
        report.skip("no quantized experts modules")
    dtype = _model_dtype(model)
    for name, module in found:
        reason = unpatchable_reason(module, ())
        if reason is None and not all(getattr(module, m).allocated for m in ("gate", "up", "down")):
            reason = "weights not loaded"
        if reason is None and module.gate.data.device.type not in devices:
            reason = f"weights on {module.gate.data.device.type}: the fused kernels run on {', '.join(devices)}"
        if reason is None and "triton" not in ops.available_backends():
            reason = "Triton is not available"
        if reason is None and dtype not in (torch.bfloat16, torch.float16):
            reason = f"{dtype} activations: the fused kernels take bf16/fp16"
        if reason is None and not _is_silu(module):
            reason = "activation other than SiLU(gate) * up"
        if reason is None and not probe_error(module, dtype) <= PROBE_TOLERANCE:  # NaN fails
            reason = f"{type(module).__name__} computes another formula (probe)"
        if reason is not None:
            report.skip(reason, name)
            continue
        report.undo.append(replace_forward(module, quantized_fused_forward))
        report.applied.append(name)
    return report
