"""The fused MoE experts (kernels/moe_align.py, moe_gemm.py, moe_sum.py, fused_moe.py) under Triton's
interpreter against float64 torch: odd sizes, E in {8, 60, 64, 160}, top-k in {1, 2, 4, 6, 8},
ragged routing with experts that get no token, shared experts, quantized experts (int8 rows, 4-bit
blocks), each half dtype, outputs NaN-poisoned before the kernels write them."""

import os
from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F

from conftest import NF4_CODE, decode_reference
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


# Quantized experts: int8 rows and 4-bit blocks decoded inside the GEMMs' weight loads, against an
# independent float64 decoding of the same bytes (conftest.decode_reference).

def int8_rows(n_experts, rows, cols, gen):
    from moee_fast.kernels.moe_gemm import Int8Rows

    data = torch.randint(-127, 128, (n_experts, rows, cols), generator=gen, dtype=torch.int8)
    scale = torch.rand(n_experts, rows, generator=gen) * 2 / cols**0.5 + 1e-3
    decoded = torch.stack([decode_reference(data[e], scale[e]) for e in range(n_experts)])
    return Int8Rows(data, scale), decoded


def blockwise_4bit(n_experts, rows, cols, gen, blocksize=64, nested=True):
    from moee_fast.kernels.moe_gemm import NESTED_BLOCKSIZE, Blockwise4Bit

    size = rows * cols
    blocks = -(-size // blocksize)
    data = torch.randint(0, 256, (n_experts, (size + 1) // 2), generator=gen, dtype=torch.uint8)
    code = torch.tensor(NF4_CODE, dtype=torch.float32)
    if nested:
        absmax = torch.randint(0, 256, (n_experts, blocks), generator=gen, dtype=torch.uint8)
        nested_absmax = torch.rand(n_experts, -(-blocks // NESTED_BLOCKSIZE), generator=gen) + 0.5
        nested_code = torch.linspace(-1, 1, 256) * 0.5 / cols**0.5
        offset = torch.rand(n_experts, generator=gen) / cols**0.5 + 1e-2
        quantized = Blockwise4Bit(data, absmax, code, (rows, cols), blocksize, (nested_absmax, nested_code, offset))
    else:
        absmax = torch.rand(n_experts, blocks, generator=gen) * 2 / cols**0.5 + 1e-3
        quantized = Blockwise4Bit(data, absmax, code, (rows, cols), blocksize)

    def state(e):
        state2 = None if not nested else SimpleNamespace(absmax=nested_absmax[e], code=nested_code,
                                                         blocksize=NESTED_BLOCKSIZE)
        return SimpleNamespace(quant_type="nf4", shape=torch.Size((rows, cols)), absmax=absmax[e], blocksize=blocksize,
                               state2=state2, offset=offset[e] if nested else None)

    decoded = torch.stack([decode_reference(data[e], state(e)) for e in range(n_experts)])
    return quantized, decoded


QUANTIZERS = {"int8": int8_rows, "nf4": blockwise_4bit,
              "4bit plain absmax": lambda *a: blockwise_4bit(*a, blocksize=128, nested=False)}


def run_quantized(x, index, weights, gate, up, down, config=TILES):
    out = torch.full(x.shape, float("nan"), dtype=x.dtype)
    assert ops.fused_moe_quantized_experts(x, index, weights, gate, up, down, out=out, config=config) is out
    return out


@pytest.mark.parametrize(("kind", "dtype", "n_experts", "top_k", "n_tokens", "hot", "hidden", "inter"), [
    ("int8", torch.bfloat16, 8, 1, 19, None, 40, 24), ("int8", torch.float16, 64, 2, 29, 2, 41, 23),
    ("int8", torch.bfloat16, 60, 4, 23, 3, 40, 24), ("nf4", torch.bfloat16, 8, 8, 5, None, 41, 23),
    ("nf4", torch.float16, 60, 4, 23, 3, 40, 24), ("nf4", torch.bfloat16, 64, 2, 29, 2, 41, 23),
    ("4bit plain absmax", torch.bfloat16, 64, 8, 11, None, 41, 23), ("4bit plain absmax", torch.float16, 8, 2, 17, None, 40, 24),
    ("nf4", torch.bfloat16, 8, 4, 7, None, 136, 130),  # 277 blocks of 64 over two nested blocks, odd row length (few experts: the interpreter runs each)
])
def test_quantized_experts_equal_float64_of_their_decoded_weights(n_experts, top_k, n_tokens, hot, hidden, inter,
                                                                  kind, dtype):
    gen = fresh_generator()
    x = torch.randn(n_tokens, hidden, generator=gen).to(dtype)
    index, weights = routed(n_tokens, n_experts, top_k, gen, hot)
    (gate, gate64), (up, up64), (down, down64) = (QUANTIZERS[kind](n_experts, *shape, gen)
                                                  for shape in ((inter, hidden), (inter, hidden), (hidden, inter)))
    assert torch.bincount(index.flatten(), minlength=n_experts).eq(0).any() or n_experts == 8
    expected = reference64(x, index, weights, torch.cat([gate64, up64], 1), down64)
    error = max_row_error(run_quantized(x, index, weights, gate, up, down), expected)
    assert error <= TOLERANCE[dtype], error


def test_quantized_experts_with_default_tiles_and_each_token_alone():
    gen = fresh_generator()
    x = torch.randn(70, HIDDEN, generator=gen).to(torch.bfloat16)
    index, weights = routed(70, 60, 4, gen, hot=5)
    (gate, gate64), (up, up64), (down, down64) = (blockwise_4bit(60, *shape, gen)
                                                  for shape in ((INTERMEDIATE, HIDDEN), (INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)))
    batch = run_quantized(x, index, weights, gate, up, down, config=None)
    error = max_row_error(batch, reference64(x, index, weights, torch.cat([gate64, up64], 1), down64))
    assert error <= TOLERANCE[torch.bfloat16], error
    alone = run_quantized(x[3:4], index[3:4], weights[3:4], gate, up, down, config=None)
    assert torch.equal(alone[0], batch[3])


def test_quantized_bad_inputs_are_refused_by_name():
    gen = fresh_generator()
    x = torch.randn(5, HIDDEN, generator=gen).to(torch.bfloat16)
    index, weights = routed(5, 8, 2, gen)
    (gate, _), (up, _), (down, _) = (int8_rows(8, *shape, gen) for shape in ((24, HIDDEN), (24, HIDDEN), (HIDDEN, 24)))
    (gate4, _), = (blockwise_4bit(8, 24, HIDDEN, gen),)
    with pytest.raises(TypeError, match="must all be Int8Rows or all Blockwise4Bit"):
        ops.fused_moe_quantized_experts(x, index, weights, gate4, up, down)
    with pytest.raises(ValueError, match=r"down holds \(8, 40, 23\) weights"):
        ops.fused_moe_quantized_experts(x, index, weights, gate, up, down._replace(data=down.data[:, :, :-1]))
    with pytest.raises(ValueError, match=r"up.scale must be contiguous torch.float32"):
        ops.fused_moe_quantized_experts(x, index, weights, gate, up._replace(scale=up.scale.half()), down)
    with pytest.raises(ValueError, match="top_k_weights"):
        ops.fused_moe_quantized_experts(x, index, weights[:, :1], gate, up, down)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        ops.fused_moe_quantized_experts(x.float(), index, weights, gate, up, down)
