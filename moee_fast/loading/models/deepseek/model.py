"""DeepSeekMoE (v1: deepseek-moe-16b-base/-chat), natively, without the checkpoint's own code.

Those checkpoints ship `modeling_deepseek.py` and a config with `model_type: "deepseek"`, which
transformers has no class for. This package defines the config (config.py), the base model (no
LM head, here) from transformers' Llama attention, rotary embedding and RMSNorm plus a MoE block
whose experts run through transformers' experts kernels, and the loader (loader.py), which
streams the checkpoint's shards one tensor at a time into a model built on the meta device.

Architecture (as the public config and modeling code define it): layer i is a MoE layer iff
`n_routed_experts` is set, i >= first_k_dense_replace and i % moe_layer_freq == 0, else a dense
gated MLP. A MoE layer scores experts with softmax(x @ gate.T), runs the top
`num_experts_per_tok` experts weighted by their scores (renormalised to sum 1 when
norm_topk_prob), and adds the always-on shared experts (one gated MLP of width
moe_intermediate_size * n_shared_experts).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.integrations import use_experts_implementation
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRMSNorm, LlamaRotaryEmbedding
from transformers.utils.output_capturing import OutputRecorder

from .config import DeepseekConfig

# The router scoring functions this implementation computes: the subset of
# moee_fast.adapters.registry.SCORING_FUNCTIONS that DeepSeekMoE v1 checkpoints use.
IMPLEMENTED_SCORING_FUNCTIONS = ("softmax",)


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
        # The cache argument by position: transformers renamed it (past_key_values, then cache).
        mask = create_causal_mask(self.config, inputs_embeds, attention_mask, None, position_ids=position_ids)
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for layer in self.layers:
            hidden_states = layer(hidden_states, mask, position_embeddings, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states))

