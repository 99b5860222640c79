"""4-bit and 8-bit loading through bitsandbytes, as the MoEE paper ran its models.

`quantization_config("nf4")` is the authors' setting: NF4 weights with double quantization and
bfloat16 compute (moee-fast computes in the load dtype: bf16 by default on CUDA, fp32 on CPU);
`"int8"` is LLM.int8(). Both need the optional extra (`pip install moee-fast[quant]`:
bitsandbytes and accelerate); without it the error names it.

What gets quantized is what the paper's runs quantized: every `nn.Linear` of the family's
transformers-4.x code but the LM head. transformers (v5) replaces today's `nn.Linear` modules
(attention projections, dense MLPs, shared experts and their gates) with bitsandbytes ones. The
routed experts are stacked 3-D parameters and the routers bare weights in transformers 5; the
configs built here (`ExpertsBitsAndBytesConfig`) select a quantizer that also stores every
expert's gate, up and down matrix (experts.py) and, where the family's router was an
`nn.Linear` (routers.py), the router in 4 or 8 bits, each tensor quantized as it is loaded.
`quantize_routers=False` keeps the routers and gating linears in the load dtype. Norms and
embeddings stay in the load dtype. DeepSeekMoE, loaded natively, quantizes its `nn.Linear`
weights and each expert's matrices as they stream in (`quantize_linears`, `store_quantized`);
its router, a bare weight in the authors' code too, stays in the load dtype.

On CPU every 4-bit linear runs through moee-fast's fp32 decoder (decoding.py) and a matmul in
its compute dtype: bitsandbytes' CPU decoder is wrong for some shapes and its packed kernel
computes in bf16 whatever the compute dtype.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..checkpoint import import_bitsandbytes  # bitsandbytes' import must not fetch Hub kernels
from .decoding import decode_4bit
from .experts import EXPERT_WEIGHTS, is_quantized_experts, make_quantized, mixed_class, quantizable_experts
from .routers import gate_linears, is_quantized_router, make_quantized_router, routers_to_quantize

QUANTIZE_CHOICES = ("nf4", "int8")
EXTRA_HINT = "pip install moee-fast[quant]"


def require_quant_extras() -> None:
    """Import bitsandbytes and accelerate, or fail naming the extra that installs them."""
    missing = []
    for module, load in (("bitsandbytes", import_bitsandbytes), ("accelerate", lambda: __import__("accelerate"))):
        try:
            load()
        except ImportError:
            missing.append(module)
    if missing:
        raise ImportError(f"quantized loading needs {' and '.join(missing)}: {EXTRA_HINT}")


def quantization_config(name: str, compute_dtype: torch.dtype = torch.bfloat16, quantize_routers: bool = True):
    """The config for "nf4" (the paper's: NF4, double quantization, bf16 compute unless
    `compute_dtype` says otherwise) or "int8", routed experts included, routers too unless
    `quantize_routers` is False: an ExpertsBitsAndBytesConfig."""
    if name not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {name!r}")
    require_quant_extras()
    config_class = experts_config_class()
    if name == "nf4":
        return config_class(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype, quantize_routers=quantize_routers,
        )
    return config_class(load_in_8bit=True, quantize_routers=quantize_routers)


def with_quantized_experts(config, quantize_routers: bool = True):
    """A BitsAndBytesConfig as an ExpertsBitsAndBytesConfig (the same settings, routed experts
    quantized too, routers unless `quantize_routers` is False); any other config unchanged."""
    from transformers import BitsAndBytesConfig

    config_class = experts_config_class()
    if type(config) is BitsAndBytesConfig:
        config = config_class.from_dict({**config.to_dict(), "quantize_routers": quantize_routers})
    elif isinstance(config, config_class):
        config.quantize_routers = config.quantize_routers and quantize_routers
    return config


_QUANT_METHOD = "moee_bitsandbytes"


@functools.cache
def experts_config_class():
    """ExpertsBitsAndBytesConfig, and its two transformers quantizers registered (once) under its
    own quant_method, so plain BitsAndBytesConfig loads keep transformers' behaviour."""
    from transformers import BitsAndBytesConfig
    from transformers.quantizers.auto import register_quantizer
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer
    from transformers.quantizers.quantizer_bnb_8bit import Bnb8BitHfQuantizer

    class ExpertsBitsAndBytesConfig(BitsAndBytesConfig):
        """bitsandbytes' settings, applied to the routed experts' matrices as well, and to the
        routers where the family's were nn.Linear modules (unless quantize_routers is False)."""

        def __init__(self, *args, quantize_routers: bool = True, **kwargs):
            super().__init__(*args, **kwargs)
            self.quantize_routers = quantize_routers
            self.quant_method = f"{_QUANT_METHOD}_{'4bit' if self.load_in_4bit else '8bit'}"

    for bits, base in (("4bit", Bnb4BitHfQuantizer), ("8bit", Bnb8BitHfQuantizer)):
        register_quantizer(f"{_QUANT_METHOD}_{bits}")(type(f"Experts{base.__name__}", (_ExpertsQuantizer, base), {}))
    return ExpertsBitsAndBytesConfig


class _ExpertsQuantizer:
    """Mixed into transformers' bitsandbytes quantizers: before loading, every stacked experts
    module becomes a QuantizedExperts and every router the paper quantized a QuantizedRouter;
    while loading, each of their tensors is quantized as it arrives (an experts tensor expert by
    expert, one layer's tensor in memory at a time) and never kept."""

    def get_modules_to_not_convert(self, model, *args, **kwargs):
        skip = super().get_modules_to_not_convert(model, *args, **kwargs)
        return skip if self.quantization_config.quantize_routers else skip + gate_linears(model)

    def _process_model_before_weight_loading(self, model, device_map, **kwargs):
        super()._process_model_before_weight_loading(model, device_map, **kwargs)
        quantize_experts_modules(model, self.quantization_config, skip=self.modules_to_not_convert)

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        from transformers.quantizers.quantizers_utils import get_module_from_name

        module, attr = get_module_from_name(model, param_name)
        if is_quantized_experts(module) or is_quantized_router(module):
            return needs_quantized_weight(module, attr)
        return super().param_needs_quantization(model, param_name, **kwargs)

    def get_quantize_ops(self):
        return _experts_quantize_op(super().get_quantize_ops())

    def is_serializable(self):
        return False  # the quantized experts have no checkpoint layout


def _experts_quantize_op(linears_op):
    """transformers' quantize op for the bitsandbytes linears, extended to stacked experts."""
    from transformers.core_model_loading import ConversionOps
    from transformers.quantizers.quantizers_utils import get_module_from_name

    class ExpertsQuantize(ConversionOps):
        def convert(self, input_dict, model=None, missing_keys=None, **kwargs):
            rest = {}
            for name, value in input_dict.items():
                module, attr = get_module_from_name(model, name)
                tensor = value[0] if isinstance(value, list) else value
                if is_quantized_experts(module):
                    module.store_stacked(attr, tensor)
                elif is_quantized_router(module):
                    module.store_weight(tensor)
                else:
                    rest[name] = value
                    continue
                if missing_keys is not None:
                    missing_keys.discard(name)  # stored in the quantized slots, not as a parameter
            return linears_op.convert(rest, model=model, missing_keys=missing_keys, **kwargs) if rest else {}

    return ExpertsQuantize()


def with_quantization(hf_kwargs: dict, quantize: str | None, device: torch.device, dtype: torch.dtype,
                      quantize_routers: bool | None = None) -> dict:
    """`hf_kwargs` with `quantize` turned into a quantization_config computing in `dtype` (the
    load dtype), routers quantized unless `quantize_routers` is False, and a quantized model placed
    on `device` at load (bitsandbytes models cannot be moved afterwards) unless a device_map is given."""
    if quantize is not None:
        if hf_kwargs.get("quantization_config") is not None:
            raise ValueError("give either quantize or quantization_config, not both")
        hf_kwargs = {**hf_kwargs, "quantization_config": quantization_config(quantize, compute_dtype=dtype)}
    if hf_kwargs.get("quantization_config") is None:
        if quantize_routers is not None:
            raise ValueError("quantize_routers applies to quantized loading: give quantize or a bitsandbytes quantization_config")
        return hf_kwargs
    require_quant_extras()
    config = with_quantized_experts(hf_kwargs["quantization_config"], quantize_routers is not False)
    hf_kwargs = {**hf_kwargs, "quantization_config": config}
    if hf_kwargs.get("device_map") is None:
        hf_kwargs = {**hf_kwargs, "device_map": {"": str(device)}}
    return hf_kwargs


def _is_bnb_module(module: nn.Module) -> bool:
    """A bitsandbytes module, or one of ours derived from it (run_int8_linears_on_rows)."""
    return any(cls.__module__.startswith("bitsandbytes.") for cls in type(module).__mro__)


def quantize_linears(model: nn.Module, config) -> nn.Module:
    """Replace every `nn.Linear` of a model built on the meta device with its bitsandbytes module
    (transformers' own replacement; the family's gating linears kept unless the config quantizes
    routers), and make every stacked experts module a QuantizedExperts and every router the paper
    quantized a QuantizedRouter, before any weight is loaded."""
    require_quant_extras()
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    skip = None if getattr(config, "quantize_routers", True) else gate_linears(model)
    model = replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=config)
    quantize_experts_modules(model, config, skip=skip)
    return model


def quantize_experts_modules(model: nn.Module, config, skip: list[str] | None = None) -> None:
    """Every stacked experts module not named by `skip` (transformers' module patterns) becomes a
    QuantizedExperts with the config's method (its bnb_4bit_quant_type, or "int8"); so does every
    router the paper's setting quantized, unless the config's quantize_routers is False."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    settings = dict(method=config.bnb_4bit_quant_type if config.load_in_4bit else "int8",
                    double_quant=config.bnb_4bit_use_double_quant)
    for name, module in model.named_modules():
        if quantizable_experts(module) and should_convert_module(name, skip):
            make_quantized(module, **settings)
    if getattr(config, "quantize_routers", True):
        for name, router in routers_to_quantize(model):
            if should_convert_module(name, skip):
                make_quantized_router(router, **settings)


def needs_quantized_weight(module: nn.Module, attr: str) -> bool:
    if is_quantized_experts(module):
        return attr in EXPERT_WEIGHTS
    if is_quantized_router(module):
        return attr == "weight"
    return attr == "weight" and _is_bnb_module(module)


def store_quantized(module: nn.Module, attr: str, index: tuple | None, tensor: torch.Tensor, device: torch.device) -> None:
    """Quantize one checkpoint tensor into `module`: a bitsandbytes linear's weight, or the slice
    `index` of a QuantizedExperts' stacked weight (one expert's gate, up or down matrix)."""

    if is_quantized_experts(module):
        module.store_expert(attr, index, tensor.to(device))
    elif is_quantized_router(module):
        module.store_weight(tensor.to(device))
    else:
        module._parameters[attr] = quantized_weight(module._parameters[attr], tensor, device)


def quantized_weight(placeholder: nn.Parameter, tensor: torch.Tensor, device: torch.device) -> nn.Parameter:
    """`tensor` quantized into the bitsandbytes parameter type of `placeholder` (the meta weight
    of a Linear4bit / Linear8bitLt), on `device`: what transformers does per checkpoint tensor."""
    import bitsandbytes as bnb

    settings = dict(placeholder.__dict__)
    if isinstance(placeholder, bnb.nn.Params4bit):
        return bnb.nn.Params4bit(tensor, requires_grad=False, **settings).to(device)
    settings.pop("SCB", None)
    return bnb.nn.Int8Params(tensor.to("cpu"), requires_grad=False, **settings).to(device)


class _DecodedOnCpu:
    """Runs a 4-bit linear on CPU as moee-fast's fp32 decoding of its weight (decoding.py) and a
    matmul in the module's compute dtype, instead of bitsandbytes' CPU paths (a decoder wrong for
    some shapes, a packed kernel computing in bf16); on other devices, bitsandbytes' forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        compute = self.compute_dtype or x.dtype
        weight = decode_4bit(self.weight.data, self.weight.quant_state).to(compute)
        bias = None if self.bias is None else self.bias.to(compute)
        return torch.nn.functional.linear(x.to(compute), weight, bias).to(x.dtype)


def decode_4bit_linears_on_cpu(model: nn.Module) -> int:
    """Give every bitsandbytes 4-bit linear moee-fast's CPU decoding; returns how many modules.
    The class changes, not the instance, so nothing is patched per call."""
    return _mix_into_bitsandbytes(model, "Linear4bit", _DecodedOnCpu, "Decoded")


class _RowsInputs:
    """Runs an 8-bit linear on its input's rows, flattened to 2-D: bitsandbytes (0.50) quantizes
    activations row-wise but reduces over dim 1 of a 4-D input (DeepSeek-V2's attention gives
    kv_b_proj one) and fails; the rows are the same either way."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() <= 3:
            return super().forward(x)
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


def run_int8_linears_on_rows(model: nn.Module) -> int:
    """Give every bitsandbytes 8-bit linear the 2-D view of inputs with more than 3 dimensions;
    returns how many modules. The class changes, not the instance, so nothing is patched per call."""

    return _mix_into_bitsandbytes(model, "Linear8bitLt", _RowsInputs, "OnRows")


def _mix_into_bitsandbytes(model: nn.Module, class_name: str, mixin: type, suffix: str) -> int:
    """Swap every module of bitsandbytes' class `class_name` for that class with `mixin` in front."""
    changed = 0
    for module in model.modules():
        base = type(module)
        if base.__name__ == class_name and base.__module__.startswith("bitsandbytes."):
            module.__class__ = mixed_class(mixin, base, f"{base.__name__}{suffix}")
            changed += 1
    return changed
