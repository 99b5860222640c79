"""The fused ops on every backend usable here, against float64 torch on fresh random inputs.

Triton runs on CPU tensors in its interpreter (TRITON_INTERPRET=1); its cases are kept few and small.
Every kernel writes into a NaN-poisoned `out`, so an element it never writes fails the test.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import ast  # noqa: E402
import contextlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from moee_fast import ops  # noqa: E402

BACKENDS = [
    pytest.param(name, marks=pytest.mark.skipif(name not in ops.available_backends(), reason=f"{name} not usable here"))
    for name in ("torch", "cpp", "triton")
]
SOFTMAX_TOL = 5e-6
COSINE_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def fresh_generator():
    """Fresh random inputs every run; the seed is printed so pytest shows it with a failure."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def assert_close(out, ref, tol, what):
    """Relative Frobenius error and max abs error both within tol; NaN anywhere fails."""
    assert not torch.isnan(out).any(), f"{what}: NaN in output (an element was not written?)"
    diff = out.double() - ref
    relative = (diff.norm() / ref.norm().clamp_min(1e-30)).item()
    max_abs = diff.abs().max().item() if diff.numel() else 0.0
    assert relative <= tol and max_abs <= tol, f"{what}: relative error {relative:.3g}, max abs {max_abs:.3g} > {tol}"


def reference_cosine(a, b):
    a, b = a.double().flatten(1), b.double().flatten(1)
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-8)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-8)
    return a @ b.T


def reference_combined(a_hs, a_rw, b_hs, b_rw, alpha):
    return reference_cosine(a_hs, b_hs) + alpha * reference_cosine(a_rw, b_rw)


def embeddings(n, hidden, n_layers, n_experts, dtype, generator, rw_3d=False):
    hs = torch.randn(n, hidden, generator=generator).to(dtype)
    rw = torch.softmax(torch.randn(n, n_layers, n_experts, generator=generator), dim=-1).to(dtype)
    return hs, (rw if rw_3d else rw.flatten(1))


# ------------------------------------------------------------------------------ gather + softmax

# (B, L, E, dtype, rows per layer); the last case gives each layer its own row count and a row stride > E.
GATHER_CASES = [
    (1, 1, 8, torch.float32, None),
    (37, 27, 60, torch.bfloat16, None),
    (128, 16, 64, torch.float32, None),
    (53, 3, 64, torch.float32, "ragged"),
]


def router_logits(batch, n_layers, n_experts, dtype, layout, generator):
    tokens = 5
    if layout == "ragged":
        wide = [torch.randn(batch * tokens + 3 * layer, n_experts + 7, generator=generator) for layer in range(n_layers)]
        logits = [w[:, :n_experts].to(dtype) for w in wide]  # row stride n_experts + 7
    else:
        logits = [(4 * torch.randn(batch * tokens, n_experts, generator=generator)).to(dtype) for _ in range(n_layers)]
    rows = torch.arange(batch) * tokens + torch.randint(0, tokens, (batch,), generator=generator)
    return logits, rows


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", GATHER_CASES, ids=lambda c: f"B{c[0]}-L{c[1]}-E{c[2]}-{str(c[3])[6:]}-{c[4]}")
def test_gather_router_softmax_matches_float64(backend, case):
    batch, n_layers, n_experts, dtype, layout = case
    logits, rows = router_logits(batch, n_layers, n_experts, dtype, layout, fresh_generator())
    ref = torch.stack([layer.double()[rows] for layer in logits], dim=1).softmax(dim=-1)
    out = torch.full((batch, n_layers, n_experts), float("nan"))
    result = ops.gather_router_softmax(logits, rows, backend=backend, out=out)
    assert result.data_ptr() == out.data_ptr() and result.dtype == torch.float32
    assert_close(out, ref, SOFTMAX_TOL, f"gather_router_softmax[{backend}]")
    # The encoder's per-layer call: a one-element list, no out.
    single = ops.gather_router_softmax(logits[-1:], rows, backend=backend)
    assert single.shape == (batch, 1, n_experts)
    assert_close(single, ref[:, -1:], SOFTMAX_TOL, f"gather_router_softmax[{backend}] one layer")


def test_gather_router_softmax_is_stable_for_huge_logits():
    logits = [torch.tensor([[1e4, 0.0, -1e4, 1e4 - 1.0]])]
    for backend in ops.available_backends():
        probs = ops.gather_router_softmax(logits, torch.tensor([0]), backend=backend)[0, 0]
        expected = torch.tensor([1.0, 0.0, 0.0, 1.0 / torch.e]).double()
        assert_close(probs, expected / expected.sum(), SOFTMAX_TOL, backend)


# ------------------------------------------------------------------------------ combined cosine

# (Na, Nb, H, L, E, dtype, alpha, rw given as [N, L, E])
COSINE_CASES = [
    (1, 37, 64, 2, 8, torch.float32, 1.0, False),
    (37, 53, 4096, 27, 64, torch.float32, 0.5, False),
    (53, 128, 4096, 27, 64, torch.bfloat16, 1.0, False),
    (128, 37, 300, 16, 60, torch.float32, 2.5, True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", COSINE_CASES, ids=lambda c: f"{c[0]}x{c[1]}-H{c[2]}-L{c[3]}E{c[4]}-{str(c[5])[6:]}")
def test_combined_cosine_matches_float64(backend, case):
    n_a, n_b, hidden, n_layers, n_experts, dtype, alpha, rw_3d = case
    generator = fresh_generator()
    a_hs, a_rw = embeddings(n_a, hidden, n_layers, n_experts, dtype, generator, rw_3d)
    b_hs, b_rw = embeddings(n_b, hidden, n_layers, n_experts, dtype, generator, rw_3d)
    out = torch.full((n_a, n_b), float("nan"))
    result = ops.combined_cosine(a_hs, a_rw, b_hs, b_rw, alpha=alpha, backend=backend, out=out)
    assert result.data_ptr() == out.data_ptr()
    assert_close(out, reference_combined(a_hs, a_rw, b_hs, b_rw, alpha), COSINE_TOL[dtype], f"combined_cosine[{backend}]")


@pytest.mark.parametrize("backend", BACKENDS)
def test_combined_cosine_mixed_stream_dtypes_and_zero_vectors(backend):
    """bf16 hidden states with fp32 routing weights (what the encoder emits), zero rows on both sides."""
    generator = fresh_generator()
    a_hs, a_rw = embeddings(5, 96, 4, 8, torch.float32, generator)
    b_hs, b_rw = embeddings(7, 96, 4, 8, torch.float32, generator)
    a_hs, b_hs = a_hs.bfloat16(), b_hs.bfloat16()
    a_hs[1] = 0
    b_rw[2] = 0
    scores = ops.combined_cosine(a_hs, a_rw, b_hs, b_rw, backend=backend)
    assert torch.isfinite(scores).all()
    assert_close(scores, reference_combined(a_hs, a_rw, b_hs, b_rw, 1.0), COSINE_TOL[torch.bfloat16], backend)
    assert_close(scores[1], reference_cosine(a_rw, b_rw)[1], COSINE_TOL[torch.float32], "zero hs row")


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_empty_second_stream_gives_the_plain_cosine(backend):
    """How similarity and search score the variants other than sum: their vectors, and nothing beside."""
    generator = fresh_generator()
    a, _ = embeddings(19, 70, 1, 8, torch.float32, generator)
    b, _ = embeddings(23, 70, 1, 8, torch.float32, generator)
    a[4] = 0
    nothing_a, nothing_b = a.new_empty(19, 0), b.new_empty(23, 0)
    out = torch.full((19, 23), float("nan"))
    ops.combined_cosine(a, nothing_a, b, nothing_b, alpha=0.0, backend=backend, out=out)
    assert_close(out, reference_cosine(a, b), COSINE_TOL[torch.float32], backend)
    values, indices = ops.topk_combined_cosine(a, nothing_a, b, nothing_b, 4, alpha=0.0, backend=backend, corpus_tile=5)
    assert_close(values, reference_cosine(a, b).gather(1, indices), COSINE_TOL[torch.float32], backend)
    assert_close(values, reference_cosine(a, b).topk(4, dim=1).values, COSINE_TOL[torch.float32], backend)


def test_auto_matches_the_reference_on_cpu():
    generator = fresh_generator()
    a_hs, a_rw = embeddings(9, 32, 2, 8, torch.float32, generator)
    b_hs, b_rw = embeddings(11, 32, 2, 8, torch.float32, generator)
    auto = ops.combined_cosine(a_hs, a_rw, b_hs, b_rw, backend="auto")
    assert_close(auto, reference_combined(a_hs, a_rw, b_hs, b_rw, 1.0), COSINE_TOL[torch.float32], "auto")
    # The interpreter is for testing kernels, never a choice auto makes for CPU tensors.
    for op in ("gather_router_softmax", "combined_cosine", "topk_combined_cosine"):
        assert ops._resolve_backend(op, "auto", torch.device("cpu")) in ("cpp", "torch")


# ----------------------------------------------------------------------------------------- top-k

# (Nq, Nc, H, L, E, k, corpus_tile, dtype): single tile, many tiles with a ragged last one, k = Nc.
TOPK_CASES = [
    (1, 37, 64, 2, 8, 1, None, torch.float32),
    (37, 128, 256, 16, 64, 10, 20, torch.float32),
    (53, 128, 4096, 27, 64, 128, 40, torch.bfloat16),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", TOPK_CASES, ids=lambda c: f"{c[0]}x{c[1]}-k{c[5]}-tile{c[6]}-{str(c[7])[6:]}")
def test_topk_combined_cosine_matches_full_matrix(backend, case):
    n_queries, n_corpus, hidden, n_layers, n_experts, k, corpus_tile, dtype = case
    generator = fresh_generator()
    q_hs, q_rw = embeddings(n_queries, hidden, n_layers, n_experts, dtype, generator)
    c_hs, c_rw = embeddings(n_corpus, hidden, n_layers, n_experts, dtype, generator)
    full = reference_combined(q_hs, q_rw, c_hs, c_rw, 0.7)
    values = torch.full((n_queries, k), float("nan"))
    indices = torch.full((n_queries, k), -1, dtype=torch.int64)
    ops.topk_combined_cosine(
        q_hs, q_rw, c_hs, c_rw, k, alpha=0.7, backend=backend, out=(values, indices), corpus_tile=corpus_tile
    )
    tol = COSINE_TOL[dtype]
    assert_close(values, full.topk(k, dim=1).values, tol, f"top-k values[{backend}]")
    assert (values[:, :-1] >= values[:, 1:]).all(), "values are not descending"
    assert ((indices >= 0) & (indices < n_corpus)).all()
    assert all(len(set(row.tolist())) == k for row in indices), "an index repeats within a row"
    # Indices point at their values (ties may pick different rows with the same value).
    assert_close(values, full.gather(1, indices), tol, f"top-k indices[{backend}]")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "triton"])  # the interpreter is slow
def test_topk_memory_grows_with_tile_not_corpus(backend):
    """1,000 queries x 200,000 passages: the full fp32 score matrix alone would be 800 MB."""
    n_queries, n_corpus, k, corpus_tile = 1000, 200_000, 10, 4096
    script = textwrap.dedent(f"""
        import resource, torch
        from moee_fast import ops
        g = torch.Generator().manual_seed(0)
        q_hs, q_rw = torch.randn({n_queries}, 8, generator=g), torch.rand({n_queries}, 8, generator=g)
        c_hs, c_rw = torch.randn({n_corpus}, 8, generator=g), torch.rand({n_corpus}, 8, generator=g)
        ops.topk_combined_cosine(q_hs[:2], q_rw[:2], c_hs[:64], c_rw[:64], 3, backend="{backend}")  # load everything
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        values, indices = ops.topk_combined_cosine(q_hs, q_rw, c_hs, c_rw, {k}, backend="{backend}", corpus_tile={corpus_tile})
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert values.shape == ({n_queries}, {k}) and int(indices.max()) < {n_corpus}
        print((after - before) * 1024)
    """)
    # glibc would otherwise keep freed tile buffers in its heap, so RSS would count memory no longer in use.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    peak_growth = int(result.stdout.split()[-1])
    full_matrix = n_queries * n_corpus * 4
    one_tile = n_queries * (k + corpus_tile) * 4
    # The C++ op holds one tile of scores; the torch reference four tile-sized buffers at once (scores,
    # their concat with the running top-k, int64 candidate indices). Both are far below the full matrix.
    assert peak_growth < 6 * one_tile, f"peak grew {peak_growth / 2**20:.0f} MiB for a {one_tile / 2**20:.0f} MiB tile"
    assert peak_growth < full_matrix / 8


# ------------------------------------------------------------------------------------ bad inputs


def pair(n, hidden=16, rw_width=8, dtype=torch.float32):
    return torch.randn(n, hidden, dtype=dtype), torch.rand(n, rw_width, dtype=dtype)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(b_hs=torch.randn(4, 12)), ValueError, "a_hs width 16 != b_hs width 12"),
        (dict(b_rw=torch.rand(4, 9)), ValueError, "a_rw width 8 != b_rw width 9"),
        (dict(b_hs=torch.randn(4, 16, dtype=torch.bfloat16)), TypeError, "a_hs is torch.float32 but b_hs is torch.bfloat16"),
        (dict(b_rw=torch.rand(4, 8, dtype=torch.float64)), TypeError, "a_rw is torch.float32 but b_rw is torch.float64"),
        (dict(b_hs=torch.randn(4, 16, device="meta")), ValueError, "b_hs is on meta but a_hs is on cpu"),
        (dict(out=torch.empty(3, 4, device="meta")), ValueError, "out is on meta but the inputs are on cpu"),
        (dict(precision="fp16"), ValueError, "precision must be one of tf32x3, ieee, tf32"),
        (dict(b_rw=torch.rand(5, 8)), ValueError, "b_hs has 4 rows but b_rw has 5"),
        (dict(alpha=float("nan")), ValueError, "alpha .*must be a finite number"),
        (dict(alpha=float("inf")), ValueError, "alpha .*must be a finite number"),
        (dict(alpha=-0.5), ValueError, "alpha .*must be a finite number >= 0"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
        (dict(out=torch.empty(3, 3)), ValueError, r"out must be a torch.float32 tensor of shape \(3, 4\)"),
    ],
)
def test_combined_cosine_rejects_bad_input(change, error, message):
    a_hs, a_rw = pair(3)
    b_hs, b_rw = pair(4)
    kwargs = {**dict(a_hs=a_hs, a_rw=a_rw, b_hs=b_hs, b_rw=b_rw), **change}
    with pytest.raises(error, match=message):
        ops.combined_cosine(**kwargs)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(k=0), r"k must be an integer in \[1, Nc=6\], got 0"),
        (dict(k=7), r"k must be an integer in \[1, Nc=6\], got 7"),
        (dict(c_hs=torch.randn(6, 15)), "q_hs width 16 != c_hs width 15"),
        (dict(c_rw=torch.rand(6, 2, 3)), "q_rw width 8 != c_rw width 6"),
        (dict(alpha=float("-inf")), "alpha .*must be a finite number"),
        (dict(corpus_tile=0), "corpus_tile must be an integer >= 1"),
        (dict(k=True), r"k must be an integer in \[1, Nc=6\], got True"),
        (dict(k=2.0), r"k must be an integer in \[1, Nc=6\], got 2.0"),
        (dict(c_rw=torch.rand(6, 8, device="meta")), "c_rw is on meta but q_hs is on cpu"),
        (dict(out=(torch.empty(3, 2), torch.empty(3, 2, dtype=torch.int64, device="meta"))),
         r"out\[1\] \(indices\) is on meta but the inputs are on cpu"),
    ],
)
def test_topk_combined_cosine_rejects_bad_input(change, message):
    q_hs, q_rw = pair(3)
    c_hs, c_rw = pair(6)
    kwargs = {**dict(q_hs=q_hs, q_rw=q_rw, c_hs=c_hs, c_rw=c_rw, k=2), **change}
    with pytest.raises(ValueError, match=message):
        ops.topk_combined_cosine(**kwargs)


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("bad_row", [10, -1])
def test_gather_router_softmax_rejects_rows_out_of_range(backend, bad_row):
    logits = [torch.randn(12, 8), torch.randn(10, 8)]  # the shorter layer bounds the valid rows
    with pytest.raises(IndexError, match=f"rows holds {bad_row}, out of range for router logits with 10 rows"):
        ops.gather_router_softmax(logits, torch.tensor([0, bad_row]), backend=backend)


@pytest.mark.parametrize(
    "logits, rows, error, message",
    [
        ([], torch.tensor([0]), ValueError, "router_logits must be a non-empty sequence"),
        (torch.randn(4, 8), torch.tensor([0]), ValueError, "router_logits must be a non-empty sequence"),
        ([torch.randn(4, 8), torch.randn(4, 6)], torch.tensor([0]), ValueError, r"router_logits\[1\] has 6 experts"),
        ([torch.randn(4, 8)], torch.tensor([0.0]), TypeError, "rows must hold integers"),
        ([torch.randn(4, 8)], torch.tensor([[0]]), ValueError, "rows must be a 1-D integer tensor"),
        ([torch.randn(4, 8, device="meta")], torch.tensor([0]), ValueError, "rows is on cpu but router_logits are on meta"),
        ([torch.randn(4, 8), torch.randn(4, 8, device="meta")], torch.tensor([0]), ValueError,
         r"router_logits\[1\] is on meta but router_logits\[0\] is on cpu"),
    ],
)
def test_gather_router_softmax_rejects_bad_input(logits, rows, error, message):
    with pytest.raises(error, match=message):
        ops.gather_router_softmax(logits, rows)


def test_unavailable_backends_raise_clear_errors(monkeypatch):
    a_hs, a_rw = pair(2)
    monkeypatch.setattr(ops.extension, "CPP_IMPORT_ERROR", ImportError("no module named moee_fast._C"))
    with pytest.raises(RuntimeError, match="backend 'cpp' is not available: the C\\+\\+ extension moee_fast._C"):
        ops.combined_cosine(a_hs, a_rw, a_hs, a_rw, backend="cpp")
    assert "cpp" not in ops.available_backends()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend 'triton' needs CUDA tensors"):
            ops.combined_cosine(a_hs, a_rw, a_hs, a_rw, backend="triton")


def test_ops_import_without_triton():
    """triton is optional: the module imports and the CPU backends work when it cannot be imported."""
    script = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # makes `import triton` fail
        import torch
        from moee_fast import ops
        assert "triton" not in ops.available_backends(), ops.available_backends()
        x = torch.randn(3, 4)
        print(ops.combined_cosine(x, x.abs(), x, x.abs()).diagonal().tolist())
    """)
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert ast.literal_eval(result.stdout) == pytest.approx([2.0] * 3, abs=1e-5)


def test_gather_router_softmax_rejects_out_on_another_device():
    logits, rows = [torch.randn(4, 8)], torch.tensor([0, 3])
    with pytest.raises(ValueError, match="out is on meta but the inputs are on cpu"):
        ops.gather_router_softmax(logits, rows, out=torch.empty(2, 1, 8, device="meta"))


# ------------------------------------------------------------------------------------ launch grids
# CUDA caps grid axis x at 2**31 - 1 and y at 65,535 programs; Triton does not check. These compute
# the launches for corpus-scale shapes from integers alone: nothing is allocated.

from moee_fast.kernels import grid as launch_grid  # noqa: E402


def assert_launches_cover(launches, blocks_x, blocks_y, caps=(launch_grid.MAX_GRID_X, launch_grid.MAX_GRID_Y)):
    """Every launch within the caps, and the launches tile blocks_x x blocks_y exactly once."""
    assert launches, "no launch"
    for launch in launches:
        assert 1 <= launch.grid[0] <= caps[0] and 1 <= launch.grid[1] <= caps[1], launch
    assert sum(launch.grid[0] * launch.grid[1] for launch in launches) == blocks_x * blocks_y
    covered = {(launch.offset_x, launch.offset_y) for launch in launches}
    assert len(covered) == len(launches), "two launches start at the same block"
    for launch in launches:  # each tile ends where the next one along its axis starts, or at the edge
        end_x, end_y = launch.offset_x + launch.grid[0], launch.offset_y + launch.grid[1]
        assert end_x == blocks_x or (end_x, launch.offset_y) in covered
        assert end_y == blocks_y or (launch.offset_x, end_y) in covered


@pytest.mark.parametrize("n_a, n_b", [(1, 4_300_000), (1, 10_000_000), (4_200_000, 1), (10_000_000, 3),
                                      (1_000, 8_800_000), (5_000_000, 5_000_000)])
@pytest.mark.parametrize("half_precision", [False, True])
def test_combined_cosine_grids_stay_within_cuda_limits_at_corpus_scale(n_a, n_b, half_precision):
    pytest.importorskip("triton")
    from moee_fast.kernels import combined_cosine as kernel

    block_a, block_b, _, _ = kernel._tile_config(half_precision)
    blocks_x, blocks_y = -(-n_b // block_b), -(-n_a // block_a)
    assert_launches_cover(kernel.launches(n_a, n_b, half_precision), blocks_x, blocks_y)


def test_topk_default_tile_on_cuda_fits_one_launch_for_one_query_over_ten_million_rows():
    """The issue's case: Nq=1 over 4.3M+ fp32 rows put 67,188 blocks on grid.y."""
    pytest.importorskip("triton")
    from moee_fast.kernels import combined_cosine as kernel

    tile = ops.default_corpus_tile(1, 10, "cuda")
    launches = kernel.launches(1, min(tile, 10_000_000), half_precision=False)
    assert len(launches) == 1 and launches[0].grid[1] == 1 and launches[0].grid[0] > 65_535


@pytest.mark.parametrize("n_sequences, n_layers, n_experts", [(10_000_000, 27, 64), (20_000_000, 1, 8), (3, 70_000, 256)])
def test_gather_router_softmax_grids_stay_within_cuda_limits(n_sequences, n_layers, n_experts):
    pytest.importorskip("triton")
    from moee_fast.kernels import gather_router_softmax as kernel

    block_b, _ = kernel._block_sizes(n_sequences, n_experts)
    assert_launches_cover(kernel.launches(n_sequences, n_layers, n_experts), -(-n_sequences // block_b), n_layers)


@pytest.mark.parametrize("blocks_x, blocks_y, caps", [(0, 0, (4, 4)), (1, 1, (1, 1)), (7, 5, (3, 2)), (2**33, 70_000, None)])
def test_tiled_grid_covers_every_block_once(blocks_x, blocks_y, caps):
    launches = launch_grid.tiled_grid(blocks_x, blocks_y, caps)
    if blocks_x * blocks_y == 0:
        assert launches == []
    else:
        assert_launches_cover(launches, blocks_x, blocks_y, caps or launch_grid.GRID_CAPS)
    with pytest.raises(ValueError, match="caps >= 1"):
        launch_grid.tiled_grid(3, 3, (0, 5))


@pytest.mark.skipif("triton" not in ops.available_backends(), reason="triton not usable here")
def test_kernels_tiled_into_many_launches_match_float64(monkeypatch):
    """Caps of 2 x 1 programs force the multi-launch path on a small shape (3 x 4 cosine blocks,
    3 sequence blocks x 3 layers); every output is NaN-poisoned before the kernels write it."""
    from moee_fast.kernels import combined_cosine as cosine_kernel
    from moee_fast.kernels import gather_router_softmax as gather_kernel

    monkeypatch.setattr(launch_grid, "GRID_CAPS", (2, 1))
    generator = fresh_generator()
    a_hs, a_rw = embeddings(130, 40, 3, 8, torch.float32, generator)
    b_hs, b_rw = embeddings(200, 40, 3, 8, torch.float32, generator)
    assert len(cosine_kernel.launches(130, 200, False)) == 6
    out = torch.full((130, 200), float("nan"))
    ops.combined_cosine(a_hs, a_rw, b_hs, b_rw, alpha=0.3, backend="triton", out=out)
    assert_close(out, reference_combined(a_hs, a_rw, b_hs, b_rw, 0.3), COSINE_TOL[torch.float32], "tiled combined_cosine")

    values = torch.full((130, 5), float("nan"))
    indices = torch.full((130, 5), -1, dtype=torch.int64)
    ops.topk_combined_cosine(a_hs, a_rw, b_hs, b_rw, 5, alpha=0.3, backend="triton", out=(values, indices), corpus_tile=90)
    full = reference_combined(a_hs, a_rw, b_hs, b_rw, 0.3)
    assert_close(values, full.topk(5, dim=1).values, COSINE_TOL[torch.float32], "tiled top-k values")
    assert_close(values, full.gather(1, indices), COSINE_TOL[torch.float32], "tiled top-k indices")

    logits, rows = router_logits(70, 3, 64, torch.float32, "ragged", generator)
    assert len(gather_kernel.launches(70, 3, 64)) == 6
    probs = torch.full((70, 3, 64), float("nan"))
    ops.gather_router_softmax(logits, rows, backend="triton", out=probs)
    assert_close(probs, torch.stack([layer.double()[rows] for layer in logits], dim=1).softmax(dim=-1), SOFTMAX_TOL, "tiled gather")


# ------------------------------------------------------------------------------------------ devices


@pytest.mark.skipif("triton" not in ops.available_backends(), reason="triton not usable here")
def test_triton_launches_run_under_the_inputs_device(monkeypatch):
    """Triton launches on the current CUDA device: each op enters the inputs' device around its launch."""
    from moee_fast.kernels import combined_cosine, gather_router_softmax

    inside, launched = [], []

    @contextlib.contextmanager
    def recording_guard(device):
        inside.append(device)
        yield
        inside.pop()

    def recording_launcher(result):
        def launch(*args, **kwargs):
            launched.append(list(inside))
            return result(args)
        return launch

    monkeypatch.setattr(ops, "_on_device", recording_guard)
    monkeypatch.setattr(combined_cosine, "combined_cosine", recording_launcher(lambda args: args[5]))
    monkeypatch.setattr(ops, "_triton_topk_combined_cosine", recording_launcher(lambda args: args[7:9]))
    monkeypatch.setattr(gather_router_softmax, "gather_router_softmax", recording_launcher(lambda args: args[2]))
    hs, rw = pair(3)
    ops.combined_cosine(hs, rw, hs, rw, backend="triton")
    ops.topk_combined_cosine(hs, rw, hs, rw, 2, backend="triton")
    ops.gather_router_softmax([rw], torch.tensor([0, 2]), backend="triton")
    assert launched == [[torch.device("cpu")]] * 3


def test_the_device_guard_names_the_inputs_cuda_device():
    guard = ops._on_device(torch.device("cuda", 1))  # built without touching CUDA
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(ops._on_device(torch.device("cpu")), contextlib.nullcontext)


# ------------------------------------------------------------------------------------ NaN ranking


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_ranks_nan_scores_last_with_real_indices(backend):
    """A corpus row holding NaN never displaces a real score; a NaN query gets NaN scores and real,
    distinct row indices (never -1) on every backend."""
    generator = fresh_generator()
    q_hs, q_rw = embeddings(4, 24, 2, 8, torch.float32, generator)
    c_hs, c_rw = embeddings(9, 24, 2, 8, torch.float32, generator)
    c_hs[3, 5] = float("nan")
    c_rw[6, 0] = float("inf")  # inf / inf: a NaN cosine as well
    q_hs[2, 0] = float("nan")
    full = reference_combined(q_hs, q_rw, c_hs, c_rw, 1.0)
    for k, corpus_tile in ((3, 2), (9, 4), (9, None)):
        values = torch.full((4, k), 7.0)
        indices = torch.full((4, k), -5, dtype=torch.int64)
        ops.topk_combined_cosine(q_hs, q_rw, c_hs, c_rw, k, backend=backend, out=(values, indices), corpus_tile=corpus_tile)
        assert ((indices >= 0) & (indices < 9)).all() and all(len(set(row.tolist())) == k for row in indices)
        assert values[2].isnan().all(), "the NaN query's scores must be NaN"
        for q in (0, 1, 3):
            real = k if k < 8 else 7  # rows 3 and 6 score NaN
            assert_close(values[q, :real], full[q].nan_to_num(nan=-9).topk(real).values, COSINE_TOL[torch.float32], backend)
            assert set(indices[q, real:].tolist()) == ({3, 6} if k == 9 else set())
            assert values[q, real:].isnan().all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_combined_cosine_scores_a_row_holding_nan_or_inf_as_nan(backend):
    generator = fresh_generator()
    a_hs, a_rw = embeddings(3, 16, 2, 8, torch.float32, generator)
    b_hs, b_rw = embeddings(4, 16, 2, 8, torch.float32, generator)
    a_hs[0, 2], b_rw[3, 1] = float("nan"), float("inf")
    scores = ops.combined_cosine(a_hs, a_rw, b_hs, b_rw, backend=backend)
    assert scores[0].isnan().all() and scores[:, 3].isnan().all()
    assert_close(scores[1:, :3], reference_combined(a_hs[1:], a_rw[1:], b_hs[:3], b_rw[:3], 1.0), COSINE_TOL[torch.float32], backend)


# -------------------------------------------------------------------------------- tensor-core cosine
# Triton's interpreter runs tl.dot in full fp32 whatever input_precision says, so the precision
# options are measured here by emulating the tensor cores in torch: TF32 keeps 10 mantissa bits
# (rounded to nearest, or truncated as the worst case), products of TF32 numbers are exact in fp32,
# and "tf32x3" sums a_hi*b_hi + a_hi*b_lo + a_lo*b_hi with x_lo = tf32(x - x_hi), as Triton does.


def tf32(x, rounding):
    bits = x.contiguous().numpy().view("uint32")
    if rounding == "nearest":
        bits = bits + (((bits >> 13) & 1) + 0xFFF).astype("uint32")
    return torch.from_numpy((bits & 0xFFFFE000).astype("uint32").view("float32"))


def emulated_dot(a, b, precision, rounding):
    if precision == "ieee":
        return a @ b.T
    a_hi, b_hi = tf32(a, rounding), tf32(b, rounding)
    if precision == "tf32":
        return a_hi @ b_hi.T
    a_lo, b_lo = tf32(a - a_hi, rounding), tf32(b - b_hi, rounding)
    return a_hi @ b_lo.T + a_lo @ b_hi.T + a_hi @ b_hi.T


# The bounds the docstrings state (moee_fast.checks.PRECISIONS), on unit-normalised scores.
PRECISION_BOUNDS = {"ieee": 1e-6, "tf32x3": 1e-6, "tf32": 1e-3}


@pytest.mark.parametrize("rounding", ["nearest", "truncate"])
@pytest.mark.parametrize("precision", list(PRECISION_BOUNDS))
def test_emulated_tensor_core_cosine_is_within_the_documented_error(precision, rounding):
    """HS-like rows (a shared offset, as real hidden states have) and RW-like softmax rows; the
    error of each cosine against float64, with the kernel's order: raw dot, then inverse norms."""
    generator = fresh_generator()
    a_hs, a_rw = embeddings(48, 2048, 27, 64, torch.float32, generator)
    b_hs, b_rw = embeddings(160, 2048, 27, 64, torch.float32, generator)
    a_hs, b_hs = a_hs + 1.0, b_hs + 1.0
    worst = 0.0
    for a, b in ((a_hs, b_hs), (a_rw, b_rw)):
        inv_a, inv_b = 1 / a.norm(dim=1), 1 / b.norm(dim=1)
        scores = emulated_dot(a, b, precision, rounding) * inv_a[:, None] * inv_b[None, :]
        worst = max(worst, (scores.double() - reference_cosine(a, b)).abs().max().item())
    print(f"{precision} ({rounding}): max abs error {worst:.2e}")
    assert worst <= PRECISION_BOUNDS[precision]
    if precision == "tf32":
        assert worst > 10 * PRECISION_BOUNDS["tf32x3"], "the emulation no longer models TF32's rounding"


@pytest.mark.skipif("triton" not in ops.available_backends(), reason="triton not usable here")
@pytest.mark.parametrize("precision", ["tf32x3", "ieee", "tf32"])
def test_every_precision_reaches_the_kernel(precision, monkeypatch):
    from moee_fast.kernels import combined_cosine as kernel

    seen = []
    real = kernel._dot_precision
    monkeypatch.setattr(kernel, "_dot_precision", lambda dtype, chosen: seen.append(chosen) or real(dtype, chosen))
    generator = fresh_generator()
    a_hs, a_rw = embeddings(5, 32, 2, 8, torch.float32, generator)
    out = torch.full((5, 5), float("nan"))
    ops.combined_cosine(a_hs, a_rw, a_hs, a_rw, backend="triton", out=out, precision=precision)
    ops.topk_combined_cosine(a_hs, a_rw, a_hs, a_rw, 2, backend="triton", precision=precision)
    assert seen == [precision] * 4
    assert_close(out, reference_combined(a_hs, a_rw, a_hs, a_rw, 1.0), COSINE_TOL[torch.float32], precision)
    assert real(torch.float32, precision) == precision and real(torch.bfloat16, precision) is None
