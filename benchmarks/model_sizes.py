"""Weight memory of the real models in bf16, NF4 and int8, computed from their configs.

Run: python benchmarks/model_sizes.py   (prints the table of docs/memory.md)
Counts the base model moee-fast loads (no LM head): embeddings, attention, routers, experts,
norms. Bytes per weight of a quantized linear, as bitsandbytes stores it:
- NF4 with double quantization: 4 bits, plus one 8-bit absmax per 64 weights, plus one fp32
  scale per 256 absmax values: 0.5 + 1/64 + 4/(64*256) bytes;
- int8 (LLM.int8()): 1 byte, plus one fp32 scale per output row.
Everything else (embeddings, norms, and whatever stays unquantized) is bf16. Settings:
- "every linear": what the paper ran (transformers 4.x held each expert, and the router where it
  was an nn.Linear, as nn.Linear modules; DeepSeekMoE's router was a bare weight, kept bf16);
- "moee-fast": `quantize=`, the same modules as the paper's runs;
- "moee-fast routers bf16": `quantize_routers=False`, routers and the shared-expert gate bf16;
- "transformers 5": its bitsandbytes integration alone, nn.Linear modules only; the stacked
  routed experts and the routers stay bf16.
"""

from __future__ import annotations

from dataclasses import dataclass

NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
BF16_BYTES = 2


@dataclass(frozen=True)
class MoEShape:
    """The key numbers of a published config.json."""

    name: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    experts: int
    expert_width: int  # moe_intermediate_size (Mixtral: intermediate_size)
    shared_width: int = 0  # all shared experts together
    dense_layers: int = 0  # leading dense layers (DeepSeekMoE's first_k_dense_replace)
    dense_width: int = 0
    shared_gate: bool = False  # Qwen2-MoE's sigmoid gate on the shared expert
    router_was_linear: bool = True  # an nn.Linear in the authors' transformers-4.x code


REAL_MODELS = (
    MoEShape("Mixtral-8x7B", vocab=32000, hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, experts=8,
             expert_width=14336),
    MoEShape("DeepSeekMoE-16B", vocab=102400, hidden=2048, layers=28, heads=16, kv_heads=16, head_dim=128, experts=64,
             expert_width=1408, shared_width=2 * 1408, dense_layers=1, dense_width=10944, router_was_linear=False),
    MoEShape("Qwen1.5-MoE-A2.7B", vocab=151936, hidden=2048, layers=24, heads=16, kv_heads=16, head_dim=128, experts=60,
             expert_width=1408, shared_width=5632, shared_gate=True),
    MoEShape("OLMoE-1B-7B", vocab=50304, hidden=2048, layers=16, heads=16, kv_heads=16, head_dim=128, experts=64,
             expert_width=1024),
)


def linear_shapes(m: MoEShape) -> dict[str, list[tuple[int, int]]]:
    """(out, in) of every matrix, grouped: "linear" (nn.Linear in transformers 5, gates aside),
    "gates" (the shared-expert gate), "experts" (stacked routed experts) and "routers"."""
    h = m.hidden
    attention = [(m.heads * m.head_dim, h), (m.kv_heads * m.head_dim, h), (m.kv_heads * m.head_dim, h), (h, m.heads * m.head_dim)]
    moe_layers = m.layers - m.dense_layers
    linear = attention * m.layers + [(m.dense_width, h), (m.dense_width, h), (h, m.dense_width)] * m.dense_layers
    if m.shared_width:
        linear += [(m.shared_width, h), (m.shared_width, h), (h, m.shared_width)] * moe_layers
    gates = [(1, h)] * moe_layers if m.shared_gate else []
    experts = [(m.expert_width, h), (m.expert_width, h), (h, m.expert_width)] * (m.experts * moe_layers)
    return {"linear": linear, "gates": gates, "experts": experts, "routers": [(m.experts, h)] * moe_layers}


def _bytes(shapes, kind: str) -> float:
    if kind == "bf16":
        return sum(o * i for o, i in shapes) * BF16_BYTES
    if kind == "nf4":
        return sum(o * i for o, i in shapes) * NF4_BYTES
    return sum(o * i + 4 * o for o, i in shapes)  # int8 and one fp32 scale per row


def sizes(m: MoEShape) -> dict[str, float]:
    """Bytes of the base model per setting; "params" counts its weights."""
    groups = linear_shapes(m)
    other = (m.vocab * m.hidden + (2 * m.layers + 1) * m.hidden) * BF16_BYTES  # embeddings and norms
    params = sum(o * i for g in groups.values() for o, i in g) + other / BF16_BYTES
    out = {"params": params, "bf16": other + sum(_bytes(g, "bf16") for g in groups.values())}
    quantized_routers, bf16_routers = (groups["routers"], []) if m.router_was_linear else ([], groups["routers"])
    for kind in ("nf4", "int8"):
        weights = groups["linear"] + groups["experts"]
        out[f"{kind} every linear"] = other + _bytes(weights + groups["gates"] + quantized_routers, kind) + _bytes(bf16_routers, "bf16")
        out[f"{kind} moee-fast"] = out[f"{kind} every linear"]
        out[f"{kind} moee-fast routers bf16"] = other + _bytes(weights, kind) + _bytes(groups["gates"] + groups["routers"], "bf16")
        out[f"{kind} transformers 5"] = (other + _bytes(groups["linear"] + groups["gates"], kind)
                                         + _bytes(groups["experts"] + groups["routers"], "bf16"))
    return out


def markdown_table() -> str:
    gb = 1e9
    lines = [
        "| model | parameters (no LM head) | bf16 | NF4, moee-fast = the paper's runs | NF4, routers bf16 | int8, moee-fast "
        "| NF4, transformers 5 alone (experts bf16) |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in REAL_MODELS:
        s = sizes(m)
        routers_bf16 = s["nf4 moee-fast routers bf16"] - s["nf4 moee-fast"]
        lines.append(
            f"| {m.name} | {s['params'] / 1e9:.2f} B | {s['bf16'] / gb:.1f} GB | {s['nf4 moee-fast'] / gb:.1f} GB | "
            f"+{routers_bf16 / 1e6:.1f} MB | {s['int8 moee-fast'] / gb:.1f} GB | {s['nf4 transformers 5'] / gb:.1f} GB |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
