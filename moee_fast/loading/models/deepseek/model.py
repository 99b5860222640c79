"""DeepSeekMoE (v1: deepseek-moe-16b-base/-chat), natively, without the checkpoint's own code.

Those checkpoints ship `modeling_deepseek.py` and a config with `model_type: "deepseek"`, which
transformers has no class for. This module defines the config and the base model (no LM head)
from transformers' Llama attention, rotary embedding and RMSNorm, plus a MoE block whose experts
run through transformers' experts kernels, and loads the checkpoint's safetensors shards one
tensor at a time into a model built on the meta device.

Architecture (as the public config and modeling code define it): layer i is a MoE layer iff
`n_routed_experts` is set, i >= first_k_dense_replace and i % moe_layer_freq == 0, else a dense
gated MLP. A MoE layer scores experts with softmax(x @ gate.T), runs the top
`num_experts_per_tok` experts weighted by their scores (renormalised to sum 1 when
norm_topk_prob), and adds the always-on shared experts (one gated MLP of width
moe_intermediate_size * n_shared_experts).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, PreTrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.integrations import use_experts_implementation
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRMSNorm, LlamaRotaryEmbedding
from transformers.utils.output_capturing import OutputRecorder

from ...checkpoint import NO_REMOTE_CODE, check_weight_files, weight_files
from ...quantization import needs_quantized_weight, quantize_linears, store_quantized

# The router scoring functions this implementation computes: the subset of
# moee_fast.adapters.registry.SCORING_FUNCTIONS that DeepSeekMoE v1 checkpoints use.
IMPLEMENTED_SCORING_FUNCTIONS = ("softmax",)

# Checkpoint tensors the base model does not read: the LM head, and rotary tables some exports keep.
_UNUSED_PREFIXES = ("lm_head.",)
_UNUSED_SUFFIXES = ("rotary_emb.inv_freq",)

# safetensors maps a shard into memory; pages of tensors already copied stay resident until the
# shard is closed, so it is re-opened after this many bytes to keep the loading peak near 1x.
_REOPEN_AFTER_BYTES = 256 * 2**20


class DeepseekConfig(PreTrainedConfig):
    """The config of DeepSeekMoE checkpoints (`model_type: "deepseek"`), same keys and defaults
    as the configuration file those checkpoints ship."""

    model_type = "deepseek"

    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 11008
    moe_intermediate_size: int = 1407
    num_hidden_layers: int = 30
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    n_shared_experts: int | None = None
    n_routed_experts: int | None = None
    num_experts_per_tok: int | None = None
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 100000
    eos_token_id: int | list[int] | None = 100001
    pretraining_tp: int | None = 1
    tie_word_embeddings: bool = False
    # config.json carries `rope_theta` and `rope_scaling` ({"type": "linear"|"dynamic", "factor"});
    # transformers folds both into `rope_parameters`, which the Llama rotary embedding reads.
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    head_dim: int | None = None

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__(**kwargs)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.n_routed_experts is not None
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )


def check_supported(config: DeepseekConfig) -> None:
    """Fail before any weight is read on settings this implementation does not reproduce."""
    if config.n_routed_experts is not None and config.scoring_func not in IMPLEMENTED_SCORING_FUNCTIONS:
        raise ValueError(
            f"DeepSeekMoE config has scoring_func={config.scoring_func!r}; this implementation scores "
            f"experts with {', '.join(IMPLEMENTED_SCORING_FUNCTIONS)} only"
        )
    if config.hidden_size != config.num_attention_heads * config.head_dim:
        raise ValueError(
            f"hidden_size {config.hidden_size} is not num_attention_heads {config.num_attention_heads} "
            f"x head_dim {config.head_dim}"
        )


class DeepseekMLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)); dense layers and the shared experts."""

    def __init__(self, config: DeepseekConfig, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DeepseekTopkRouter(nn.Module):
    """The MoE gate. Returns (router_logits [tokens, E], top-k weights, top-k expert ids)."""

    def __init__(self, config: DeepseekConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.hidden_dim = config.hidden_size
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))

    def forward(self, hidden_states):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states, self.weight)
        # The reference code takes the softmax in the model dtype and picks experts from it; the
        # encoder's RW is the fp32 softmax of these logits, computed from its own hook.
        scores = router_logits.softmax(dim=-1)
        top_k_weights, top_k_index = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        if self.top_k > 1 and self.norm_topk_prob:
            top_k_weights = top_k_weights / (top_k_weights.sum(dim=-1, keepdim=True) + 1e-20)
        return router_logits, top_k_weights, top_k_index


@use_experts_implementation
class DeepseekExperts(nn.Module):
    """The routed experts as stacked weights, so transformers' grouped/batched kernels (chosen by
    `config._experts_implementation`) run them; this forward is the "eager" fallback."""

    def __init__(self, config: DeepseekConfig):
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states, top_k_index, top_k_weights):
        output = torch.zeros_like(hidden_states)
        for expert in top_k_index.unique().tolist():
            token_idx, slot = torch.where(top_k_index == expert)
            gate, up = F.linear(hidden_states[token_idx], self.gate_up_proj[expert]).chunk(2, dim=-1)
            expert_out = F.linear(self.act_fn(gate) * up, self.down_proj[expert])
            output.index_add_(0, token_idx, (expert_out * top_k_weights[token_idx, slot, None]).to(output.dtype))
        return output


class DeepseekMoE(nn.Module):
    def __init__(self, config: DeepseekConfig):
        super().__init__()
        self.gate = DeepseekTopkRouter(config)
        self.experts = DeepseekExperts(config)
        self.shared_experts = None
        if config.n_shared_experts:
            self.shared_experts = DeepseekMLP(config, config.moe_intermediate_size * config.n_shared_experts)

    def forward(self, hidden_states):
        shape = hidden_states.shape  # the encoder may feed the last tokens only: keep the input's shape
        flat = hidden_states.reshape(-1, shape[-1])
        _, top_k_weights, top_k_index = self.gate(flat)
        output = self.experts(flat, top_k_index, top_k_weights)
        if self.shared_experts is not None:
            output = output + self.shared_experts(flat)
        return output.view(shape)


class DeepseekDecoderLayer(nn.Module):
    def __init__(self, config: DeepseekConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = DeepseekMoE(config) if config.is_moe_layer(layer_idx) else DeepseekMLP(config, config.intermediate_size)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask, position_embeddings, **kwargs):
        residual = hidden_states
        attn_out, _ = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings=position_embeddings, attention_mask=attention_mask,
            **kwargs,
        )
        hidden_states = residual + attn_out
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class DeepseekModel(PreTrainedModel):
    """DeepSeekMoE decoder without the LM head; `last_hidden_state` is after the final norm.

    Build it with `load_deepseek` (weights from a checkpoint); a bare `DeepseekModel(config)` has
    uninitialised weights.
    """

    config_class = DeepseekConfig
    base_model_prefix = "model"
    _no_split_modules = ["DeepseekDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _can_record_outputs = {"router_logits": OutputRecorder(DeepseekTopkRouter, index=0)}

    def __init__(self, config: DeepseekConfig):
        check_supported(config)
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DeepseekDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, use_cache=None, **kwargs):
        if use_cache:
            raise ValueError("DeepseekModel encodes only: it keeps no KV cache (pass use_cache=False)")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if position_ids is None:
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0)
        mask = create_causal_mask(
            config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=None, position_ids=position_ids
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for layer in self.layers:
            hidden_states = layer(hidden_states, mask, position_embeddings, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states))


# ---------------------------------------------------------------------------------------------
# Loading


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
    local = os.path.join(name_or_path, subfolder) if subfolder else name_or_path
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
    return os.path.join(root, subfolder) if subfolder else root


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
    matrix is quantized as it is read (moee_fast.quantize), so the peak stays near the quantized
    size. `device_map` may only name one device ({"": device}); sharding and offload are not
    supported here.
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


# exist_ok: should transformers ever ship its own "deepseek" config, the loader still gets this one.
AutoConfig.register("deepseek", DeepseekConfig, exist_ok=True)
