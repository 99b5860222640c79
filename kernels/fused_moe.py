"""Fused MoE experts on CUDA: align pairs by expert, gate_up GEMM with SiLU * up fused, down GEMM
with the routing weight in its epilogue, a fixed-order sum over top-k (plus the shared expert's
row). Launches: a memset and three small kernels to align, two GEMMs, one sum; the shared expert
adds its own alignment (of one expert) and two GEMMs.

Tile configurations come from configs/fused_moe.json, keyed by device name, E, N (the
intermediate size), dtype and a token-count bound; benchmarks/tune_fused_moe.py writes its
entries. A shape it does not list runs DEFAULT_CONFIG (or its small-batch variant).
"""

import functools
import json
from pathlib import Path

import torch

from .moe_align import max_padded_rows, moe_align
from .moe_gemm import Blockwise4Bit, moe_gemm, weight_shape
from .moe_sum import moe_sum

CONFIG_FILE = Path(__file__).resolve().parent / "configs" / "fused_moe.json"
DEFAULT_CONFIG = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
SMALL_BATCH_CONFIG = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=3)
CONFIG_KEYS = set(DEFAULT_CONFIG)
# A 4-bit weight tile is decoded in fp32 registers beside the accumulators: past this depth the
# gate_up GEMM spills on sm_90 with the default tiles.
MAX_BLOCK_K_4BIT = 32


def config_key(device_name: str, n_experts: int, n_cols: int, dtype: torch.dtype) -> str:
    return f"{device_name}|E={n_experts}|N={n_cols}|{str(dtype).removeprefix('torch.')}"


@functools.lru_cache(maxsize=None)
def config_table(path: Path = CONFIG_FILE) -> dict:
    """{key: [[max_tokens, config], ...]} with the bounds ascending; a malformed entry is an error
    that names it (a wrong tile size would fail deep inside a launch)."""
    table = json.loads(path.read_text())["configs"]
    for key, rows in table.items():
        bounds = [bound for bound, _ in rows]
        if bounds != sorted(bounds) or any(set(config) != CONFIG_KEYS for _, config in rows):
            raise ValueError(f"{path.name}: entry {key!r} needs ascending token bounds and exactly {sorted(CONFIG_KEYS)}")
    return table


@functools.lru_cache(maxsize=None)
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def pick_config(device: torch.device, n_experts: int, n_cols: int, dtype: torch.dtype, n_tokens: int) -> dict:
    rows = config_table().get(config_key(_device_name(device), n_experts, n_cols, dtype))
    if rows:
        return next((config for bound, config in rows if n_tokens <= bound), rows[-1][1])
    return SMALL_BATCH_CONFIG if n_tokens <= 64 else DEFAULT_CONFIG


def tiles_for_weights(config: dict, weight) -> dict:
    """The tile configuration a launch on `weight` (dense, Int8Rows or Blockwise4Bit) runs."""
    if isinstance(weight, Blockwise4Bit) and config["BLOCK_K"] > MAX_BLOCK_K_4BIT:
        return dict(config, BLOCK_K=MAX_BLOCK_K_4BIT)
    return config


def fused_moe(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, out, shared=None, config=None):
    """out [T, H] = sum over k of w[t, k] * down[e](SiLU(gate[e] x) * up[e] x), e = top_k_index[t, k],
    plus the shared expert's gate_value * down(SiLU(gate x) * up x) where `shared` = (gate [Is, H],
    up [Is, H], down [H, Is], gate_value [T] or None for 1). gate_up_proj: [E, 2I, H] (gate rows
    first), down_proj: [E, H, I]; every tensor on one CUDA device with unit inner strides."""
    intermediate = gate_up_proj.shape[1] // 2
    return fused_moe_split(hidden_states, top_k_index, top_k_weights, gate_up_proj[:, :intermediate],
                           gate_up_proj[:, intermediate:], down_proj, out, shared, config)


def fused_moe_split(hidden_states, top_k_index, top_k_weights, gate, up, down, out, shared=None, config=None):
    """fused_moe with the gate [E, I, H], up [E, I, H] and down [E, H, I] weights apart: dense
    tensors, or quantized ones (moe_gemm.Int8Rows, moe_gemm.Blockwise4Bit; gate and up of one kind),
    decoded inside the GEMMs' weight loads."""
    n_tokens, top_k = top_k_index.shape
    n_experts, intermediate, _ = weight_shape(gate)
    config = tiles_for_weights(
        config or pick_config(hidden_states.device, n_experts, intermediate, hidden_states.dtype, n_tokens), gate)
    rows = torch.empty(n_tokens * top_k, out.shape[1], dtype=hidden_states.dtype, device=out.device)
    _expert_mlp(hidden_states, top_k_index, gate, up, down, top_k_weights.reshape(-1), rows, config)
    shared_rows = None
    if shared is not None:
        shared_gate, shared_up, shared_down, gate_value = shared
        shared_rows = torch.empty_like(out)
        everyone = torch.zeros(n_tokens, 1, dtype=torch.int32, device=out.device)
        _expert_mlp(hidden_states, everyone, shared_gate[None], shared_up[None], shared_down[None], gate_value,
                    shared_rows, config)
    return moe_sum(rows, top_k, out, shared_rows)


def _expert_mlp(x, top_k_index, gate, up, down, pair_weights, rows, config):
    n_experts, intermediate, _ = weight_shape(gate)
    n_pairs, top_k = top_k_index.numel(), top_k_index.shape[1]
    sorted_pairs, expert_of_block, padded_total = moe_align(top_k_index, n_experts, config["BLOCK_M"])
    hidden = torch.empty(max_padded_rows(n_pairs, n_experts, config["BLOCK_M"]), intermediate, dtype=x.dtype,
                         device=x.device)
    moe_gemm(x, gate, hidden, sorted_pairs, expert_of_block, padded_total, n_pairs, top_k, config,
             up_weight=up, gather_a=True)
    moe_gemm(hidden, down, rows, sorted_pairs, expert_of_block, padded_total, n_pairs, top_k, config,
             scatter_out=True, pair_weights=pair_weights)
