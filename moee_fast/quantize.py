"""4-bit and 8-bit loading through bitsandbytes, as the MoEE paper ran its models.

`quantization_config("nf4")` is the authors' setting: NF4 weights with double quantization and
bfloat16 compute; `"int8"` is LLM.int8(). Both need the optional extra (`pip install
moee-fast[quant]`: bitsandbytes and accelerate); without it the error names it.

What gets quantized: transformers (v5) replaces `nn.Linear` modules with bitsandbytes ones, so
attention projections, dense MLPs and shared experts are stored in 4 or 8 bits. The routed
experts of today's MoE classes are stacked 3-D parameters, not `nn.Linear` modules: they stay in
the load dtype, as do the routers, norms and embeddings. DeepSeekMoE, loaded natively, follows
the same rule (`quantize_linears` before its weights stream in, `quantized_weight` per tensor).
"""

from __future__ import annotations

import torch
from torch import nn

QUANTIZE_CHOICES = ("nf4", "int8")
EXTRA_HINT = "pip install moee-fast[quant]"


def require_quant_extras() -> None:
    """Import bitsandbytes and accelerate, or fail naming the extra that installs them."""
    missing = []
    for module in ("bitsandbytes", "accelerate"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ImportError(f"quantized loading needs {' and '.join(missing)}: {EXTRA_HINT}")


def quantization_config(name: str):
    """The BitsAndBytesConfig for "nf4" (the paper's: NF4, double quantization, bf16 compute) or "int8"."""
    if name not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {name!r}")
    require_quant_extras()
    from transformers import BitsAndBytesConfig

    if name == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def with_quantization(hf_kwargs: dict, quantize: str | None, device: torch.device) -> dict:
    """`hf_kwargs` with `quantize` turned into a quantization_config, and a quantized model placed
    on `device` at load (bitsandbytes models cannot be moved afterwards) unless a device_map is given."""
    if quantize is not None:
        if hf_kwargs.get("quantization_config") is not None:
            raise ValueError("give either quantize or quantization_config, not both")
        hf_kwargs = {**hf_kwargs, "quantization_config": quantization_config(quantize)}
    if hf_kwargs.get("quantization_config") is None:
        return hf_kwargs
    require_quant_extras()
    if hf_kwargs.get("device_map") is None:
        hf_kwargs = {**hf_kwargs, "device_map": {"": str(device)}}
    return hf_kwargs


def _is_bnb_module(module: nn.Module) -> bool:
    return type(module).__module__.startswith("bitsandbytes.")


def quantize_linears(model: nn.Module, config) -> nn.Module:
    """Replace every `nn.Linear` of a model built on the meta device with its bitsandbytes module
    (transformers' own replacement), before any weight is loaded."""
    require_quant_extras()
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    return replace_with_bnb_linear(model, quantization_config=config)


def needs_quantized_weight(module: nn.Module, attr: str) -> bool:
    return attr == "weight" and _is_bnb_module(module)


def quantized_weight(placeholder: nn.Parameter, tensor: torch.Tensor, device: torch.device) -> nn.Parameter:
    """`tensor` quantized into the bitsandbytes parameter type of `placeholder` (the meta weight
    of a Linear4bit / Linear8bitLt), on `device`: what transformers does per checkpoint tensor."""
    import bitsandbytes as bnb

    settings = dict(placeholder.__dict__)
    if isinstance(placeholder, bnb.nn.Params4bit):
        return bnb.nn.Params4bit(tensor, requires_grad=False, **settings).to(device)
    settings.pop("SCB", None)
    return bnb.nn.Int8Params(tensor.to("cpu"), requires_grad=False, **settings).to(device)


# bitsandbytes (0.50) repacks 4-bit weights for its AVX512-BF16 CPU kernel on the first forward,
# and that repacking asserts an output width that is a multiple of 32 and an input width that is a
# multiple of the quantization block (Qwen2-MoE's shared-expert gate has width 1); such modules
# keep bitsandbytes' generic CPU path.
_CPU_PACKING_BLOCK = 32


def avoid_unsupported_cpu_packing(model: nn.Module) -> int:
    """Send 4-bit modules whose shape bitsandbytes' packed CPU kernel cannot take to its generic
    path; returns how many. Harmless on CUDA, where the flag is not read."""
    changed = 0
    for module in model.modules():
        if not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        if module.out_features % _CPU_PACKING_BLOCK or module.in_features % module.weight.blocksize:
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed
