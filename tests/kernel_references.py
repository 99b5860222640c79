"""Float64 references and random inputs for the fused CPU ops (packed attention, sorted experts),
shared by their own tests and the per-instruction-set tests."""

import torch
from torch.nn import functional as F


def float64_attention(q, k, v, lengths, scale, window):
    heads, kv_heads = q.shape[1], k.shape[1]
    out, start = [], 0
    for n in lengths:
        qi, ki, vi = (x[start : start + n].double().transpose(0, 1) for x in (q, k, v))
        ki, vi = (x.repeat_interleave(heads // kv_heads, dim=0) for x in (ki, vi))
        i = torch.arange(n)
        distance = i[:, None] - i[None, :]
        allowed = (distance >= 0) & (distance < (window or max(n, 1)))
        scores = (qi @ ki.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
        out.append((scores.softmax(-1) @ vi).transpose(0, 1))
        start += n
    return torch.cat(out)


ATTENTION_CASES = [  # lengths, heads, kv_heads, dim, window
    ([1, 17, 5, 31, 2], 4, 4, 64, 0),  # short texts, the common case
    ([70, 130, 3], 4, 2, 24, 0),  # grouped-query heads; several query blocks per text
    ([200, 1, 99], 2, 1, 128, 5),  # sliding window, head_dim of two 64-wide slices
    ([300], 3, 3, 72, 0),  # head_dim with a remainder slice
    ([0, 9, 0, 4], 2, 2, 20, 1),  # empty texts, head_dim not a multiple of 8, window of one
]


def attention_inputs(lengths, heads, kv_heads, dim):
    g = torch.Generator().manual_seed(sum(lengths))
    n = sum(lengths)
    q = torch.randn(n, heads, dim, generator=g) * 2
    k, v = (torch.randn(n, kv_heads, dim, generator=g) for _ in range(2))
    return q, k, v, torch.tensor([0] + lengths).cumsum(0)


def make_experts(H, I, E, dtype=torch.float32):
    """transformers' own OLMoE experts module (standard layout: SiLU, concatenated gate/up)."""
    from transformers import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeExperts

    config = OlmoeConfig(hidden_size=H, intermediate_size=I, num_experts=E, num_experts_per_tok=1)
    module = OlmoeExperts(config).to(dtype).requires_grad_(False)
    torch.nn.init.normal_(module.gate_up_proj, std=0.1)
    torch.nn.init.normal_(module.down_proj, std=0.1)
    return module


def routing(T, E, k, seed):
    """Top-k among a random 3/4 of the experts, so some experts receive no token at every T."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=gen)
    logits[:, torch.randperm(E, generator=gen)[: min(E // 4, E - k)]] = -torch.inf
    weights, index = logits.softmax(-1).topk(k, dim=-1)
    return index, weights


def float64_experts(module, hidden, index, weights):
    """The experts' output, a float64 loop over tokens and their top-k slots."""
    gate_up, down = module.gate_up_proj.double(), module.down_proj.double()
    out = torch.zeros(hidden.shape, dtype=torch.float64)
    for t in range(hidden.shape[0]):
        x = hidden[t].double()
        for slot in range(index.shape[1]):
            e = int(index[t, slot])
            gate, up = (gate_up[e] @ x).chunk(2)
            out[t] += float(weights[t, slot]) * (down[e] @ (F.silu(gate) * up))
    return out


def experts_inputs(T, H, I, E, k, seed=0):
    """(experts module, hidden [T, H], top-k index [T, k], routing weights [T, k])."""
    module = make_experts(H, I, E)
    hidden = torch.randn(T, H, generator=torch.Generator().manual_seed(seed + 1))
    index, weights = routing(T, E, k, seed)
    return module, hidden, index, weights
