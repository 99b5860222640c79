"""DeepSeekMoE (v1), whose model moee-fast implements itself (`moee_fast.models.deepseek`): its
routers are found through that model's `router_logits` recorder and score experts with softmax."""

from .registry import Adapter, register

DEEPSEEK_MOE = register(Adapter("DeepSeekMoE", ("deepseek",), router_was_linear=False))
