"""nn.Linear modules run through moee-fast's C++ GEMM (torch.ops.moee_fast.linear) on CPU.

The op (csrc/linear.cpp, AVX2 builds only) packs the activations rather than the weights and
splits rows across threads: at the scaled benchmark shapes it matches MKL ([1700, 256] x
[256, 256]: 136 vs 134 GFLOP/s), and at full-size widths it is faster ([2000, 1024] x
[1024, 1024]: 155 vs 108 GFLOP/s, this 2-core AVX2 VM). Only modules of exactly nn.Linear are
switched; anything else (fp16/bf16, CUDA, gradients) runs F.linear as before.

The MoE routers too, whose forwards call F.linear on their own weight (transformers' TopK
routers, not nn.Linear): MKL's GEMM gives a row's logits a summation order that depends on how
many rows share the call and on the thread count, so a text's RW, and through its routing its HS,
changed in the last bits with the batch it ran in. The op's result for a row depends only on that
row, which makes a whole CPU encode bitwise the same whatever the batch and the thread count.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from ..extension import cpp_applies
from .patching import PartReport, replace_forward, unpatchable_reason


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    if cpp_applies(x, self.weight):
        return torch.ops.moee_fast.linear(x, self.weight, self.bias)
    return F.linear(x, self.weight, self.bias)


class _OwnWeightLinear(TorchFunctionMode):
    """Inside a router's forward: F.linear on the router's own weight through the C++ GEMM."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2 and args[1] is self.weight and cpp_applies(args[0], self.weight):
            return torch.ops.moee_fast.linear(*args, **kwargs)
        return func(*args, **kwargs)


def _router_forward(self, *args, **kwargs):
    with _OwnWeightLinear(self.weight):
        return type(self).forward(self, *args, **kwargs)


def available() -> bool:
    return cpp_applies() and hasattr(torch.ops.moee_fast, "linear")


def install(model: nn.Module, routers: list[nn.Module] = ()) -> PartReport:
    """Switch every plain fp32 CPU nn.Linear of `model`, and every router in `routers` that
    multiplies by its own fp32 `weight`, to the C++ GEMM when it is built."""
    report = PartReport("linears", "C++ linear (fp32 CPU)")
    if not available():
        report.skip("the C++ linear op is not built (needs an AVX2 build)")
        return report
    router_ids = {id(r) for r in routers}
    for name, module in model.named_modules():
        is_router = id(module) in router_ids and not isinstance(module, nn.Linear)
        if not (isinstance(module, nn.Linear) or is_router):
            continue
        reason = unpatchable_reason(module)
        if reason is None and not is_router and type(module) is not nn.Linear:
            reason = f"{type(module).__name__} is not a plain nn.Linear (quantized or custom)"
        if reason is None and (module.weight.device.type, module.weight.dtype) != ("cpu", torch.float32):
            reason = f"{module.weight.dtype} weights on {module.weight.device.type}: the op takes fp32 CPU"
        if reason is None and is_router and module.weight.dim() != 2:
            reason = f"a router weight of shape {tuple(module.weight.shape)}, not [experts, hidden]"
        if reason is not None:
            report.skip(reason, name)
            continue
        report.undo.append(replace_forward(module, _router_forward if is_router else _forward))
        report.applied.append(name)
    return report
