"""The MoEE pooler: HS and RW of each text's last token, split from the carried channels."""

from __future__ import annotations

import math

import torch
from vllm.model_executor.layers.pooler import Pooler

from ..checks import check_alpha
from ..embeddings import unit_rows
from .carry import RowLayout

# What a MoEE pooling model returns per text (the `moee_output` field of its config):
#   "concat": [HS; RW] (H + L*E floats: HS, then each MoE layer's router scores in layer order),
#             the engine adapter splits it back into MoEEmbeddings;
#   "sum":    [HS/|HS|; sqrt(alpha) RW/|RW|], whose dot products are cos(HS) + alpha cos(RW),
#             MoEE(sum)'s score, so any vector store ranks by it.
OUTPUTS = ("concat", "sum")


class MoEEPooler(Pooler):
    def __init__(self, layout: RowLayout, output: str = "concat", alpha: float = 1.0):
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"moee_output must be one of {OUTPUTS}, got {output!r}")
        self.layout, self.output, self.alpha = layout, output, check_alpha(alpha)

    def get_supported_tasks(self):
        return {"embed"}

    def forward(self, hidden_states: torch.Tensor, pooling_metadata) -> torch.Tensor:
        # The last scheduled token of each request; for a request whose prefill continues in a
        # later chunk the runner drops this row, so only a prompt's true last token is returned.
        last = hidden_states[pooling_metadata.get_pooling_cursor().last_token_indices_gpu]
        hs, rw = self.layout.split(last)
        rw = rw.flatten(1)
        if self.output == "sum":
            hs, rw = unit_rows(hs), math.sqrt(self.alpha) * unit_rows(rw)  # MoEEmbeddings.vectors("sum")
        return torch.cat([hs, rw], dim=-1)
