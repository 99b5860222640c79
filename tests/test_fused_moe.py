"""The fused MoE experts (kernels/moe_align.py, moe_gemm.py, moe_sum.py, fused_moe.py) under Triton's
interpreter against float64 torch: odd sizes, E in {8, 60, 64, 160}, top-k in {1, 2, 4, 6, 8},
ragged routing with experts that get no token, shared experts, each half dtype, outputs NaN-poisoned
before the kernels write them."""

import os

import pytest
import torch
from torch.nn import functional as F

from moee_fast import ops

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs on CPU tensors in the interpreter")

HIDDEN, INTERMEDIATE, SHARED_INTERMEDIATE = 40, 24, 36  # not multiples of the 16-wide test tiles
TILES = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=3, num_warps=4, num_stages=1)
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3}  # max row relative error


def fresh_generator():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def routed(n_tokens, n_experts, top_k, gen, hot=None):
    """Router top-k over random logits; `hot` experts (a few) get a large bias, so most experts
    get no token at all and a few get many."""
    logits = torch.randn(n_tokens, n_experts, generator=gen)
    if hot is not None:
        logits[:, :hot] += 8.0
    weights, index = torch.softmax(logits, -1).topk(top_k, -1)
    return index, weights


def layer(n_experts, dtype, gen, intermediate=INTERMEDIATE):
    gate_up = (torch.randn(n_experts, 2 * intermediate, HIDDEN, generator=gen) / HIDDEN**0.5).to(dtype)
    down = (torch.randn(n_experts, HIDDEN, intermediate, generator=gen) / intermediate**0.5).to(dtype)
    return gate_up, down


def expert64(x, gate, up, down):
    return F.silu(x @ gate.double().T) * (x @ up.double().T) @ down.double().T


def reference64(x, index, weights, gate_up, down, shared=None):
    x64, out = x.double(), torch.zeros(x.shape, dtype=torch.float64)
    intermediate = gate_up.shape[1] // 2
    for token in range(x.shape[0]):
        for j in range(index.shape[1]):
            e = int(index[token, j])
            y = expert64(x64[token : token + 1], gate_up[e, :intermediate], gate_up[e, intermediate:], down[e])
            out[token] += weights[token, j].double() * y[0]
    if shared is not None:
        gate, up, down_s, gate_value = shared
        y = expert64(x64, gate, up, down_s)
        out += y if gate_value is None else gate_value.double().reshape(-1, 1) * y
    return out


def max_row_error(actual, expected):
    assert not torch.isnan(actual).any(), "NaN in the output: a row was not written"
    return ((actual.double() - expected).norm(dim=1) / expected.norm(dim=1).clamp_min(1e-12)).max().item()


def run(x, index, weights, gate_up, down, shared=None, config=TILES):
    out = torch.full(x.shape, float("nan"), dtype=x.dtype)
    result = ops.fused_moe_experts(x, index, weights, gate_up, down, shared=shared, out=out, config=config)
    assert result is out
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("n_experts", "top_k", "n_tokens", "hot"), [
    (8, 2, 37, None), (8, 8, 5, None), (60, 4, 23, None), (60, 1, 41, 3), (64, 8, 19, None), (64, 6, 29, 2),
    (160, 6, 11, None), (160, 2, 33, 4),
])
def test_routed_experts_equal_float64(n_experts, top_k, n_tokens, hot, dtype):
    gen = fresh_generator()
    x = torch.randn(n_tokens, HIDDEN, generator=gen).to(dtype)
    index, weights = routed(n_tokens, n_experts, top_k, gen, hot)
    gate_up, down = layer(n_experts, dtype, gen)
    assert torch.bincount(index.flatten(), minlength=n_experts).eq(0).any() or n_experts == 8
    error = max_row_error(run(x, index, weights, gate_up, down), reference64(x, index, weights, gate_up, down))
    assert error <= TOLERANCE[dtype], error


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek"])
def test_shared_expert_is_added_in_the_same_sum(family, dtype):
    gen = fresh_generator()
    n_tokens, n_experts, top_k = 21, 60 if family == "qwen2_moe" else 64, 4 if family == "qwen2_moe" else 6
    x = torch.randn(n_tokens, HIDDEN, generator=gen).to(dtype)
    index, weights = routed(n_tokens, n_experts, top_k, gen)
    gate_up, down = layer(n_experts, dtype, gen)
    (shared_gate_up,), (shared_down,) = layer(1, dtype, gen, SHARED_INTERMEDIATE)
    # Qwen2-MoE: sigmoid(shared_expert_gate(x)) scales the shared expert; DeepSeek adds it as it is.
    gate_value = torch.sigmoid(torch.randn(n_tokens, 1, generator=gen)).to(dtype) if family == "qwen2_moe" else None
    shared = (shared_gate_up[:SHARED_INTERMEDIATE], shared_gate_up[SHARED_INTERMEDIATE:], shared_down, gate_value)
    error = max_row_error(run(x, index, weights, gate_up, down, shared),
                          reference64(x, index, weights, gate_up, down, shared))
    assert error <= TOLERANCE[dtype], error


def test_default_tiles_and_a_token_count_not_a_multiple_of_the_block():
    gen = fresh_generator()
    x = torch.randn(70, HIDDEN, generator=gen).to(torch.bfloat16)  # > 64 tokens: the large-batch tiles
    index, weights = routed(70, 64, 8, gen, hot=5)
    gate_up, down = layer(64, torch.bfloat16, gen)
    error = max_row_error(run(x, index, weights, gate_up, down, config=None), reference64(x, index, weights, gate_up, down))
    assert error <= TOLERANCE[torch.bfloat16], error


def test_each_token_alone_gives_the_same_row_bit_for_bit():
    """The sum over k runs in a fixed order and GEMM rows are computed alone: a token's output
    does not depend on its batch."""
    gen = fresh_generator()
    x = torch.randn(17, HIDDEN, generator=gen).to(torch.bfloat16)
    index, weights = routed(17, 60, 4, gen)
    gate_up, down = layer(60, torch.bfloat16, gen)
    batch = run(x, index, weights, gate_up, down)
    for token in (0, 9, 16):
        alone = run(x[token : token + 1], index[token : token + 1], weights[token : token + 1], gate_up, down)
        assert torch.equal(alone[0], batch[token])


def test_alignment_puts_each_pair_once_in_blocks_of_one_expert():
    from moee_fast.kernels.moe_align import max_padded_rows, moe_align

    gen = fresh_generator()
    index, _ = routed(29, 160, 6, gen, hot=2)
    n_pairs, block = index.numel(), 16
    sorted_pairs, expert_of_block, padded_total = moe_align(index.to(torch.int32), 160, block)
    total = int(padded_total)
    assert sorted_pairs.numel() == max_padded_rows(n_pairs, 160, block) and total % block == 0
    used = sorted_pairs[:total]
    real = used[used < n_pairs]
    assert sorted(real.tolist()) == list(range(n_pairs)) and (used[used >= n_pairs] == n_pairs).all()
    flat = index.flatten()
    for b in range(total // block):
        pairs = used[b * block : (b + 1) * block]
        pairs = pairs[pairs < n_pairs]
        assert len(pairs) and (flat[pairs.long()] == expert_of_block[b]).all()
    assert (expert_of_block[total // block :] == 160).all()
    counts = torch.bincount(flat, minlength=160)
    assert total == int(((counts + block - 1) // block * block).sum())


def test_bad_inputs_are_refused_by_name():
    gen = fresh_generator()
    x = torch.randn(5, HIDDEN, generator=gen).to(torch.bfloat16)
    index, weights = routed(5, 8, 2, gen)
    gate_up, down = layer(8, torch.bfloat16, gen)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        ops.fused_moe_experts(x.float(), index, weights, gate_up, down)
    with pytest.raises(ValueError, match="down_proj"):
        ops.fused_moe_experts(x, index, weights, gate_up, down[:, :, :-1])
    with pytest.raises(ValueError, match="top_k_weights"):
        ops.fused_moe_experts(x, index, weights[:, :1], gate_up, down)
    with pytest.raises(ValueError, match="gate_up_proj is torch.float16"):
        ops.fused_moe_experts(x, index, weights, gate_up.half(), down)
    with pytest.raises(ValueError, match="shared gate_value"):
        ops.fused_moe_experts(x, index, weights, gate_up, down,
                              shared=(gate_up[0, :4], gate_up[0, 4:8], down[0, :, :4], torch.ones(3)))
