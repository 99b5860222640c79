"""nn.Linear modules run through moee-fast's C++ GEMM (torch.ops.moee_fast.linear) on CPU.

The op (csrc/linear.cpp, AVX2 builds only) packs the activations rather than the weights and
splits rows across threads: at the scaled benchmark shapes it matches MKL ([1700, 256] x
[256, 256]: 136 vs 134 GFLOP/s), and at full-size widths it is faster ([2000, 1024] x
[1024, 1024]: 155 vs 108 GFLOP/s, this 2-core AVX2 VM). Only modules of exactly nn.Linear are
switched; anything else (fp16/bf16, CUDA, gradients) runs F.linear as before.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..extension import cpp_applies
from .patching import PartReport, replace_forward, unpatchable_reason


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    if cpp_applies(x, self.weight):
        return torch.ops.moee_fast.linear(x, self.weight, self.bias)
    return F.linear(x, self.weight, self.bias)


def available() -> bool:
    return cpp_applies() and hasattr(torch.ops.moee_fast, "linear")


def install(model: nn.Module) -> PartReport:
    """Switch every plain fp32 CPU nn.Linear of `model` to the C++ GEMM when it is built."""
    report = PartReport("linears", "C++ linear (fp32 CPU)")
    if not available():
        report.skip("the C++ linear op is not built (needs an AVX2 build)")
        return report
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        reason = unpatchable_reason(module)
        if reason is None and type(module) is not nn.Linear:
            reason = f"{type(module).__name__} is not a plain nn.Linear (quantized or custom)"
        if reason is None and (module.weight.device.type, module.weight.dtype) != ("cpu", torch.float32):
            reason = f"{module.weight.dtype} weights on {module.weight.device.type}: the op takes fp32 CPU"
        if reason is not None:
            report.skip(reason, name)
            continue
        report.undo.append(replace_forward(module, _forward))
        report.applied.append(name)
    return report
