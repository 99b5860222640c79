"""A CPU-friendly experts implementation, registered with transformers' ExpertsInterface.

transformers' `grouped_mm` path on CPU sorts all (token, expert) pairs into one large gathered
tensor and runs every elementwise step over it; with 64 experts and top-8 that is eight copies
of the activations streamed through memory several times. Here each expert gathers its tokens,
runs its two GEMMs and scatters its weighted output while that slice is still in cache.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

NAME = "moee_sorted"


def sorted_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    if self.has_bias or not self.has_gate or self.is_transposed or not self.is_concatenated or self.has_post_expert_norm:
        from transformers.integrations.moe import grouped_mm_experts_forward

        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    top_k = top_k_index.shape[1]
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=self.num_experts).tolist()
    token_of = order // top_k
    weight_of = top_k_weights.reshape(-1).index_select(0, order).unsqueeze(1)
    final = torch.zeros_like(hidden_states)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        end = start + count
        tokens = token_of[start:end]
        hidden = self._apply_gate(F.linear(hidden_states.index_select(0, tokens), self.gate_up_proj[expert]))
        out = F.linear(hidden, self.down_proj[expert])
        final.index_add_(0, tokens, out.mul_(weight_of[start:end].to(out.dtype)))
        start = end
    return final


def register() -> str:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(NAME, sorted_experts_forward)
    return NAME
