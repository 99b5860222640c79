"""One mechanism for every MoE family: find the routers, tap their last-token rows.

A family adapter only says what differs: which model types it covers, how its routers score
experts ("softmax" or "sigmoid"), and, when transformers does not already record its router
logits, which module class is the router. Everything else (hooks, row gathering, the last-layer
trim) lives once in `moee_fast.encoder`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# How a family's routers score experts: the function of the router logits that RW is made of.
SCORING_FUNCTIONS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class Adapter:
    family: str  # the name users see in errors and the README
    model_types: tuple[str, ...]
    scoring: str = "softmax"
    # Router module class name and the index of the logits in its output; None means: take both
    # from the model's `_can_record_outputs["router_logits"]` recorder (transformers v5).
    router_class: str | None = None
    logits_index: int = 0
    # What the paper's bitsandbytes loading quantized besides the linears (every nn.Linear but
    # lm_head of the family's transformers-4.x code): the routers where they were nn.Linear there
    # (DeepSeek's MoEGate held a bare weight, left in the load dtype), and the gating linears that
    # `quantize_routers=False` keeps in full precision along with the routers.
    router_was_linear: bool = True
    gate_linears: tuple[str, ...] = ()

    def routers(self, model: nn.Module) -> list[nn.Module]:
        """The MoE routers of `model`, in layer order (dense layers have none)."""
        target, layer_name = self._router_target(model)
        found = [
            module
            for name, module in model.named_modules()
            if _matches(module, target) and (layer_name is None or name.endswith(layer_name))
        ]
        if not found:
            raise ValueError(f"{type(model).__name__}: no MoE router modules found for the {self.family} adapter")
        return found

    def logits_position(self, model: nn.Module) -> int:
        recorder = _router_recorder(model) if self.router_class is None else None
        return recorder.index if recorder is not None else self.logits_index

    def _router_target(self, model):
        if self.router_class is not None:
            return self.router_class, None
        recorder = _router_recorder(model)
        if recorder is None:
            raise ValueError(f"{type(model).__name__} does not record router logits")
        return recorder.target_class, recorder.layer_name


def _matches(module, target) -> bool:
    if isinstance(target, str):
        return type(module).__name__ == target
    return isinstance(module, target)


def _router_recorder(model: nn.Module):
    recorders = getattr(model, "_can_record_outputs", None) or {}
    recorder = recorders.get("router_logits")
    if recorder is None or isinstance(recorder, (list, tuple)):  # several recorders: ambiguous
        return None
    if isinstance(recorder, type):  # a bare class means "its output", index 0
        from transformers.utils.output_capturing import OutputRecorder

        recorder = OutputRecorder(recorder, index=0)
    return recorder


_REGISTRY: dict[str, Adapter] = {}


def register(adapter: Adapter) -> Adapter:
    if adapter.scoring not in SCORING_FUNCTIONS:
        raise ValueError(f"adapter {adapter.family!r}: scoring must be one of {SCORING_FUNCTIONS}")
    for model_type in adapter.model_types:
        _REGISTRY[model_type] = adapter
    return adapter


def supported_families() -> list[str]:
    return sorted({adapter.family for adapter in _REGISTRY.values()})


def adapter_for(model_type: str, model: nn.Module | None = None) -> Adapter:
    """The adapter of a model type; any other MoE family that records softmax router logits
    gets the generic adapter."""
    if model_type in _REGISTRY:
        return _REGISTRY[model_type]
    if model is not None and _router_recorder(model) is not None:
        return Adapter(family=f"generic ({model_type})", model_types=(model_type,))
    raise ValueError(
        f"model type {model_type!r} is not a supported Mixture-of-Experts model: it has no router "
        f"whose logits moee-fast can read. Supported families: {', '.join(supported_families())}"
    )
