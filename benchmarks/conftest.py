"""Shared pieces of the benchmark suites: checkpoints built once per run, the machine's fp32
matmul peak measured in the same run, and the side-by-side table printed (and written to
benchmarks/results/) at the end."""

from __future__ import annotations

import datetime
import os
import platform
import time

import pytest
import torch

RESULTS: dict[str, list[dict]] = {"encode": [], "memory": []}
PEAKS: list[float] = []


def matmul_peak_gflops(n: int = 2048, repeats: int = 10) -> float:
    """fp32 GEMM rate of this machine right now (the ceiling for useful GFLOP/s)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return repeats * 2 * n**3 / (time.perf_counter() - start) / 1e9


@pytest.fixture(scope="session")
def bench_dir(tmp_path_factory):
    root = os.environ.get("MOEE_FAST_BENCH_DIR")
    return root or str(tmp_path_factory.mktemp("bench-checkpoints"))


@pytest.fixture(scope="session")
def fp32_peak():
    """Measured at the start and end of the run and around each timing; "% of top peak" uses the largest."""
    PEAKS.append(matmul_peak_gflops())
    yield PEAKS
    PEAKS.append(matmul_peak_gflops())


def _encode_table(rows: list[dict], peak: float) -> list[str]:
    lines = [
        "| model | path | texts | tokens | computed tokens | seconds | texts/s | tokens/s | useful GFLOP/s "
        "| % of peak beside it | % of top peak | speed-up | max rel. diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_model: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_model.setdefault(row["model"], {})[row["path"]] = row
    for model, paths in by_model.items():
        base = paths.get("reference")
        for name, row in paths.items():
            speedup = f"{base['seconds'] / row['seconds']:.1f}x" if base else "-"
            lines.append(
                f"| {model} | {name} | {row['texts']} | {row['tokens']} | {row['computed_tokens']} | {row['seconds']:.2f} | "
                f"{row['texts'] / row['seconds']:.1f} | {row['tokens'] / row['seconds']:.0f} | "
                f"{row['flops'] / row['seconds'] / 1e9:.1f} | {100 * row['neighbour_fraction']:.0f}% | "
                f"{100 * row['flops'] / row['seconds'] / 1e9 / peak:.0f}% | "
                f"{speedup} | {row.get('max_rel_diff', float('nan')):.1e} |"
            )
    return lines


def _memory_table(rows: list[dict]) -> list[str]:
    lines = ["| model | batch x tokens | reference peak MiB | moee-fast peak MiB |", "|---|---|---|---|"]
    shapes: dict[tuple, dict[str, float]] = {}
    for row in rows:
        shapes.setdefault((row["model"], row["batch"], row["length"]), {})[row["path"]] = row["peak_mib"]
    for (model, batch, length), paths in sorted(shapes.items()):
        lines.append(f"| {model} | {batch} x {length} | {paths.get('reference', float('nan')):.0f} | {paths.get('moee-fast', float('nan')):.0f} |")
    return lines


def pytest_terminal_summary(terminalreporter):
    if not (RESULTS["encode"] or RESULTS["memory"]):
        return
    peak = max(PEAKS) if PEAKS else float("nan")
    header = [
        f"Machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; fp32 matmul peak measured in this run: {peak:.1f} GFLOP/s "
        f"(the largest of {len(PEAKS)} samples taken through the run, {min(PEAKS):.1f} to {peak:.1f})",
        "",
        "Useful FLOPs: what the embedding needs over real tokens (no padding, no LM head, the last layer's",
        "queries and MLP at the last token only); the same count divides both paths' times.",
        "% of peak beside it: each timed round against the mean of the peak samples taken just before and",
        "just after it (median over rounds); % of top peak: against the largest sample of the whole run.",
        "",
    ]
    lines = header
    if RESULTS["encode"]:
        lines += _encode_table(RESULTS["encode"], peak) + [""]
    if RESULTS["memory"]:
        lines += ["Peak resident memory above the loaded model, one forward of a fixed shape:", ""]
        lines += _memory_table(RESULTS["memory"]) + [""]
    terminalreporter.write_sep("=", "moee-fast vs reference path")
    for line in lines:
        terminalreporter.write_line(line)
    out_dir = os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out_dir, exist_ok=True)
    stamp = datetime.date.today().isoformat()
    path = os.path.join(out_dir, f"cpu_encode_{stamp}.md")
    with open(path, "w") as f:
        f.write(f"# CPU encode benchmark, {stamp}\n\n" + "\n".join(lines) + "\n")
    terminalreporter.write_line(f"written to {os.path.relpath(path)}")
