"""RMSNorm modules run through a fused kernel.

The families' RMSNorm modules are written as five elementwise ops (pow, mean, add, rsqrt, two
multiplies), each a pass over the activations. On CPU in fp32 the C++ op
torch.ops.moee_fast.rms_norm (csrc/rms_norm.cpp) does it in one pass; elsewhere torch's
`rms_norm`. A module is switched only if, on a probe input, the fused form returns what the
module itself returns, so a family with a different formula (a (1 + weight) scale, a bias, a
norm over another axis) keeps its own forward.

Decoder layers written as the standard pre-norm block (the families' `residual + attention`,
post-attention norm, MLP, `residual + mlp`, checked on the layer class's source, statement by
statement) run `_fused_layer_forward` when their post-attention norm is switched: on fp32 CPU the
residual add and that norm are one pass (torch.ops.moee_fast.add_rms_norm, written over the
attention output in place) and the MLP's output takes the second residual in place, so a layer
allocates two [N, H] tensors fewer and reads its activations twice fewer. Same additions, same
norm: the layer's output is bitwise what its own forward returns.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap

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


def _add_norm(norm: nn.Module, hidden: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual + hidden, norm(residual + hidden)); on fp32 CPU one pass written over `hidden`,
    which must be a tensor nothing else reads (the attention's fresh output)."""
    if (
        _switched(norm)
        and norm.weight.dtype == torch.float32
        and cpp_applies(hidden, residual, norm.weight)
        and hidden.shape == residual.shape
        and hidden.is_contiguous()
        and hasattr(torch.ops.moee_fast, "add_rms_norm")
    ):
        return hidden, torch.ops.moee_fast.add_rms_norm(hidden, residual, norm.weight, norm.variance_epsilon)
    hidden = residual + hidden
    return hidden, norm(hidden)


def _switched(norm: nn.Module) -> bool:
    return getattr(vars(norm).get("forward"), "__func__", None) is _fused_forward


def _fused_layer_forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if args or "past_key_values" in kwargs:  # positional or renamed arguments: the class's own forward sorts them out
        return type(self).forward(self, hidden_states, *args, **kwargs)
    residual = hidden_states
    attended, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
    hidden_states, normed = _add_norm(self.post_attention_layernorm, attended, residual)
    out = self.mlp(normed)
    if (
        isinstance(out, torch.Tensor)
        and out.shape == hidden_states.shape
        and out.dtype == hidden_states.dtype
        and cpp_applies(out, hidden_states)
        and out.data_ptr() not in (hidden_states.data_ptr(), normed.data_ptr())
    ):
        return out.add_(hidden_states)  # x + y == y + x in IEEE arithmetic: the same bits as residual + out
    return hidden_states + out


# The statements of the standard pre-norm decoder layer, as ast.dump prints them; the attention
# call is checked apart (it passes the forward's own arguments through, `**kwargs` last).
_PRE_NORM_BODY = [
    "residual = hidden_states",
    "hidden_states = self.input_layernorm(hidden_states)",
    None,  # hidden_states, _ = self.self_attn(hidden_states=hidden_states, <forward's arguments>, **kwargs)
    "hidden_states = residual + hidden_states",
    "residual = hidden_states",
    "hidden_states = self.post_attention_layernorm(hidden_states)",
    "hidden_states = self.mlp(hidden_states)",
    "hidden_states = residual + hidden_states",
    "return hidden_states",
]


@functools.cache
def _is_pre_norm_layer(cls: type) -> bool:
    """Whether `cls.forward` is, statement for statement, the standard pre-norm layer."""
    try:
        source = textwrap.dedent(inspect.getsource(inspect.unwrap(cls.forward)))
        function = ast.parse(source).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return False
    if not isinstance(function, ast.FunctionDef) or function.args.vararg or not function.args.kwarg:
        return False
    parameters = [a.arg for a in function.args.args + function.args.kwonlyargs]
    body = [s for s in function.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    if len(body) != len(_PRE_NORM_BODY) or parameters[:2] != ["self", "hidden_states"]:
        return False
    for statement, expected in zip(body, _PRE_NORM_BODY):
        if expected is None:
            if not _passes_arguments_to_attention(statement, parameters[2:], function.args.kwarg.arg):
                return False
        elif ast.dump(statement) != ast.dump(ast.parse(expected).body[0]):
            return False
    return True


def _passes_arguments_to_attention(statement, parameters: list[str], kwargs_name: str) -> bool:
    """`hidden_states, _ = self.self_attn(hidden_states=hidden_states, p=p for every other
    parameter p, **kwargs)`: the call our forward makes with **kwargs alone."""
    target = ast.parse("hidden_states, _ = 0").body[0].targets[0]
    call = getattr(statement, "value", None)
    if not (
        isinstance(statement, ast.Assign)
        and ast.dump(statement.targets[0]) == ast.dump(target)
        and isinstance(call, ast.Call)
        and ast.dump(call.func) == ast.dump(ast.parse("self.self_attn").body[0].value)
        and not call.args
    ):
        return False
    named = {k.arg: k.value for k in call.keywords if k.arg is not None}
    spread = [k.value for k in call.keywords if k.arg is None]
    return (
        len(spread) == 1
        and isinstance(spread[0], ast.Name)
        and spread[0].id == kwargs_name
        and set(named) == {"hidden_states", *parameters}
        and all(isinstance(v, ast.Name) and v.id == name for name, v in named.items())
    )


def _install_layers(model: nn.Module, report: PartReport) -> None:
    """Run pre-norm decoder layers whose post-attention norm was switched as `_fused_layer_forward`."""
    for name, module in model.named_modules():
        norm = getattr(module, "post_attention_layernorm", None)
        if norm is None or not all(isinstance(getattr(module, a, None), nn.Module) for a in ("self_attn", "input_layernorm", "mlp")):
            continue
        if not _switched(norm):
            continue  # the norm keeps its own forward (another formula, or hooked): nothing to fuse
        if not _is_pre_norm_layer(type(module)):
            report.skip(f"{type(module).__name__} is not the standard pre-norm layer (residual add left apart)", name)
            continue
        if hasattr(module, "_hf_hook") or "forward" in vars(module):
            report.skip("layer forward hooked or replaced (residual add left apart)", name)
            continue
        report.undo.append(replace_forward(module, _fused_layer_forward))
        report.applied.append(f"{name} (residual add)")


def install(model: nn.Module) -> PartReport:
    """Switch every RMSNorm module of `model` that the fused kernel reproduces, and fuse the
    residual add into the post-attention norm of the standard pre-norm layers."""
    report = PartReport("norms", "C++ rms_norm (and add_rms_norm in pre-norm layers) on fp32 CPU, torch's fused rms_norm otherwise")
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
    _install_layers(model, report)
    return report
