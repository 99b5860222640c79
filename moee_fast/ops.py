"""Fused MoEE ops: argument checks, backend dispatch, and the torch reference implementations.

Backends: "triton" (CUDA tensors; CPU tensors too under TRITON_INTERPRET=1), "cpp" (the C++ extension
moee_fast._C on CPU tensors), "torch" (the readable reference, any device). "auto" picks Triton for
CUDA tensors, and for CPU tensors the C++ op wherever it measured faster than torch (see _CPU_AUTO).
"""

import contextlib
import functools
import importlib.util
import os
from collections.abc import Sequence

import torch

from . import extension
from .checks import DEFAULT_PRECISION, NORM_EPS, as_integer, check_alpha, check_positive_int, check_precision

BACKENDS = ("auto", "triton", "cpp", "torch")


# Bytes of one [Nq, tile] fp32 score block in the top-k stream; the corpus tile is sized to fit it.
# Bigger tiles keep the GEMM efficient and the merges few; this bounds the memory top-k needs.
_SCORE_TILE_BYTES = {"cuda": 256 << 20}
_DEFAULT_SCORE_TILE_BYTES = 32 << 20

# What "auto" runs on CPU, per op: the C++ op only where it measured faster than torch (each op
# reads its inputs once and keeps the exp vectorized; the measurements are in
# benchmarks/results/cpu_ops_auto.md).
_CPU_AUTO = {"gather_router_softmax": "cpp", "mean_router_softmax": "cpp", "combined_cosine": "cpp", "topk_combined_cosine": "cpp"}

def _triton_interpreted():
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _triton_installed():
    return importlib.util.find_spec("triton") is not None


def available_backends():
    """Backends usable in this process, e.g. ["torch", "cpp"]."""
    names = ["torch"]
    if extension.CPP_IMPORT_ERROR is None:
        names.append("cpp")
    if _triton_installed() and (_triton_interpreted() or torch.cuda.is_available()):
        names.append("triton")
    return names


def _resolve_backend(op, backend, device):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda" and _triton_installed():
            return "triton"
        if device.type == "cpu" and extension.CPP_IMPORT_ERROR is None:
            return _CPU_AUTO[op]
        return "torch"
    if backend == "cpp":
        if extension.CPP_IMPORT_ERROR is not None:
            raise RuntimeError(
                "backend 'cpp' is not available: the C++ extension moee_fast._C was not built or does not load "
                f"({extension.CPP_IMPORT_ERROR}); reinstall with a C++ compiler and `pip install --no-build-isolation .`"
            )
        if device.type != "cpu":
            raise RuntimeError(f"backend 'cpp' runs on CPU tensors, got tensors on {device}")
    if backend == "triton":
        if not _triton_installed():
            raise RuntimeError("backend 'triton' is not available: triton is not installed")
        if device.type != "cuda" and not (device.type == "cpu" and _triton_interpreted()):
            raise RuntimeError(
                f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got tensors on {device}"
            )
    return backend


def _on_device(device):
    """Triton launches on the current CUDA device, whatever the pointers: make it the inputs' one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------- checks


def _check_float_matrix(x, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def _rw_matrix(rw, name):
    """Routing weights as [N, L*E]: [N, L, E] is flattened (a view when contiguous)."""
    if isinstance(rw, torch.Tensor) and rw.dim() == 3:
        rw = rw.reshape(rw.shape[0], -1)
    _check_float_matrix(rw, name)
    return rw


def _row_contiguous(x):
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def _check_one_device(named):
    """named: {argument name: tensor}, every one on the first one's device (a kernel reads them all)."""
    (first_name, first), *others = named.items()
    for name, x in others:
        if x.device != first.device:
            raise ValueError(f"{name} is on {x.device} but {first_name} is on {first.device}: put every input on one device")


def _check_sides(a_hs, a_rw, b_hs, b_rw, a_name, b_name):
    """Checks two (hs, rw) sides against each other; returns the four as row-contiguous 2-D tensors."""
    a_rw, b_rw = _rw_matrix(a_rw, f"{a_name}_rw"), _rw_matrix(b_rw, f"{b_name}_rw")
    named = {f"{a_name}_hs": a_hs, f"{a_name}_rw": a_rw, f"{b_name}_hs": b_hs, f"{b_name}_rw": b_rw}
    for name, x in named.items():
        _check_float_matrix(x, name)
    for side in (a_name, b_name):
        hs, rw = named[f"{side}_hs"], named[f"{side}_rw"]
        if hs.shape[0] != rw.shape[0]:
            raise ValueError(f"{side}_hs has {hs.shape[0]} rows but {side}_rw has {rw.shape[0]}")
    for stream in ("hs", "rw"):
        a, b = named[f"{a_name}_{stream}"], named[f"{b_name}_{stream}"]
        if a.shape[1] != b.shape[1]:
            raise ValueError(f"{a_name}_{stream} width {a.shape[1]} != {b_name}_{stream} width {b.shape[1]}")
        if a.dtype != b.dtype:
            raise TypeError(f"{a_name}_{stream} is {a.dtype} but {b_name}_{stream} is {b.dtype}")
    _check_one_device(named)
    return tuple(_row_contiguous(x) for x in named.values())


def _check_out(out, shape, dtype, device, name="out"):
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(shape) or out.dtype != dtype:
        got = f"{out.dtype} {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{name} must be a {dtype} tensor of shape {tuple(shape)}, got {got}")
    if out.device != device:
        raise ValueError(f"{name} is on {out.device} but the inputs are on {device}")
    if not out.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _check_router_logits(router_logits):
    """(layer 0, the device, the fewest rows of any layer) of L float [rows_l, E] tensors."""
    if isinstance(router_logits, torch.Tensor) or not isinstance(router_logits, Sequence) or not router_logits:
        raise ValueError("router_logits must be a non-empty sequence of [rows, E] tensors (one per MoE layer)")
    for layer, logits in enumerate(router_logits):
        _check_float_matrix(logits, f"router_logits[{layer}]")
    first = router_logits[0]
    for layer, logits in enumerate(router_logits):
        if logits.shape[1] != first.shape[1]:
            raise ValueError(f"router_logits[{layer}] has {logits.shape[1]} experts, router_logits[0] has {first.shape[1]}")
    _check_one_device({f"router_logits[{layer}]": logits for layer, logits in enumerate(router_logits)})
    return first, first.device, min(logits.shape[0] for logits in router_logits)


def _check_rows(rows, n_rows, device, check_range=True):
    if not isinstance(rows, torch.Tensor) or rows.dim() != 1:
        raise ValueError(f"rows must be a 1-D integer tensor, got {rows!r:.80}")
    if rows.is_floating_point() or rows.is_complex() or rows.dtype == torch.bool:
        raise TypeError(f"rows must hold integers, got {rows.dtype}")
    if rows.device != device:
        raise ValueError(f"rows is on {rows.device} but router_logits are on {device}")
    if check_range and rows.numel():
        low, high = torch.stack(torch.aminmax(rows)).tolist()  # one host sync for the whole range check
        if low < 0 or high >= n_rows:
            bad = low if low < 0 else high
            raise IndexError(f"rows holds {bad}, out of range for router logits with {n_rows} rows")
    return rows.to(torch.int64).contiguous()


# ------------------------------------------------------------------------------ torch reference


def _unit_rows(x):
    x = x.float()
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(NORM_EPS)


def _torch_scores(a_hs_unit, a_rw_unit, b_hs, b_rw, alpha):
    scores = a_hs_unit @ _unit_rows(b_hs).T
    return scores.addmm_(a_rw_unit, _unit_rows(b_rw).T, alpha=alpha)  # += alpha * cos_rw, in place


def _nan_to_neg_inf_(scores):
    """Top-k ranks a NaN score last: as -inf, which no real score is (cosines are bounded)."""
    return scores.masked_fill_(scores.isnan(), float("-inf"))


def _neg_inf_to_nan_(values):
    return values.masked_fill_(values == float("-inf"), float("nan"))


def _torch_gather_router_softmax(router_logits, rows, out):
    picked = torch.stack([logits.index_select(0, rows) for logits in router_logits], dim=1)
    probs = torch.softmax(picked.float(), dim=-1)
    return probs if out is None else out.copy_(probs)


def segment_mean(x, cu_seqlens):
    """float32 [B, D]: the mean of rows cu_seqlens[b] .. cu_seqlens[b + 1] - 1 of x [N, D] for each b
    (the torch reference of the segment-mean mode, also the HS mean over packed tokens)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(x.device)
    owner = torch.repeat_interleave(torch.arange(lengths.shape[0], device=x.device), lengths)
    total = x.new_zeros(lengths.shape[0], x.shape[1], dtype=torch.float32).index_add_(0, owner, x[: owner.shape[0]].float())
    return total / lengths.unsqueeze(1)


def _torch_mean_router_softmax(router_logits, cu_seqlens, out):
    means = torch.stack([segment_mean(torch.softmax(logits.float(), dim=-1), cu_seqlens) for logits in router_logits], dim=1)
    return means if out is None else out.copy_(means)


def _torch_combined_cosine(a_hs, a_rw, b_hs, b_rw, alpha):
    return _torch_scores(_unit_rows(a_hs), _unit_rows(a_rw), b_hs, b_rw, alpha)


def _torch_topk_combined_cosine(q_hs, q_rw, c_hs, c_rw, k, alpha, corpus_tile):
    """Running top-k over corpus tiles: merge each tile's scores with the best k so far."""
    q_hs_unit, q_rw_unit = _unit_rows(q_hs), _unit_rows(q_rw)
    best_values = best_indices = None
    for start in range(0, c_hs.shape[0], corpus_tile):
        end = min(start + corpus_tile, c_hs.shape[0])
        scores = _nan_to_neg_inf_(_torch_scores(q_hs_unit, q_rw_unit, c_hs[start:end], c_rw[start:end], alpha))
        candidates = torch.arange(start, end, device=q_hs.device).expand(q_hs.shape[0], -1)
        if best_values is not None:
            scores = torch.cat([best_values, scores], dim=1)
            candidates = torch.cat([best_indices, candidates], dim=1)
        best_values, positions = scores.topk(min(k, scores.shape[1]), dim=1)
        best_indices = candidates.gather(1, positions)
    return _neg_inf_to_nan_(best_values), best_indices


# ------------------------------------------------------------------------------------------ ops


def gather_router_softmax(router_logits, rows, backend="auto", out=None, check_rows=True):
    """Softmax over experts of each sequence's last-token router row, for every MoE layer.

    router_logits: sequence of L tensors [rows_l, E] (any float dtype, row counts may differ per layer);
    rows: int64 [B], the flat row of each sequence's last token -> float32 [B, L, E].
    check_rows=False skips the range check of `rows` (one device-to-host sync per call) for callers
    that built `rows` themselves, like the encoder once per MoE layer.
    """
    first, device, n_rows = _check_router_logits(router_logits)
    n_experts = first.shape[1]
    rows = _check_rows(rows, n_rows, device, check_rows)
    shape = (rows.shape[0], len(router_logits), n_experts)
    if out is not None:
        _check_out(out, shape, torch.float32, device)

    backend = _resolve_backend("gather_router_softmax", backend, device)
    if backend == "torch":
        return _torch_gather_router_softmax(router_logits, rows, out)
    out = torch.empty(shape, dtype=torch.float32, device=device) if out is None else out
    if rows.shape[0] == 0:
        return out
    router_logits = [_row_contiguous(logits) for logits in router_logits]
    if backend == "cpp":
        return torch.ops.moee_fast.gather_router_softmax.out(router_logits, rows, out=out)
    from .kernels.gather_router_softmax import gather_router_softmax as launch

    with _on_device(device):  # The kernel reads every layer through layer 0's element type.
        return launch([logits.to(first.dtype) for logits in router_logits], rows, out)


def mean_router_softmax(router_logits, cu_seqlens, backend="auto", out=None, check_segments=True):
    """The segment-mean mode of gather_router_softmax: for every MoE layer, the mean over each
    sequence's packed rows of the softmax over experts, each row's softmax summed as it is made.

    router_logits: sequence of L tensors [N_l, E] (any float dtype); cu_seqlens: int64 [B + 1],
    sequence b owning rows cu_seqlens[b] .. cu_seqlens[b + 1] - 1 of every layer -> float32 [B, L, E].
    check_segments=False skips checking cu_seqlens (a host sync) for callers that built it from a packing.
    """
    first, device, n_rows = _check_router_logits(router_logits)
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1 or cu_seqlens.is_floating_point():
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor [B + 1], got {cu_seqlens!r:.80}")
    if check_segments:
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0 or bounds[-1] > n_rows:
            raise IndexError(f"cu_seqlens runs from {bounds[0]} to {bounds[-1]}; it must start at 0 and end within the {n_rows} router rows")
        for b, (start, end) in enumerate(zip(bounds, bounds[1:])):
            if end <= start:
                raise ValueError(f"cu_seqlens must increase: sequence {b} has rows {start}..{end}")
    shape = (cu_seqlens.shape[0] - 1, len(router_logits), first.shape[1])
    if out is not None:
        _check_out(out, shape, torch.float32, device)
    backend = _resolve_backend("mean_router_softmax", backend, device)
    if backend == "torch":
        return _torch_mean_router_softmax(router_logits, cu_seqlens, out)
    out = torch.empty(shape, dtype=torch.float32, device=device) if out is None else out
    if shape[0] == 0:
        return out
    router_logits = [_row_contiguous(logits) for logits in router_logits]
    if backend == "cpp":
        return torch.ops.moee_fast.mean_router_softmax.out(router_logits, cu_seqlens.to("cpu", torch.int64), out=out)
    from .kernels.gather_router_softmax import mean_router_softmax as launch

    with _on_device(device):
        return launch(router_logits, cu_seqlens.to(device, torch.int64).contiguous(), out)


def _triton_operand(x):
    """The Triton kernels take fp32/bf16/fp16; other float dtypes are computed in fp32."""
    return x if x.dtype in (torch.float32, torch.bfloat16, torch.float16) else x.float()


def combined_cosine(a_hs, a_rw, b_hs, b_rw, alpha=1.0, backend="auto", out=None, precision=DEFAULT_PRECISION):
    """float32 [Na, Nb]: cos(a_hs[i], b_hs[j]) + alpha * cos(a_rw[i], b_rw[j]).

    hs: [N, H]; rw: [N, L, E] or [N, L*E] (width 0 scores the plain cosine of hs, whatever alpha).
    A zero vector has cosine 0 with everything; a NaN or inf element gives NaN scores for its row.
    precision: how Triton multiplies fp32 operands on CUDA ("tf32x3", "ieee" or "tf32"; errors in
    moee_fast.checks); the C++ and torch backends compute in fp32.
    """
    alpha, precision = check_alpha(alpha), check_precision(precision)
    a_hs, a_rw, b_hs, b_rw = _check_sides(a_hs, a_rw, b_hs, b_rw, "a", "b")
    shape, device = (a_hs.shape[0], b_hs.shape[0]), a_hs.device
    if out is not None:
        _check_out(out, shape, torch.float32, device)

    backend = _resolve_backend("combined_cosine", backend, device)
    if backend == "torch":
        scores = _torch_combined_cosine(a_hs, a_rw, b_hs, b_rw, alpha)
        return scores if out is None else out.copy_(scores)
    out = torch.empty(shape, dtype=torch.float32, device=device) if out is None else out
    if backend == "cpp":
        return torch.ops.moee_fast.combined_cosine.out(a_hs, a_rw, b_hs, b_rw, alpha, out=out)
    from .kernels.combined_cosine import combined_cosine as launch

    with _on_device(device):
        return launch(*map(_triton_operand, (a_hs, a_rw, b_hs, b_rw)), alpha, out, precision, norm_eps=NORM_EPS)


def default_corpus_tile(n_queries, k, device):
    """Corpus rows per top-k step: as many as fit one score block of _SCORE_TILE_BYTES, at least k."""
    budget = _SCORE_TILE_BYTES.get(torch.device(device).type, _DEFAULT_SCORE_TILE_BYTES)
    return max(k, budget // (4 * max(n_queries, 1)))


def topk_combined_cosine(
    q_hs, q_rw, c_hs, c_rw, k, alpha=1.0, backend="auto", out=None, corpus_tile=None, precision=DEFAULT_PRECISION
):
    """The k best corpus rows per query by combined cosine, without materialising [Nq, Nc].

    -> (values float32 [Nq, k] descending, indices int64 [Nq, k]). Memory: Nq * (k + corpus_tile).
    out: optional (values, indices) to write into. corpus_tile: corpus rows scored per step.
    A NaN score (a NaN or inf element in its query or corpus row) ranks below every number and
    comes back as NaN, on every backend; every index is a real corpus row. Ties come in any order.
    precision: as for `combined_cosine`.
    """
    alpha, precision = check_alpha(alpha), check_precision(precision)
    q_hs, q_rw, c_hs, c_rw = _check_sides(q_hs, q_rw, c_hs, c_rw, "q", "c")
    n_queries, n_corpus, device = q_hs.shape[0], c_hs.shape[0], q_hs.device
    integer_k = as_integer(k)
    if integer_k is None or not 1 <= integer_k <= n_corpus:
        raise ValueError(f"k must be an integer in [1, Nc={n_corpus}], got {k!r}")
    k = integer_k
    if corpus_tile is None:
        corpus_tile = default_corpus_tile(n_queries, k, device)
    corpus_tile = max(check_positive_int("corpus_tile", corpus_tile), k)  # the first tile alone must fill the top-k
    if out is not None:
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise ValueError("out must be a (values, indices) pair")
        _check_out(out[0], (n_queries, k), torch.float32, device, "out[0] (values)")
        _check_out(out[1], (n_queries, k), torch.int64, device, "out[1] (indices)")

    backend = _resolve_backend("topk_combined_cosine", backend, device)
    if backend == "torch":
        values, indices = _torch_topk_combined_cosine(q_hs, q_rw, c_hs, c_rw, k, alpha, corpus_tile)
        return (values, indices) if out is None else (out[0].copy_(values), out[1].copy_(indices))
    if out is None:
        out = (torch.empty((n_queries, k), dtype=torch.float32, device=device),
               torch.empty((n_queries, k), dtype=torch.int64, device=device))
    values, indices = out
    if backend == "cpp":
        return tuple(torch.ops.moee_fast.topk_combined_cosine.out(
            q_hs, q_rw, c_hs, c_rw, k, alpha, corpus_tile, values=values, indices=indices))
    with _on_device(device):
        return _triton_topk_combined_cosine(
            *map(_triton_operand, (q_hs, q_rw, c_hs, c_rw)), k, alpha, corpus_tile, values, indices, precision)


def _triton_topk_combined_cosine(q_hs, q_rw, c_hs, c_rw, k, alpha, corpus_tile, values, indices, precision):
    """Top-k of the combined cosine per query, streaming the corpus through the Triton
    combined_cosine kernel so [Nq, Nc] is never materialised.

    values float32 [Nq, k] / indices int64 [Nq, k] are fully overwritten, sorted by descending value;
    NaN scores rank last (written as -inf by the kernel, NaN again at the end).

    One buffer [Nq, k + tile] holds the running top-k in its first k columns; the kernel writes each
    corpus tile's scores straight into the rest, and torch.topk merges the two. Memory: Nq * (k + tile).
    """
    n_queries, n_corpus = q_hs.shape[0], c_hs.shape[0]
    tile = max(k, min(corpus_tile, n_corpus))  # the first tile alone must fill the top-k
    candidates = torch.empty((n_queries, k + tile), dtype=torch.float32, device=q_hs.device)
    from .kernels.combined_cosine import combined_cosine, inverse_norms

    q_norms = (inverse_norms(q_hs, NORM_EPS), inverse_norms(q_rw, NORM_EPS))
    c_hs_norms, c_rw_norms = inverse_norms(c_hs, NORM_EPS), inverse_norms(c_rw, NORM_EPS)
    kept = 0  # columns of `candidates` holding the running top-k (0 until the first merge)
    for start in range(0, n_corpus, tile):
        end = min(start + tile, n_corpus)
        scores = candidates[:, kept:kept + end - start]
        norms = (q_norms[0], c_hs_norms[start:end], q_norms[1], c_rw_norms[start:end])
        combined_cosine(q_hs, q_rw, c_hs[start:end], c_rw[start:end], alpha, scores, precision,
                        norm_eps=NORM_EPS, inv_norms=norms, nan_as_neg_inf=True)
        top_values, positions = candidates[:, :kept + end - start].topk(k, dim=1)
        # Position p < kept is a survivor from earlier tiles; otherwise it is corpus row start + p - kept.
        from_tile = positions >= kept
        previous = indices.gather(1, positions.clamp(max=kept - 1)) if kept else positions
        indices.copy_(torch.where(from_tile, positions - kept + start, previous))
        values.copy_(top_values)
        candidates[:, :k] = top_values
        kept = k
    return values.masked_fill_(values == float("-inf"), float("nan")), indices


_FUSED_MOE_DTYPES = (torch.bfloat16, torch.float16)


def fused_moe_experts(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, shared=None, out=None,
                      config=None):
    """The routed experts (and optionally the shared expert) of one MoE layer in Triton: [T, H] ->
    [T, H] = sum_k top_k_weights[t, k] * down[e](SiLU(gate[e] x) * up[e] x), e = top_k_index[t, k].

    hidden_states [T, H] and the weights in bf16 or fp16 (accumulated in fp32); gate_up_proj
    [E, 2I, H] (gate rows first), down_proj [E, H, I]; top_k_index integer [T, k] of ids in
    [0, E) (not range-checked: the check would wait for the device; a router's top-k is in range);
    top_k_weights float [T, k]. shared: (gate [Is, H], up [Is, H], down [H, Is], gate_value [T]
    or None) for Qwen2-MoE's sigmoid-gated and DeepSeek's ungated shared experts. CUDA tensors
    (CPU ones under TRITON_INTERPRET=1), no host synchronisation.
    """
    named = dict(gate_up_proj=gate_up_proj, down_proj=down_proj)
    if shared is not None:
        if not isinstance(shared, (tuple, list)) or len(shared) != 4:
            raise ValueError("shared must be (gate [Is, H], up [Is, H], down [H, Is], gate_value [T] or None)")
        named.update({f"shared[{i}] ({name})": t for i, (name, t) in enumerate(zip(("gate", "up", "down", "gate_value"), shared))
                      if t is not None})
    device, dtype = _check_routed_inputs(hidden_states, top_k_index, top_k_weights, named, "fused_moe_experts")
    if gate_up_proj.dim() != 3 or down_proj.dim() != 3:
        raise ValueError(f"need gate_up_proj [E, 2I, H], down_proj [E, H, I]; got "
                         f"{tuple(gate_up_proj.shape)}, {tuple(down_proj.shape)}")
    (n_tokens, hidden), (n_experts, two_i) = hidden_states.shape, gate_up_proj.shape[:2]
    if two_i % 2 or gate_up_proj.shape[2] != hidden or tuple(down_proj.shape) != (n_experts, hidden, two_i // 2):
        raise ValueError(f"gate_up_proj {tuple(gate_up_proj.shape)} and down_proj {tuple(down_proj.shape)} do not "
                         f"fit hidden size {hidden}: need [E, 2I, {hidden}] and [E, {hidden}, I]")
    weights = {name: t for name, t in named.items() if name in ("gate_up_proj", "down_proj") or "shared" in name}
    for name, t in weights.items():
        if "gate_value" not in name and t.dtype != dtype:
            raise ValueError(f"{name} is {t.dtype}, hidden_states is {dtype}: the experts run in one dtype")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} needs a unit stride along its last dimension, got strides {t.stride()}")
    if shared is not None:
        gate, up, down, gate_value = shared
        size = gate.shape[0]
        if tuple(gate.shape) != (size, hidden) or tuple(up.shape) != (size, hidden) or tuple(down.shape) != (hidden, size):
            raise ValueError(f"shared gate {tuple(gate.shape)}, up {tuple(up.shape)}, down {tuple(down.shape)} must be "
                             f"[Is, {hidden}], [Is, {hidden}], [{hidden}, Is]")
        if gate_value is not None and gate_value.numel() != n_tokens:
            raise ValueError(f"shared gate_value must hold one value per token ({n_tokens}), got {tuple(gate_value.shape)}")
    shape = (n_tokens, hidden)
    if out is not None:
        _check_out(out, shape, dtype, device)
    out = torch.empty(shape, dtype=dtype, device=device) if out is None else out
    if n_tokens == 0:
        return out
    from .kernels.fused_moe import fused_moe

    if shared is not None and shared[3] is not None:
        shared = (*shared[:3], shared[3].reshape(-1))
    with _on_device(device):
        return fused_moe(_row_contiguous(hidden_states), top_k_index.contiguous(), top_k_weights.contiguous(),
                         gate_up_proj, down_proj, out, shared=shared, config=config)



def _check_routed_inputs(hidden_states, top_k_index, top_k_weights, weights: dict, op: str):
    """The checks every fused-MoE op makes of its activations and routing (and that `weights`, a
    name -> tensor dict, are tensors on their device); returns (device, dtype)."""
    named = dict(hidden_states=hidden_states, top_k_index=top_k_index, top_k_weights=top_k_weights, **weights)
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    _check_one_device(named)
    device, dtype = hidden_states.device, hidden_states.dtype
    if device.type != "cuda" and not _triton_interpreted():
        raise ValueError(f"{op} runs Triton kernels: CUDA tensors (or TRITON_INTERPRET=1), got {device}")
    if dtype not in _FUSED_MOE_DTYPES:
        raise ValueError(f"hidden_states must be bfloat16 or float16, got {dtype}")
    if hidden_states.dim() != 2:
        raise ValueError(f"need hidden_states [T, H], got {tuple(hidden_states.shape)}")
    n_tokens = hidden_states.shape[0]
    if top_k_index.dim() != 2 or top_k_index.shape[0] != n_tokens or top_k_index.dtype.is_floating_point:
        raise ValueError(f"top_k_index must be integer [{n_tokens}, k], got {top_k_index.dtype} {tuple(top_k_index.shape)}")
    if tuple(top_k_weights.shape) != tuple(top_k_index.shape) or not top_k_weights.dtype.is_floating_point:
        raise ValueError(f"top_k_weights must be float {tuple(top_k_index.shape)}, got {top_k_weights.dtype} "
                         f"{tuple(top_k_weights.shape)}")
    return device, dtype


def fused_moe_quantized_experts(hidden_states, top_k_index, top_k_weights, gate, up, down, out=None, config=None):
    """The routed experts of one MoE layer with quantized weights, decoded inside the fused MoE
    GEMMs' weight loads (no dequantized copy, no per-expert loop, no host synchronisation): the
    formula of fused_moe_experts with gate, up [E, I, H] and down [E, H, I] given as
    moee_fast.kernels.moe_gemm.Int8Rows (bitsandbytes' int8 rows) or Blockwise4Bit (its NF4/FP4
    blocks), gate and up of one kind and statistics layout. hidden_states bf16/fp16 [T, H].
    """
    from .kernels.fused_moe import fused_moe_split
    from .kernels.moe_gemm import Blockwise4Bit, Int8Rows, weight_shape

    matrices = dict(gate=gate, up=up, down=down)
    kinds = {type(w) for w in matrices.values()}
    if len(kinds) != 1 or not kinds <= {Int8Rows, Blockwise4Bit}:
        raise TypeError(f"gate, up and down must all be Int8Rows or all Blockwise4Bit, got "
                        f"{', '.join(type(w).__name__ for w in matrices.values())}")
    tensors = {f"{name}.{field}": t for name, w in matrices.items() for field, t in w._asdict().items()
               if isinstance(t, torch.Tensor)}
    tensors.update({f"{name}.nested[{i}]": t for name, w in matrices.items() if isinstance(w, Blockwise4Bit) and w.nested
                    for i, t in enumerate(w.nested)})
    device, dtype = _check_routed_inputs(hidden_states, top_k_index, top_k_weights, tensors, "fused_moe_quantized_experts")
    (n_tokens, hidden), (n_experts, inter, _) = hidden_states.shape, weight_shape(gate)
    wanted = dict(gate=(n_experts, inter, hidden), up=(n_experts, inter, hidden), down=(n_experts, hidden, inter))
    for name, w in matrices.items():
        if weight_shape(w) != wanted[name]:
            raise ValueError(f"{name} holds {weight_shape(w)} weights, need {wanted[name]} for hidden size {hidden}")
        _check_quantized_layout(name, w)
    out = torch.empty((n_tokens, hidden), dtype=dtype, device=device) if out is None else out
    _check_out(out, (n_tokens, hidden), dtype, device)
    if n_tokens == 0:
        return out
    with _on_device(device):
        return fused_moe_split(_row_contiguous(hidden_states), top_k_index.contiguous(), top_k_weights.contiguous(),
                               gate, up, down, out, config=config)


def _check_quantized_layout(name, weight):
    """The dtypes and statistics shapes the quantized GEMM reads, each named when wrong."""
    from .kernels.moe_gemm import NESTED_BLOCKSIZE, Int8Rows

    n_experts, rows, cols = (weight.data.shape[0], *weight.shape) if not isinstance(weight, Int8Rows) else weight.data.shape

    def need(field, t, dtype, shape):
        if t.dtype != dtype or tuple(t.shape) != tuple(shape) or not t.is_contiguous():
            raise ValueError(f"{name}.{field} must be contiguous {dtype} {tuple(shape)}, got {t.dtype} {tuple(t.shape)}")

    if isinstance(weight, Int8Rows):
        need("data", weight.data, torch.int8, (n_experts, rows, cols))
        need("scale", weight.scale, torch.float32, (n_experts, rows))
        return
    blocks = -(-rows * cols // weight.blocksize)
    need("data", weight.data, torch.uint8, (n_experts, (rows * cols + 1) // 2))
    need("code", weight.code, torch.float32, (16,))
    if weight.nested is None:
        need("absmax", weight.absmax, torch.float32, (n_experts, blocks))
        return
    nested_absmax, nested_code, offset = weight.nested
    need("absmax", weight.absmax, torch.uint8, (n_experts, blocks))
    need("nested[0] (nested_absmax)", nested_absmax, torch.float32, (n_experts, -(-blocks // NESTED_BLOCKSIZE)))
    need("nested[1] (nested_code)", nested_code, torch.float32, (256,))
    need("nested[2] (offset)", offset, torch.float32, (n_experts,))

def _check_triton_device(device, op):
    if device.type != "cuda" and not _triton_interpreted():
        raise ValueError(f"{op} runs a Triton kernel: CUDA tensors (or TRITON_INTERPRET=1), got {device}")


def rms_norm(x, weight, eps, residual=None):
    """weight * RMSNorm(x (+ residual)) over the last dimension in one Triton pass, rounding as the
    families' modules do (normalise in fp32, round, scale, round). With `residual`, returns
    (normed, x + residual), the new residual stream; else normed. Inner dimension of unit stride."""
    named = dict(x=x, weight=weight, **({} if residual is None else dict(residual=residual)))
    for name, t in named.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor")
    _check_one_device(named)
    _check_triton_device(x.device, "rms_norm")
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"weight {tuple(weight.shape)} must be [{x.shape[-1]}] for x {tuple(x.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual {residual.dtype} {tuple(residual.shape)} must match x {x.dtype} {tuple(x.shape)}")
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    residual_out = None if residual is None else torch.empty_like(out)
    from .kernels.rms_norm import rms_norm as launch

    with _on_device(x.device):
        launch(rows, weight, float(eps), out.view(-1, x.shape[-1]),
               None if residual is None else residual.reshape(-1, x.shape[-1]).contiguous(),
               None if residual_out is None else residual_out.view(-1, x.shape[-1]))
    return out if residual is None else (out, residual_out)


def rotary_(q, k, cos, sin):
    """Rotary embedding applied in place to q and k ([1, heads, N, D] views, the packed layout),
    cos and sin [1, N, D]; returns (q, k). One Triton launch each, no copies."""
    for name, t in dict(q=q, k=k, cos=cos, sin=sin).items():
        if not isinstance(t, torch.Tensor) or t.dim() != (3 if name in ("cos", "sin") else 4) or t.shape[0] != 1:
            raise ValueError(f"{name} must be a tensor [1, ...] of the packed layout")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} needs a unit stride along its last dimension")
    _check_one_device(dict(q=q, k=k, cos=cos, sin=sin))
    _check_triton_device(q.device, "rotary_")
    n, dim = q.shape[2], q.shape[3]
    if dim % 2 or k.shape[2:] != (n, dim) or cos.shape[1:] != (n, dim) or sin.shape[1:] != (n, dim):
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)} "
                         "disagree on tokens or an even head size")
    from .kernels.rotary import rotary_ as launch

    with _on_device(q.device):
        for x in (q, k):
            launch(x[0].transpose(0, 1), cos[0], sin[0])
    return q, k
