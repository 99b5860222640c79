"""Backend dispatch for the fused ops (Triton on CUDA, C++ on CPU, torch reference)."""

import torch


def gather_router_softmax(router_logits, rows, backend="auto"):
    """Softmax over experts of each sequence's last-token router row, for every MoE layer.

    router_logits: sequence of L tensors [B*T, E]; rows: int64 [B] -> float32 [B, L, E].
    """
    picked = torch.stack([logits.index_select(0, rows) for logits in router_logits], dim=1)
    return torch.softmax(picked.float(), dim=-1)
