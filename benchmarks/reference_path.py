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
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    import moee_fast.models  # noqa: F401  (registers DeepSeekMoE's config)

    if AutoConfig.from_pretrained(path).model_type == "deepseek":
        model = DeepseekCausalLM.from_checkpoint(path, dtype, device)
    else:
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


class DeepseekCausalLM(torch.nn.Module):
    """DeepSeekMoE as its published causal-LM code runs it (transformers has no class for it):
    the base model, every layer's hidden states and all-token router logits kept, and the LM
    head over the whole vocabulary for every token, in fp32."""

    def __init__(self, base, lm_head_weight):
        super().__init__()
        self.model = base
        self.lm_head = torch.nn.Linear(lm_head_weight.shape[1], lm_head_weight.shape[0], bias=False)
        self.lm_head.weight = torch.nn.Parameter(lm_head_weight.to(base.dtype), requires_grad=False)
        self.config = base.config

    @classmethod
    def from_checkpoint(cls, path, dtype, device):
        import json
        import os

        from safetensors import safe_open

        from moee_fast.models import load_deepseek

        base = load_deepseek(path, config=None, dtype=dtype, device=torch.device(device)).eval()
        index = os.path.join(path, "model.safetensors.index.json")
        shard = json.load(open(index))["weight_map"]["lm_head.weight"] if os.path.isfile(index) else "model.safetensors"
        with safe_open(os.path.join(path, shard), framework="pt") as f:
            weight = f.get_tensor("lm_head.weight")
        return cls(base, weight).to(device).eval()

    def forward(self, input_ids, attention_mask=None, output_hidden_states=True, output_router_logits=True):
        from types import SimpleNamespace

        hidden, router_logits = [], []
        hooks = [layer.register_forward_hook(lambda m, a, out: hidden.append(out)) for layer in self.model.layers]
        hooks += [r.register_forward_hook(lambda m, a, out: router_logits.append(out[0])) for r in _routers(self.model)]
        try:
            last = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        finally:
            for hook in hooks:
                hook.remove()
        logits = self.lm_head(last).float()
        return SimpleNamespace(logits=logits, hidden_states=(*hidden[:-1], last), router_logits=tuple(router_logits))


def _routers(model):
    from moee_fast.adapters import adapter_for

    return adapter_for(model.config.model_type, model).routers(model)
