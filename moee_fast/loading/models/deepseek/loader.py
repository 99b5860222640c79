"""Loading a DeepSeekMoE checkpoint: its safetensors (or, opted in, pickle) shards streamed one
tensor at a time into a `DeepseekModel` built on the meta device, quantized as they stream in
when asked, the LM head never read."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from ...checkpoint import NO_REMOTE_CODE, check_weight_files, checkpoint_directory, weight_files
from ...quantization import needs_quantized_weight, quantize_linears, store_quantized
from .config import DeepseekConfig
from .model import DeepseekExperts, DeepseekModel

# Checkpoint tensors the base model does not read: the LM head, and rotary tables some exports keep.
_UNUSED_PREFIXES = ("lm_head.",)
_UNUSED_SUFFIXES = ("rotary_emb.inv_freq",)

# safetensors maps a shard into memory; pages of tensors already copied stay resident until the
# shard is closed, so it is re-opened after this many bytes to keep the loading peak near 1x.
_REOPEN_AFTER_BYTES = 256 * 2**20


@dataclass(frozen=True)
class _Target:
    """Where one checkpoint tensor goes: `module.<attr>`, or a slice of it (stacked experts)."""

    module: nn.Module
    attr: str
    index: tuple | None
    shape: tuple[int, ...]


def checkpoint_plan(model: DeepseekModel) -> dict[str, _Target]:
    """Checkpoint tensor name -> target, for every parameter of `model`. Per-expert checkpoint
    tensors land in slices of the stacked expert weights: gate rows first, then up rows."""
    plan: dict[str, _Target] = {}
    for module_name, module in model.named_modules():
        for attr, param in module.named_parameters(recurse=False):
            if not isinstance(module, DeepseekExperts):
                plan[f"model.{module_name}.{attr}"] = _Target(module, attr, None, tuple(param.shape))
                continue
            width, hidden = module.intermediate_dim, module.hidden_dim
            for expert in range(module.num_experts):
                prefix = f"model.{module_name}.{expert}."
                if attr == "gate_up_proj":
                    plan[prefix + "gate_proj.weight"] = _Target(module, attr, (expert, slice(0, width)), (width, hidden))
                    plan[prefix + "up_proj.weight"] = _Target(module, attr, (expert, slice(width, 2 * width)), (width, hidden))
                else:
                    plan[prefix + "down_proj.weight"] = _Target(module, attr, (expert,), (hidden, width))
    return plan


def _is_unused(name: str) -> bool:
    return name.startswith(_UNUSED_PREFIXES) or name.endswith(_UNUSED_SUFFIXES)


class _Writer:
    """Copies checkpoint tensors into freshly allocated parameters on the target device/dtype."""

    def __init__(self, plan: dict[str, _Target], device: torch.device, dtype: torch.dtype):
        self.plan, self.device, self.dtype = plan, device, dtype
        self.done: set[str] = set()

    def check(self, name: str, shape, source: str) -> bool:
        """False for tensors the base model does not read; raises on unknown names and shapes."""
        if _is_unused(name):
            return False
        target = self.plan.get(name)
        if target is None:
            raise ValueError(f"{source}: tensor {name!r} is not part of a DeepSeekMoE model with this config.json")
        if tuple(shape) != target.shape:
            raise ValueError(
                f"{source}: tensor {name!r} has shape {tuple(shape)} but this config.json gives "
                f"{target.shape}"
            )
        return True

    @torch.no_grad()
    def write(self, name: str, tensor: torch.Tensor) -> None:
        target = self.plan[name]
        if needs_quantized_weight(target.module, target.attr):  # quantized as it streams in: no full-size copy
            store_quantized(target.module, target.attr, target.index, tensor.to(self.dtype), self.device)
            self.done.add(name)
            return
        param = getattr(target.module, target.attr)
        if param.is_meta:
            param = nn.Parameter(torch.empty(param.shape, dtype=self.dtype, device=self.device), requires_grad=False)
            target.module._parameters[target.attr] = param
        (param if target.index is None else param[target.index]).copy_(tensor)
        self.done.add(name)

    def check_complete(self, directory: str) -> None:
        missing = sorted(set(self.plan) - self.done)
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ValueError(f"checkpoint in {directory} lacks {len(missing)} tensor(s) the model needs: {shown}")


def _load_safetensors(writer: _Writer, path: str, names: list[str] | None) -> None:
    from safetensors import safe_open

    source = os.path.basename(path)
    with safe_open(path, framework="pt", device="cpu") as handle:
        available = set(handle.keys())
        wanted = sorted(available) if names is None else sorted(names)
        for name in wanted:
            if name not in available:
                raise ValueError(f"{source}: tensor {name!r} is listed for this shard in the index but missing from it")
        wanted = [name for name in wanted if writer.check(name, handle.get_slice(name).get_shape(), source)]
    while wanted:
        with safe_open(path, framework="pt", device="cpu") as handle:
            copied = 0
            while wanted and copied < _REOPEN_AFTER_BYTES:
                name = wanted.pop(0)
                tensor = handle.get_tensor(name)
                writer.write(name, tensor)
                copied += tensor.nbytes
                del tensor


def _load_pickle(writer: _Writer, path: str, names: list[str] | None) -> None:
    source = os.path.basename(path)
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    for name in sorted(state) if names is None else sorted(names):
        if name not in state:
            raise ValueError(f"{source}: tensor {name!r} is listed for this shard in the index but missing from it")
        tensor = state.pop(name)
        if writer.check(name, tensor.shape, source):
            writer.write(name, tensor)
        del tensor


def resolve_checkpoint(name_or_path: str, *, allow_pickle=False, revision=None, token=None, cache_dir=None,
                       local_files_only=False, subfolder="") -> str:
    """A local directory holding the checkpoint: `name_or_path` itself, or a Hub snapshot of its
    config, tokenizer and weight files."""
    local = checkpoint_directory(name_or_path, subfolder)
    if os.path.isdir(local):
        return local
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*"] + (["*.bin"] if allow_pickle else [])
    if subfolder:
        patterns = [f"{subfolder}/{pattern}" for pattern in patterns]
    root = snapshot_download(
        name_or_path, revision=revision, token=token, cache_dir=cache_dir,
        local_files_only=local_files_only, allow_patterns=patterns,
    )
    return checkpoint_directory(root, subfolder)


def load_deepseek(
    name_or_path: str,
    config: DeepseekConfig | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    *,
    allow_pickle: bool = False,
    attn_implementation: str | None = None,
    experts_implementation: str | None = None,
    revision: str | None = None,
    token=None,
    cache_dir: str | None = None,
    local_files_only: bool = False,
    subfolder: str = "",
    quantization_config=None,
    device_map=None,
    **unsupported,
) -> DeepseekModel:
    """Load a DeepSeekMoE checkpoint (local directory or Hub id) as a `DeepseekModel` in eval mode.

    Weights stream from the safetensors shards into a model built on the meta device, each tensor
    copied once into its parameter on `device` in `dtype`; the LM head is never read. Pickle
    (`.bin`) checkpoints load only with `allow_pickle=True`, through torch.load(weights_only=True).
    With a bitsandbytes `quantization_config`, every nn.Linear weight and every routed expert's
    matrix is quantized as it is read (moee_fast.loading.quantization), so the peak stays near
    the quantized size. `device_map` may only name one device ({"": device}); sharding and
    offload are not supported here.
    """
    device = _single_device(device_map, device)
    if unsupported:
        raise TypeError(f"the DeepSeekMoE loader does not take {', '.join(sorted(unsupported))}")
    directory = resolve_checkpoint(
        os.fspath(name_or_path), allow_pickle=allow_pickle, revision=revision, token=token,
        cache_dir=cache_dir, local_files_only=local_files_only, subfolder=subfolder,
    )
    if config is None:
        config = AutoConfig.from_pretrained(directory, **NO_REMOTE_CODE)
    if not isinstance(config, DeepseekConfig):
        raise TypeError(f"expected a DeepseekConfig, got {type(config).__name__} (model_type {config.model_type!r})")
    config._attn_implementation = attn_implementation
    config._experts_implementation = experts_implementation
    with torch.device("meta"):
        model = DeepseekModel(config)  # checks the config: nothing is allocated yet
    if quantization_config is not None:
        quantize_linears(model, quantization_config)
    kind, files = weight_files(directory, allow_pickle)  # fails on a missing shard before reading any
    check_weight_files(directory, allow_pickle)  # names a truncated or garbage shard before reading any

    model.rotary_emb = LlamaRotaryEmbedding(config).to(device)  # buffers computed, not loaded
    writer = _Writer(checkpoint_plan(model), device, dtype)
    load_file = _load_safetensors if kind == "safetensors" else _load_pickle
    for path, names in files.items():
        load_file(writer, path, names)
    writer.check_complete(directory)
    model.config.dtype = dtype
    return model.eval().requires_grad_(False)


def _single_device(device_map, device) -> torch.device:
    if device_map is None:
        return torch.device(device)
    if isinstance(device_map, dict) and set(device_map) == {""}:
        return torch.device(device_map[""])
    raise ValueError(
        f"the DeepSeekMoE loader places the whole model on one device; device_map={device_map!r} would "
        "shard or offload it; pass device=... instead"
    )

