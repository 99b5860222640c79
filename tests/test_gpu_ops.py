"""The compiled Triton kernels on a CUDA GPU against float64 torch (marked `gpu`: skipped without one).

The test suite runs Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 unless it is set),
which would not compile anything; so under the interpreter this file reruns itself in a fresh
process with TRITON_INTERPRET=0, where Triton compiles the kernels for the GPU. Outputs are
NaN-poisoned before the kernels write them.
"""

import os
import re
import subprocess
import sys

import pytest
import torch

from moee_fast import MoEEmbeddings, ops, search

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.gpu
compiled = pytest.mark.skipif(
    INTERPRETED and torch.cuda.is_available(),
    reason="interpreted here: test_compiled_kernels_in_a_fresh_process runs these compiled",
)

EXPERT_COUNTS = [8, 60, 64, 160, 256]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SOFTMAX_TOL = 5e-6
# fp32 at each precision (the bounds of moee_fast.checks.PRECISIONS) and half-precision inputs.
COSINE_TOL = {"ieee": 1e-5, "tf32x3": 1e-5, "tf32": 2e-3, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def fresh_generator(device="cuda"):
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    return torch.Generator(device=device).manual_seed(seed)


def max_error(out, ref):
    assert not torch.isnan(out).any(), "NaN in output (an element was not written?)"
    return (out.double() - ref).abs().max().item()


def unit64(x):
    x = x.double().flatten(1)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-8)


def combined64(a_hs, a_rw, b_hs, b_rw, alpha):
    return unit64(a_hs) @ unit64(b_hs).T + alpha * unit64(a_rw) @ unit64(b_rw).T


def embeddings(n, hidden, n_layers, n_experts, dtype, generator, device="cuda"):
    hs = torch.randn(n, hidden, generator=generator, device=device) + 0.5
    rw = torch.softmax(2 * torch.randn(n, n_layers, n_experts, generator=generator, device=device), dim=-1)
    return hs.to(dtype), rw.to(dtype)


@pytest.mark.skipif(not INTERPRETED, reason="this process already compiles the kernels")
def test_compiled_kernels_in_a_fresh_process():
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", __file__], env=env, capture_output=True,
                            text=True, timeout=1800)
    print(result.stdout[-4000:])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    # A child whose tests all skipped (no GPU seen, say) also exits 0: only this test may skip there.
    summary = result.stdout.strip().splitlines()[-1]
    passed, skipped = (int(m.group(1)) if m else 0 for m in (re.search(rf"(\d+) {w}", summary) for w in ("passed", "skipped")))
    assert passed > 0 and skipped == 1, summary


@compiled
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("n_experts", "top_k", "n_tokens"), [(64, 8, 1000), (60, 4, 77), (160, 6, 3), (8, 2, 4096)])
def test_compiled_fused_moe_matches_float64(n_experts, top_k, n_tokens, dtype):
    generator = fresh_generator()
    hidden, intermediate = 1024, 352
    x = torch.randn(n_tokens, hidden, generator=generator, device="cuda").to(dtype)
    weights, index = torch.softmax(torch.randn(n_tokens, n_experts, generator=generator, device="cuda"), -1).topk(top_k, -1)
    gate_up = (torch.randn(n_experts, 2 * intermediate, hidden, generator=generator, device="cuda") / hidden**0.5).to(dtype)
    down = (torch.randn(n_experts, hidden, intermediate, generator=generator, device="cuda") / intermediate**0.5).to(dtype)
    out = torch.full((n_tokens, hidden), float("nan"), dtype=dtype, device="cuda")
    ops.fused_moe_experts(x, index, weights, gate_up, down, out=out)
    expected = torch.zeros(n_tokens, hidden, dtype=torch.float64, device="cuda")
    for e in range(n_experts):
        token, slot = (index == e).nonzero(as_tuple=True)
        h = x[token].double() @ gate_up[e].double().T
        y = (torch.nn.functional.silu(h[:, :intermediate]) * h[:, intermediate:]) @ down[e].double().T
        expected.index_add_(0, token, y * weights[token, slot, None].double())
    assert not out.isnan().any()
    error = ((out.double() - expected).norm(dim=1) / expected.norm(dim=1)).max().item()
    assert error <= (2e-2 if dtype == torch.bfloat16 else 4e-3), error


@compiled
def test_compiled_rms_norm_and_rotary_match_float64():
    generator = fresh_generator()
    x, residual = (torch.randn(1, 777, 2048, generator=generator, device="cuda").to(torch.bfloat16) for _ in range(2))
    weight = (1 + 0.1 * torch.randn(2048, generator=generator, device="cuda")).to(torch.bfloat16)
    normed, stream = ops.rms_norm(x, weight, 1e-6, residual=residual)
    s64 = (x + residual).double()
    expected = weight.double() * s64 / s64.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    assert torch.equal(stream, x + residual)
    assert (normed.double() - expected).abs().max() <= 1.6e-2 * expected.abs().max()
    q = torch.randn(1, 777, 16, 128, generator=generator, device="cuda").to(torch.bfloat16).transpose(1, 2)
    k = torch.randn(1, 777, 4, 128, generator=generator, device="cuda").to(torch.bfloat16).transpose(1, 2)
    angles = torch.randn(1, 777, 64, generator=generator, device="cuda")
    cos, sin = (torch.cat([f(angles)] * 2, -1).to(torch.bfloat16) for f in (torch.cos, torch.sin))
    expected = [t.double() * cos[:, None].double() + torch.cat([-t[..., 64:], t[..., :64]], -1).double() * sin[:, None].double()
                for t in (q, k)]
    ops.rotary_(q, k, cos, sin)
    for t, e in zip((q, k), expected):
        assert (t.double() - e).abs().max() <= 1.6e-2 * e.abs().max()


@compiled
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_experts", EXPERT_COUNTS)
def test_compiled_gather_router_softmax_matches_float64(n_experts, dtype):
    generator = fresh_generator()
    batch, n_layers, tokens = 333, 27, 7
    logits = [(4 * torch.randn(batch * tokens + layer, n_experts, generator=generator, device="cuda")).to(dtype)
              for layer in range(n_layers)]
    rows = torch.arange(batch, device="cuda") * tokens + torch.randint(0, tokens, (batch,), generator=generator, device="cuda")
    out = torch.full((batch, n_layers, n_experts), float("nan"), device="cuda")
    ops.gather_router_softmax(logits, rows, backend="triton", out=out)
    ref = torch.stack([layer.double()[rows] for layer in logits], dim=1).softmax(dim=-1)
    assert max_error(out, ref) <= SOFTMAX_TOL


@compiled
@pytest.mark.parametrize("precision", ["tf32x3", "ieee", "tf32"])
@pytest.mark.parametrize("n_experts", EXPERT_COUNTS)
def test_compiled_fp32_cosine_and_topk_at_each_precision(n_experts, precision):
    generator = fresh_generator()
    a_hs, a_rw = embeddings(130, 2048, 16, n_experts, torch.float32, generator)
    b_hs, b_rw = embeddings(1000, 2048, 16, n_experts, torch.float32, generator)
    ref = combined64(a_hs, a_rw, b_hs, b_rw, 0.7)
    out = torch.full((130, 1000), float("nan"), device="cuda")
    ops.combined_cosine(a_hs, a_rw, b_hs, b_rw, alpha=0.7, backend="triton", out=out, precision=precision)
    error = max_error(out, ref)
    print(f"E={n_experts} {precision}: max abs error {error:.2e}")
    assert error <= COSINE_TOL[precision]
    values, indices = ops.topk_combined_cosine(a_hs, a_rw, b_hs, b_rw, 10, alpha=0.7, backend="triton",
                                               corpus_tile=300, precision=precision)
    assert max_error(values, ref.topk(10, dim=1).values) <= COSINE_TOL[precision]
    assert max_error(values, ref.gather(1, indices)) <= COSINE_TOL[precision]


@compiled
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n_experts", EXPERT_COUNTS)
def test_compiled_half_precision_cosine(n_experts, dtype):
    generator = fresh_generator()
    a_hs, a_rw = embeddings(77, 4096, 27, n_experts, dtype, generator)
    b_hs, b_rw = embeddings(531, 4096, 27, n_experts, dtype, generator)
    out = torch.full((77, 531), float("nan"), device="cuda")
    ops.combined_cosine(a_hs, a_rw, b_hs, b_rw, backend="triton", out=out)
    assert max_error(out, combined64(a_hs, a_rw, b_hs, b_rw, 1.0)) <= COSINE_TOL[dtype]


@compiled
def test_one_query_over_more_rows_than_grid_y_allows():
    """4.3M fp32 corpus rows: 67,188 blocks, past grid.y's 65,535 cap, all on grid.x now."""
    generator = fresh_generator()
    q_hs, q_rw = embeddings(1, 16, 1, 8, torch.float32, generator)
    c_hs, c_rw = embeddings(4_300_000, 16, 1, 8, torch.float32, generator)
    ref = combined64(q_hs, q_rw, c_hs, c_rw, 1.0)
    out = torch.full((1, 4_300_000), float("nan"), device="cuda")
    ops.combined_cosine(q_hs, q_rw, c_hs, c_rw, backend="triton", out=out, precision="ieee")
    assert max_error(out, ref) <= COSINE_TOL["ieee"]
    values, indices = ops.topk_combined_cosine(q_hs, q_rw, c_hs, c_rw, 5, backend="triton", precision="ieee")
    assert max_error(values, ref.topk(5, dim=1).values) <= COSINE_TOL["ieee"]


@compiled
@pytest.mark.parametrize("variant", ["sum", "hs", "rw", "concat"])
def test_search_ranks_nan_rows_last_on_the_gpu(variant):
    """Variants other than sum run with an empty second stream: a null pointer the kernel never reads."""
    generator = fresh_generator()
    q_hs, q_rw = embeddings(3, 64, 2, 8, torch.float32, generator)
    c_hs, c_rw = embeddings(6, 64, 2, 8, torch.float32, generator)
    c_hs[4, 1], c_rw[4, 0, 1] = float("nan"), float("nan")
    q_hs[1, 0], q_rw[1, 0, 0] = float("nan"), float("nan")
    queries, corpus = MoEEmbeddings(q_hs, q_rw), MoEEmbeddings(c_hs, c_rw)
    values, indices = search(queries, corpus, k=6, variant=variant)
    assert ((indices >= 0) & (indices < 6)).all()
    assert values[1].isnan().all() and values[[0, 2], -1].isnan().all() and (indices[[0, 2], -1] == 4).all()
    if variant == "sum":
        expected = combined64(q_hs, q_rw, c_hs, c_rw, 1.0)
    else:
        expected = unit64(queries.vectors(variant)) @ unit64(corpus.vectors(variant)).T
    real = expected[[0, 2]][:, [0, 1, 2, 3, 5]].topk(5, dim=1).values
    assert max_error(values[[0, 2], :-1], real) <= COSINE_TOL["tf32x3"]


@compiled
@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_kernels_run_on_the_inputs_device_not_the_current_one():
    torch.cuda.set_device(0)
    generator = fresh_generator("cuda:1")
    a_hs, a_rw = embeddings(70, 256, 4, 64, torch.float32, generator, device="cuda:1")
    out = torch.full((70, 70), float("nan"), device="cuda:1")
    ops.combined_cosine(a_hs, a_rw, a_hs, a_rw, backend="triton", out=out)
    torch.cuda.synchronize("cuda:1")
    assert max_error(out, combined64(a_hs, a_rw, a_hs, a_rw, 1.0)) <= COSINE_TOL["tf32x3"]
    values, indices = ops.topk_combined_cosine(a_hs, a_rw, a_hs, a_rw, 3, backend="triton")
    assert values.device == indices.device == torch.device("cuda", 1)
    assert (indices[:, 0] == torch.arange(70, device="cuda:1")).all()
    logits = [torch.randn(90, 64, generator=generator, device="cuda:1") for _ in range(3)]
    rows = torch.tensor([0, 44, 89], device="cuda:1")
    probs = ops.gather_router_softmax(logits, rows, backend="triton")
    ref = torch.stack([layer.double()[rows] for layer in logits], dim=1).softmax(dim=-1)
    assert max_error(probs, ref) <= SOFTMAX_TOL
    assert torch.cuda.current_device() == 0
