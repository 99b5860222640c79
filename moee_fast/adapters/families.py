"""The families moee-fast knows by name. Routers are found through transformers' own
`router_logits` recorder, so each entry is only what differs: names and scoring function."""

from .registry import Adapter, register

MIXTRAL = register(Adapter("Mixtral", ("mixtral",)))
OLMOE = register(Adapter("OLMoE", ("olmoe",)))
QWEN2_MOE = register(Adapter("Qwen2-MoE", ("qwen2_moe",), gate_linears=("shared_expert_gate",)))
# DeepSeekMoE (v1): transformers has no model for it; moee_fast.loading.models.deepseek is ours,
# and records its routers the same way.
DEEPSEEK_MOE = register(Adapter("DeepSeekMoE", ("deepseek",), router_was_linear=False))
DEEPSEEK_V2 = register(Adapter("DeepSeek-V2", ("deepseek_v2",), router_was_linear=False))
# DeepSeek-V3 and its relatives score experts with a sigmoid (plus a bias used only for the
# top-k choice); RW for them is the sigmoid of the router logits, the model's own scores.
DEEPSEEK_V3 = register(Adapter("DeepSeek-V3", ("deepseek_v3",), scoring="sigmoid", router_was_linear=False))
