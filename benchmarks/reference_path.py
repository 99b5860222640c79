"""The reference path every speed claim is measured against: the published MoEE evaluation loop,
faithfully, on today's transformers.

Texts stay in input order, in fixed batches of 128 with left padding; the full causal-LM forward
runs with `output_hidden_states=True` and `output_router_logits=True` (every layer's hidden
state kept, the LM head computed over the whole vocabulary for every token), then the last
position of each row is read: HS from the last hidden state, RW as the fp32 softmax of each MoE
layer's router logits at that position.
"""

from __future__ import annotations

import torch


def load_reference_model(path: str, dtype=torch.float32, device="cpu"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


@torch.no_grad()
def reference_encode(model, tokenizer, texts: list[str], batch_size: int = 128, prompt: str | None = None):
    """(hs [N, H], rw [N, L, E]) in float32, the way the published loop computes them."""
    device = next(model.parameters()).device
    hs, rw = [], []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        if prompt is not None:
            chunk = [prompt.replace("{text}", t) for t in chunk]
        batch = tokenizer(chunk, padding=True, return_tensors="pt").to(device)
        out = model(**batch, output_hidden_states=True, output_router_logits=True)
        hs.append(out.hidden_states[-1][:, -1].float().cpu())
        # router_logits: one [B*T, E] tensor per MoE layer; left padding puts every text's last
        # token at position T-1.
        width = batch["input_ids"].shape[1]
        last_rows = torch.arange(len(chunk), device=device) * width + width - 1
        rw.append(torch.stack([torch.softmax(l[last_rows].float(), dim=-1) for l in out.router_logits], 1).cpu())
    return torch.cat(hs), torch.cat(rw)
