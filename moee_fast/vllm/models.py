"""MoEE pooling models: vLLM's own implementation of each supported family, with the router
rows carried to the pooler (moee_fast.vllm.carry). One small entry per family."""

from __future__ import annotations

from vllm.model_executor.layers.pooler import DispatchPooler
from vllm.model_executor.models.adapters import as_embedding_model
from vllm.model_executor.models.deepseek_v2 import DeepseekForCausalLM, DeepseekV2ForCausalLM
from vllm.model_executor.models.mixtral import MixtralForCausalLM
from vllm.model_executor.models.olmoe import OlmoeForCausalLM
from vllm.model_executor.models.qwen2_moe import Qwen2MoeForCausalLM
from vllm.model_executor.models.qwen3_moe import Qwen3MoeForCausalLM

from .families import family_adapter
from .carry import carry_router_rows
from .pooler import MoEEPooler


def moee_model(causal_lm: type, gate_in_block: bool) -> type:
    """`causal_lm` as a MoEE embedding model: no LM head, a pooler returning HS and RW.
    gate_in_block: vLLM's MoE block of this family calls its router itself (OLMoE, Qwen2-MoE,
    Mixtral), so the rows come from that call; the others hand the router to the experts' runner,
    and the rows cost one more router GEMM per layer."""

    class MoEEModel(as_embedding_model(causal_lm)):
        def _init_pooler(self, vllm_config, prefix: str = ""):
            # Called once the decoder stack exists: its modules learn to carry the router rows
            # here, before any weight is loaded (their parameter names stay the same).
            _refuse_split_token_streams(vllm_config)
            config = vllm_config.model_config.hf_config
            scoring = getattr(config, "scoring_func", None) or family_adapter(config.model_type).scoring
            layout = carry_router_rows(self.model, scoring, vllm_config.model_config.dtype, gate_in_block)
            output = getattr(config, "moee_output", "concat")
            pooler = MoEEPooler(layout, output, getattr(config, "moee_alpha", 1.0))
            return DispatchPooler({"embed": pooler})

    MoEEModel.__name__ = MoEEModel.__qualname__ = "MoEE" + causal_lm.__name__
    return MoEEModel


def _refuse_split_token_streams(vllm_config) -> None:
    """Layouts in which a rank's decoder layers do not see every token's full hidden state."""
    parallel = vllm_config.parallel_config
    if parallel.pipeline_parallel_size > 1:
        raise ValueError("MoEE models do not run under pipeline parallelism: the router rows of the "
                         "first stages would have to cross stages; use tensor or expert parallelism")
    if getattr(parallel, "use_sequence_parallel_moe", False):
        raise ValueError("MoEE models do not run with sequence-parallel MoE (data + expert parallel): "
                         "each rank's routers would see only its share of the tokens")


MoEEOlmoeForCausalLM = moee_model(OlmoeForCausalLM, gate_in_block=True)
MoEEQwen2MoeForCausalLM = moee_model(Qwen2MoeForCausalLM, gate_in_block=True)
MoEEQwen3MoeForCausalLM = moee_model(Qwen3MoeForCausalLM, gate_in_block=False)
MoEEMixtralForCausalLM = moee_model(MixtralForCausalLM, gate_in_block=True)
MoEEDeepseekForCausalLM = moee_model(DeepseekForCausalLM, gate_in_block=False)
MoEEDeepseekV2ForCausalLM = moee_model(DeepseekV2ForCausalLM, gate_in_block=False)
