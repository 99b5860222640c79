"""The config of DeepSeekMoE (v1) checkpoints (`model_type: "deepseek"`), which transformers has
no class for. Importing this module registers it with AutoConfig, so reading such a config never
needs the checkpoint's own code."""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig


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


# exist_ok: should transformers ever ship its own "deepseek" config, the loader still gets this one.
AutoConfig.register("deepseek", DeepseekConfig, exist_ok=True)
