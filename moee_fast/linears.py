"""nn.Linear modules run through moee-fast's C++ GEMM (torch.ops.moee_fast.linear) on CPU.

The op (csrc/linear.cpp, AVX2 builds only) packs the activations rather than the weights and
splits rows across threads: at the scaled benchmark shapes it matches MKL ([1700, 256] x
[256, 256]: 136 vs 134 GFLOP/s), and at full-size widths it is faster ([2000, 1024] x
[1024, 1024]: 155 vs 108 GFLOP/s, this 2-core AVX2 VM). Only modules of exactly nn.Linear are
switched; anything else (fp16/bf16, CUDA, gradients) runs F.linear as before.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.nn import functional as F

from .extension import cpp_applies


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    if cpp_applies(x, self.weight):
        return torch.ops.moee_fast.linear(x, self.weight, self.bias)
    return F.linear(x, self.weight, self.bias)


def available() -> bool:
    return cpp_applies() and hasattr(torch.ops.moee_fast, "linear")


def use_cpp_linears(model: nn.Module) -> int:
    """Switch every nn.Linear of `model` to the C++ GEMM when it is built; returns how many."""
    if not available():
        return 0
    switched = 0
    for module in model.modules():
        if type(module) is nn.Linear and "forward" not in vars(module):
            module.forward = types.MethodType(_forward, module)
            switched += 1
    return switched
