"""RMSNorm modules run through a fused kernel.

The families' RMSNorm modules are written as five elementwise ops (pow, mean, add, rsqrt, two
multiplies), each a pass over the activations. On CPU in fp32 the C++ op
torch.ops.moee_fast.rms_norm (csrc/rms_norm.cpp) does it in one pass; elsewhere torch's
`rms_norm`. A module is switched only if, on a probe input, the fused form returns what the
module itself returns, so a family with a different formula (a (1 + weight) scale, a bias, a
norm over another axis) keeps its own forward.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..extension import cpp_applies
from .patching import PartReport, replace_forward, reproduces, unpatchable_reason


def _fused_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    shape, eps = self.weight.shape, self.variance_epsilon
    if hidden_states.dtype == torch.float32 == self.weight.dtype:
        if cpp_applies(hidden_states, self.weight):
            return torch.ops.moee_fast.rms_norm(hidden_states, self.weight, eps)
        return F.rms_norm(hidden_states, shape, self.weight, eps)
    if hidden_states.is_cuda and hidden_states.dtype in (torch.bfloat16, torch.float16) and self.weight.dtype == hidden_states.dtype:
        from .. import ops

        return ops.rms_norm(hidden_states, self.weight, eps)  # one Triton pass for torch's four
    # Other dtypes round as the modules do: normalise in fp32, cast, then scale.
    return self.weight * F.rms_norm(hidden_states.float(), shape, None, eps).to(hidden_states.dtype)


def _candidate(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__.endswith("RMSNorm")
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 1
        and isinstance(getattr(module, "variance_epsilon", None), float)
        and getattr(module, "bias", None) is None
    )


def _agrees(module: nn.Module) -> bool:
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(5, module.weight.shape[0], generator=generator) * torch.tensor([[1e-3], [0.1], [1.0], [10.0], [300.0]])
    probe = probe.to(module.weight.device, module.weight.dtype)
    tolerance = 1e-5 if probe.dtype == torch.float32 else 1e-2  # rounding passes; any other formula does not
    original = lambda x: type(module).forward(module, x)  # noqa: E731  (the class's own forward, no hooks)
    return reproduces(original, lambda x: _fused_forward(module, x), (probe,), tolerance)


def install(model: nn.Module) -> PartReport:
    """Switch every RMSNorm module of `model` that the fused kernel reproduces."""
    report = PartReport("norms", "C++ rms_norm on fp32 CPU, torch's fused rms_norm otherwise")
    verdict: dict[tuple, bool] = {}  # one probe per (class, dtype, device, eps, shape)
    for name, module in model.named_modules():
        if not _candidate(module):
            continue
        reason = unpatchable_reason(module)
        if reason is not None:
            report.skip(reason, name)
            continue
        key = (type(module), module.weight.dtype, module.weight.device, module.variance_epsilon, module.weight.shape)
        if key not in verdict:
            verdict[key] = _agrees(module)
        if not verdict[key]:
            report.skip(f"{type(module).__name__} computes another formula (probe)", name)
            continue
        report.undo.append(replace_forward(module, _fused_forward))
        report.applied.append(name)
    return report
