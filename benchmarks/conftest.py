"""Shared pieces of the CPU benchmark suites: checkpoints built once per run, the machine's fp32
matmul peak measured in the same run, and the side-by-side table printed (and written to
benchmarks/results/) at the end."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

import pytest

import moee_fast  # noqa: F401  (before torch: it bounds OpenMP's idle spin, as for every user who imports it first)
import torch  # noqa: E402

from benchmarks.helpers import QUICK_ENV, markdown_table, matmul_flops_per_s, quick, results_dir

RESULTS: dict[str, list[dict]] = {"encode": [], "memory": []}
PEAKS: list[float] = []
PATHS = ("moee-fast", "careful", "reference")  # table order: ours, then the two baselines


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", help=f"quick mode of the benchmarks (same as {QUICK_ENV}=1)")


def pytest_configure(config):
    if config.getoption("--quick", default=False):  # before collection: the quick mode parametrizes less
        os.environ[QUICK_ENV] = "1"


def matmul_peak_gflops() -> float:
    """fp32 GEMM rate of this machine right now (the ceiling for useful GFLOP/s)."""
    return matmul_flops_per_s("cpu", torch.float32) / 1e9


@pytest.fixture(scope="session")
def bench_dir(tmp_path_factory):
    root = os.environ.get("MOEE_FAST_BENCH_DIR")
    return root or str(tmp_path_factory.mktemp("bench-checkpoints"))


@pytest.fixture(scope="session")
def results():
    return RESULTS


@pytest.fixture(scope="session")
def fp32_peak():
    """Measured at the start and end of the run and around each timing; "% of top peak" uses the largest."""
    PEAKS.append(matmul_peak_gflops())
    yield PEAKS
    PEAKS.append(matmul_peak_gflops())


def _encode_table(rows: list[dict], peak: float) -> list[str]:
    header = ["model", "path", "texts", "tokens", "computed tokens", "seconds", "texts/s", "tokens/s",
              "useful GFLOP/s", "% of peak beside it", "% of top peak", "peak MiB", "moee-fast speed-up",
              "max rel. diff vs moee-fast"]
    by_model: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_model.setdefault(row["model"], {})[row["path"]] = row
    cells = []
    for model, paths in by_model.items():
        ours = paths.get("moee-fast")
        for name in (p for p in PATHS if p in paths):
            row = paths[name]
            gflops = row["flops"] / row["seconds"] / 1e9
            cells.append([
                model, name, row["texts"], row["tokens"], row["computed_tokens"], f"{row['seconds']:.2f}",
                f"{row['texts'] / row['seconds']:.1f}", f"{row['tokens'] / row['seconds']:.0f}", f"{gflops:.1f}",
                f"{100 * row['neighbour_fraction']:.0f}%", f"{100 * gflops / peak:.0f}%",
                f"{row['peak_mib']:.0f}" if "peak_mib" in row else "-",
                f"{row['seconds'] / ours['seconds']:.2f}x" if ours and name != "moee-fast" else "-",
                f"{row['max_rel_diff']:.1e}" if name != "moee-fast" else "-",
            ])
    return markdown_table(header, cells)


def _memory_table(rows: list[dict]) -> list[str]:
    shapes: dict[tuple, dict[str, float]] = {}
    for row in rows:
        shapes.setdefault((row["model"], row["batch"], row["length"]), {})[row["path"]] = row["peak_mib"]
    cells = [[model, f"{batch} x {length}", *(f"{paths.get(p, float('nan')):.0f}" for p in PATHS)]
             for (model, batch, length), paths in sorted(shapes.items())]
    return markdown_table(["model", "batch x tokens", *(f"{p} peak MiB" for p in PATHS)], cells)


def _report_lines() -> list[str]:
    peak = max(PEAKS) if PEAKS else float("nan")
    lines = [
        f"Machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; fp32 matmul peak measured in this run: {peak:.1f} GFLOP/s "
        f"(the largest of {len(PEAKS)} samples taken through the run, {min(PEAKS, default=float('nan')):.1f} to {peak:.1f})",
        *(["Quick mode: one family, a small corpus, one round: a first check, not numbers to quote."] if quick() else []),
        "",
        "Paths: moee-fast; careful = the careful transformers loop (AutoModel, sorted by length, batches of 32",
        "right-padded, SDPA, default experts); reference = the published evaluation loop (batches of 128,",
        "left padding, full causal LM with every hidden state). moee-fast speed-up: that path's seconds / moee-fast's.",
        "Useful FLOPs: what the embedding needs over real tokens (no padding, no LM head, the last layer's",
        "queries and MLP at the last token only); the same count divides every path's time.",
        "% of peak beside it: each timed round against the mean of the peak samples taken just before and",
        "just after it (median over rounds); % of top peak: against the largest sample of the whole run.",
        "Peak MiB: resident memory above the loaded model while encoding the same corpus, measured after all timings.",
        "",
    ]
    if RESULTS["encode"]:
        lines += _encode_table(RESULTS["encode"], peak) + [""]
    if RESULTS["memory"]:
        lines += ["Peak resident memory above the loaded model, one forward of a fixed shape:", ""]
        lines += _memory_table(RESULTS["memory"]) + [""]
    return lines


def _write_results() -> Path:
    results_dir().mkdir(parents=True, exist_ok=True)
    stamp = datetime.date.today().isoformat()
    path = results_dir() / f"cpu_encode{'_quick' if quick() else ''}_{stamp}.md"
    path.write_text(f"# CPU encode benchmark{' (quick mode)' if quick() else ''}, {stamp}\n\n" + "\n".join(_report_lines()) + "\n")
    return path


def pytest_runtest_logfinish(nodeid, location):
    """Results are written as each case ends, so a run stopped early keeps what it measured."""
    if RESULTS["encode"] or RESULTS["memory"]:
        _write_results()


def pytest_terminal_summary(terminalreporter):
    if not (RESULTS["encode"] or RESULTS["memory"]):
        return
    terminalreporter.write_sep("=", "moee-fast vs the careful transformers loop and the reference path")
    for line in _report_lines():
        terminalreporter.write_line(line)
    path = _write_results()
    terminalreporter.write_line(f"written to {os.path.relpath(path)}")
