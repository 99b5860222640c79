"""Helpers every benchmark shares: the matmul rate measured beside a timing, one timing helper
(CUDA events on a GPU), row relative error, random weights, markdown tables, and results kept run by run."""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

RESULTS_DIR = Path(__file__).resolve().parent / "results"
QUICK_ENV = "MOEE_FAST_BENCH_QUICK"  # or --quick: one family, a small corpus, one round
OUT_ENV = "MOEE_FAST_BENCH_OUT"  # or --out-dir: where results go instead of benchmarks/results/


def quick() -> bool:
    """Whether the benchmarks run in their quick mode (minutes, for a first check, not for numbers to quote)."""
    return os.environ.get(QUICK_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def results_dir() -> Path:
    return Path(os.environ.get(OUT_ENV) or RESULTS_DIR)


def results_stem(name: str, quick_mode: bool) -> str:
    """cpu_ops_2026-12-06, or cpu_ops_quick_2026-12-06 for a quick run (never mistaken for a full one)."""
    return f"{name}{'_quick' if quick_mode else ''}_{datetime.date.today().isoformat()}"


def add_quick_arguments(parser, what: str) -> None:
    """--quick (what it shrinks to; also QUICK_ENV=1) and --out-dir, the same in every script benchmark."""
    parser.add_argument("--quick", action="store_true", default=quick(),
                        help=f"quick mode, a first check in under 3 minutes: {what} (same as {QUICK_ENV}=1)")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help=f"where the results go (default: ${OUT_ENV}, else benchmarks/results/)")


def quick_note(quick_mode: bool) -> list[str]:
    return ["Quick mode: a first check on small sizes, not numbers to quote.", ""] if quick_mode else []


class Timing(NamedTuple):
    """What `time_calls` measured: fn's last result, mean seconds per call, timed calls, and the
    allocator's peak GiB over them (CUDA only)."""

    result: object
    seconds: float
    calls: int
    peak_gib: float | None


def time_calls(fn, device: torch.device | str, min_seconds: float = 5.0) -> Timing:
    """The one timing helper of the benchmarks. fn runs once untimed on exactly the inputs that are
    then timed (compiles, autotuning and allocator growth land there, not in the figure), then
    back-to-back until at least `min_seconds` of timed work: on CUDA between pairs of events on the
    current stream, so no host synchronisation of ours falls inside a timed region; elsewhere by
    perf_counter. Short calls are batched from the rate measured so far."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    result = fn()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    calls, elapsed, batch = 0, 0.0, 1
    while True:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(batch):
                result = fn()
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            begin = time.perf_counter()
            for _ in range(batch):
                result = fn()
            seconds = time.perf_counter() - begin
        calls, elapsed = calls + batch, elapsed + seconds
        if elapsed >= min_seconds:
            break
        per_call = max(elapsed / calls, 1e-7)
        batch = max(1, min(100_000, math.ceil((min_seconds - elapsed) / per_call)))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    return Timing(result, elapsed / calls, calls, peak)


def matmul_flops_per_s(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, n: int = 2048,
                       repeats: int = 10, min_seconds: float = 5.0) -> float:
    """The dense matmul rate of this machine right now, in FLOP/s: the ceiling useful FLOP/s are
    judged against. CUDA: `time_calls` over at least min_seconds; CPU: the median of `repeats` calls."""
    device = torch.device(device)
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    if device.type == "cuda":
        return 2 * n**3 / time_calls(lambda: a @ b, device, min_seconds).seconds
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


def fma_peak_gflops(threads: int, seconds: float = 0.5) -> float | None:
    """The fp32 FMA rate of `threads` cores running at once (torch.ops.moee_fast.fma_peak: every
    thread's independent FMA chains), GFLOP/s: a ceiling no GEMM passes, unlike a BLAS matmul's
    rate. None where the C++ ops are not built for AVX2."""
    from moee_fast.extension import cpp_op

    return torch.ops.moee_fast.fma_peak(seconds, threads) if cpp_op("fma_peak") else None


def row_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Per-row ||actual - expected|| / ||expected|| in float64 (NaN anywhere stays NaN)."""
    actual, expected = actual.double().flatten(1), expected.double().flatten(1)
    return (actual - expected).norm(dim=1) / expected.norm(dim=1)


def max_row_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest row error; NaN if any row is NaN (max() would skip it)."""
    errors = row_relative_error(actual, expected)
    return float("nan") if errors.isnan().any() else float(errors.max())


@torch.no_grad()
def randomize_(model: nn.Module, std: float = 0.02) -> None:
    """Normal(0, std) matrices, unit norms, zero biases: throughput does not depend on trained
    values, but routing on all-equal router weights would be degenerate."""
    for name, param in model.named_parameters():
        if param.dim() >= 2:
            param.normal_(0.0, std)
        elif "norm" in name:
            param.fill_(1.0)
        else:
            param.zero_()


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    """Lines of a markdown table; cells are written with str()."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def card_stem(prefix: str, device_name: str) -> str:
    """A file name stem that names the card: gpu_report_nvidia_h200."""
    return f"{prefix}_{re.sub(r'[^A-Za-z0-9]+', '_', device_name).strip('_').lower()}"


class ResultsLog:
    """Records kept as they come: each one appended to a JSONL file at once and the markdown
    regenerated from all of them, so a crash or a time limit loses nothing already measured."""

    def __init__(self, out_dir: Path, stem: str, render, fresh: bool = True):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl, self.markdown = out_dir / f"{stem}.jsonl", out_dir / f"{stem}.md"
        self.render, self.records = render, []
        if fresh:
            self.jsonl.write_text("")

    def add(self, record: dict) -> dict:
        self.records.append(record)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
        self.markdown.write_text(self.render(self.records))
        return record


def caught(label: str, fn, *args, **kwargs) -> dict:
    """fn's result dict, or {"error": ...} for any Exception (Triton's CompilationError and
    OutOfResources included): a failed run is recorded, never fatal. Tracebacks go to stderr,
    except for running out of memory, which is an expected result."""
    start = time.perf_counter()
    try:
        result = dict(fn(*args, **kwargs) or {})
    except Exception as exc:  # every failure is a result to record
        if not isinstance(exc, torch.OutOfMemoryError):
            traceback.print_exception(exc, file=sys.stderr)
        message = "out of memory" if isinstance(exc, torch.OutOfMemoryError) else f"{type(exc).__name__}: {exc}"
        result = dict(error=message.splitlines()[0][:300] if message else type(exc).__name__)
    return {"step": label, **result, "wall_s": round(time.perf_counter() - start, 3)}
