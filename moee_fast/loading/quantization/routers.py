"""Routers in 4 or 8 bits, as the paper's runs held them, scored in fp32.

In the transformers-4.x code the paper ran, most families' routers (`gate`) were `nn.Linear`
modules, so bitsandbytes quantized them like every other linear; transformers 5 makes them
modules with a bare `weight` that its bitsandbytes integration leaves alone. A quantized router
keeps its [E, H] weight as one `QuantizedMatrices` slot (bitsandbytes' own bytes and statistics
for that weight) and decodes it once per forward, in fp32: the logits, and so RW, are computed in
fp32 from the decoded weight whatever the load or compute dtype. Which families' routers were
linears is the adapter's `router_was_linear` (moee_fast.adapters).
"""

from __future__ import annotations

import torch
from torch import nn

from ...adapters import adapter_for
from .experts import QuantizedMatrices, mixed_class


class QuantizedRouter:
    """Mixed into a router's own class (`forward` computes `F.linear(hidden_states, self.weight)`
    and scores it): `weight` is the decoded fp32 weight, the input goes in as fp32."""

    @property
    def weight(self) -> torch.Tensor:
        if not self.quantized_weight.allocated:  # its checkpoint tensor never arrived
            raise ValueError(f"quantized router {type(self).__name__}: no weight was loaded")
        return self.quantized_weight.dequantize(0, torch.float32)

    def forward(self, hidden_states: torch.Tensor):
        return super().forward(hidden_states.float())

    @torch.no_grad()
    def store_weight(self, weight: torch.Tensor) -> None:
        """Quantize the [E, H] checkpoint weight; the parameter is dropped."""
        self.quantized_weight.store(0, weight)
        self._parameters.pop("weight", None)


def quantizable_router(module: nn.Module) -> bool:
    """A router whose only parameter is its 2-D `weight` (no bias, no correction term)."""
    params = dict(module.named_parameters(recurse=False))
    return list(params) == ["weight"] and params["weight"].dim() == 2


def routers_to_quantize(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, router) of every router the paper's setting quantized: none unless the family's
    routers were nn.Linear modules in its transformers-4.x code."""
    adapter = adapter_for(model.config.model_type, model)
    if not adapter.router_was_linear:
        return []
    routers = {id(router) for router in adapter.routers(model)}
    return [(name, module) for name, module in model.named_modules() if id(module) in routers and quantizable_router(module)]


def gate_linears(model: nn.Module) -> list[str]:
    """Module-name patterns of the family's gating linears besides the routers (Qwen2-MoE's
    shared-expert gate), for transformers' modules_to_not_convert."""
    return list(adapter_for(model.config.model_type, model).gate_linears)


def make_quantized_router(router: nn.Module, method: str, blocksize: int = 64, double_quant: bool = True) -> None:
    """Turn a router into a QuantizedRouter with an empty slot, filled by `store_weight`."""
    experts, hidden = router._parameters["weight"].shape
    router.__class__ = mixed_class(QuantizedRouter, type(router), f"Quantized{type(router).__name__}")
    router._is_hf_initialized = True
    router.quantized_weight = QuantizedMatrices(1, experts, hidden, method=method, blocksize=blocksize, double_quant=double_quant)


def is_quantized_router(module: nn.Module) -> bool:
    return isinstance(module, QuantizedRouter)
