"""The compiled Triton kernels on a CUDA GPU against float64 torch (marked `gpu`: skipped without one).

The test suite runs Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 unless it is set),
which would not compile anything; so under the interpreter this file reruns itself in a fresh
process with TRITON_INTERPRET=0, where Triton compiles the kernels for the GPU. Outputs are
NaN-poisoned before the kernels write them.
"""

import os
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
