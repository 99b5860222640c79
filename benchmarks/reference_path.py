"""The two baselines every speed claim is measured against, on today's transformers.

The reference path is the published MoEE evaluation loop, faithfully: texts stay in input order,
in fixed batches of 128 with left padding; the full causal-LM forward runs with
`output_hidden_states=True` and `output_router_logits=True` (every layer's hidden state kept, the
LM head computed over the whole vocabulary for every token), then the last position of each row
is read: HS from the last hidden state, RW as the fp32 softmax of each MoE layer's router logits
at that position.

The careful loop is what a user who knows today's transformers writes instead: `AutoModel` (no
LM head), texts sorted by length, batches of 32 right-padded with an attention mask, SDPA
attention, transformers' default experts implementation, `output_router_logits=True`, and each
text's last real row read.
"""

from __future__ import annotations

import torch

CAREFUL_BATCH = 32


def _is_deepseek(path: str) -> bool:
    from transformers import AutoConfig

    import moee_fast.loading.models  # noqa: F401  (registers DeepSeekMoE's config)

    return AutoConfig.from_pretrained(path).model_type == "deepseek"


def _tokenizer(path: str, padding_side: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_reference_model(path: str, dtype=torch.float32, device="cpu"):
    from transformers import AutoModelForCausalLM

    if _is_deepseek(path):
        model = DeepseekCausalLM.from_checkpoint(path, dtype, device)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, _tokenizer(path, "left")


def load_careful_model(path: str, dtype=torch.float32, device="cpu"):
    """The base model with SDPA attention and transformers' default experts, right padding."""
    from transformers import AutoModel

    if _is_deepseek(path):
        from moee_fast.loading.models import load_deepseek

        base = load_deepseek(path, dtype=dtype, device=torch.device(device), attn_implementation="sdpa")
        model = DeepseekCausalLM(base, lm_head=None).eval()
    else:
        model = AutoModel.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    return model, _tokenizer(path, "right")


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


@torch.no_grad()
def careful_encode(model, tokenizer, texts: list[str], batch_size: int = CAREFUL_BATCH):
    """(hs [N, H], rw [N, L, E]) in float32 and input order, the careful loop's way: sorted by
    length, right-padded batches, the base model's last hidden state and router logits read at
    each text's last real token."""
    device = next(model.parameters()).device
    ids = tokenizer(list(texts))["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    hs, rw = [], []
    for start in range(0, len(order), batch_size):
        batch = tokenizer.pad({"input_ids": [ids[i] for i in order[start : start + batch_size]]},
                              padding=True, return_tensors="pt").to(device)
        out = model(**batch, output_router_logits=True)
        last = batch["attention_mask"].sum(dim=1) - 1  # right padding: the last real token
        rows = torch.arange(len(last), device=device)
        hs.append(out.last_hidden_state[rows, last].float().cpu())
        flat_rows = rows * batch["input_ids"].shape[1] + last
        rw.append(torch.stack(
            [torch.softmax(l.reshape(-1, l.shape[-1])[flat_rows].float(), dim=-1) for l in out.router_logits], 1).cpu())
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return torch.cat(hs)[inverse], torch.cat(rw)[inverse]


class DeepseekCausalLM(torch.nn.Module):
    """The baselines' view of DeepSeekMoE: the base model plus an LM head over every token (the
    reference path; None for the careful loop), every layer's hidden state kept and every MoE
    router's logits for all tokens returned, as the checkpoint's own causal-LM code does
    (moee-fast never runs that code, so this stands in)."""

    def __init__(self, model: torch.nn.Module, lm_head: torch.nn.Linear | None):
        super().__init__()
        self.model, self.lm_head = model, lm_head
        from moee_fast.adapters import adapter_for

        adapter = adapter_for(model.config.model_type, model)
        self.routers, self.logits_index = adapter.routers(model), adapter.logits_position(model)

    @classmethod
    def from_checkpoint(cls, path: str, dtype, device):
        """Base model through moee-fast's loader, LM head read from the checkpoint's shards."""
        from safetensors import safe_open

        from moee_fast.loading.checkpoint import weight_files
        from moee_fast.loading.models import load_deepseek

        base = load_deepseek(path, config=None, dtype=dtype, device=torch.device(device))
        _, files = weight_files(path)
        shard = next(file for file, names in files.items() if names is None or "lm_head.weight" in names)
        with safe_open(shard, framework="pt") as f:
            weight = f.get_tensor("lm_head.weight").to(dtype)
        lm_head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=dtype)
        lm_head.weight = torch.nn.Parameter(weight, requires_grad=False)
        return cls(base, lm_head).to(device).eval()

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False, output_router_logits=False, **_):
        from types import SimpleNamespace

        hidden_states, router_logits, handles = [], [], []
        if output_hidden_states:
            for module in (self.model.embed_tokens, *self.model.layers):
                handles.append(module.register_forward_hook(_appender(hidden_states)))
        if output_router_logits:
            for router in self.routers:
                handles.append(router.register_forward_hook(_appender(router_logits, self.logits_index)))
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        if output_hidden_states:
            hidden_states[-1] = out.last_hidden_state  # the last entry is after the final norm
        logits = None if self.lm_head is None else self.lm_head(out.last_hidden_state).float()
        return SimpleNamespace(logits=logits, last_hidden_state=out.last_hidden_state,
                               hidden_states=tuple(hidden_states), router_logits=tuple(router_logits))


def _appender(store: list, index: int | None = None):
    """A forward hook that appends the module's output (or its `index`-th element) to `store`."""
    return lambda module, args, output: store.append(output if index is None else output[index])
