"""The first run on a GPU: what the CPU cannot check, in at most 10 minutes, saving as it goes.

In order, each step under its own time limit, every outcome (failure and timeout included)
appended to benchmarks/results/gpu_first_check_<card>.jsonl and the .md regenerated:
1. kernels: the Triton ops on poisoned outputs across expert counts (8, 60, 64, 160, 256) and
   dtypes against float64, then registers and spills of every compiled kernel;
2. grid limit: one query against more than 4.2M fp32 corpus rows (top-k and the full row);
3. attention: varlen against padded attention on a skewed batch (one 512-token text and 4,032
   8-token texts): time, peak memory, largest difference;
4. sync debugging: one encode in a child process with CUDA_LAUNCH_BLOCKING=1;
5. bf16 against fp32: the same texts encoded in both, row relative error of HS and RW;
6. throughput: benchmarks.gpu_report on the OLMoE shape for the time left.

Run on a CUDA machine:  python -m benchmarks.gpu_first_check
Check it on a CPU:      python -m benchmarks.gpu_first_check --dry   (tiny shapes, the Triton interpreter)
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if "--dry" in sys.argv:  # before triton is imported: its CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from benchmarks.helpers import (  # noqa: E402
    RESULTS_DIR,
    ResultsLog,
    card_stem,
    caught,
    markdown_table,
    max_row_relative_error,
)

EXPERT_COUNTS = (8, 60, 64, 160, 256)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
# seconds per step on the GPU; the throughput report gets what is left of --budget-s
LIMITS = dict(kernels=120, grid_limit=60, attention=60, sync_debug_encode=90, bf16_vs_fp32=60)


class StepTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise StepTimeout("the step ran past its time limit")


class Context:
    """What the steps share: the device, the shapes for it, and one small checkpoint."""

    def __init__(self, args):
        self.dry, self.args = args.dry, args
        self.device = torch.device("cpu" if args.dry else "cuda")
        self._checkpoint = None

    def checkpoint(self) -> str:
        if self._checkpoint is None:
            from benchmarks.models import build_checkpoint, scaled_configs, smoke_configs

            config = smoke_configs()["olmoe"] if self.dry else scaled_configs(num_hidden_layers=2)["olmoe"]
            self._checkpoint = build_checkpoint("olmoe", tempfile.mkdtemp(prefix="gpu_first_check_"), config=config)
        return self._checkpoint

    def timed(self, fn):
        """(result, milliseconds, peak MiB): CUDA events and the allocator's peak on the GPU."""
        if self.device.type != "cuda":
            start = time.perf_counter()
            return fn(), 1e3 * (time.perf_counter() - start), None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn()
        end.record()
        end.synchronize()
        return result, start.elapsed_time(end), torch.cuda.max_memory_allocated() / 2**20


# ------------------------------------------------------------------------------------------------ steps


def step_kernels(ctx: Context) -> dict:
    from moee_fast import ops

    rows = []
    for experts in EXPERT_COUNTS:
        for dtype in DTYPES:
            rows.append(dict(experts=experts, dtype=str(dtype).removeprefix("torch."), **_kernel_errors(ctx, ops, experts, dtype)))
    failed = [f"E={r['experts']} {r['dtype']}" for r in rows if not r["ok"]]
    return dict(ok=not failed, failed=", ".join(failed), rows=rows + compiled_kernel_stats())


def _kernel_errors(ctx, ops, experts: int, dtype) -> dict:
    """Largest absolute error of the Triton ops against float64 on outputs poisoned with NaN."""
    gen = torch.Generator().manual_seed(experts)
    layers, batch, tokens = (2, 9, 3) if ctx.dry else (4, 37, 5)
    logits = [torch.randn(batch * tokens, experts, generator=gen).to(ctx.device, dtype) for _ in range(layers)]
    last = (torch.arange(batch) * tokens + torch.randint(0, tokens, (batch,), generator=gen)).to(ctx.device)
    out = torch.full((batch, layers, experts), float("nan"), device=ctx.device)
    ops.gather_router_softmax(logits, last, backend="triton", out=out)
    expected = torch.stack([torch.softmax(l.double()[last], dim=-1) for l in logits], 1)
    gather = (out.double() - expected).abs().max().item()
    width = 33 if ctx.dry else 131  # corpus rows: more than one block
    a_hs, b_hs = (torch.randn(n, 64, generator=gen).to(ctx.device, dtype) for n in (5, width))
    a_rw, b_rw = (torch.softmax(torch.randn(n, layers * experts, generator=gen), -1).to(ctx.device, dtype) for n in (5, width))
    scores = torch.full((5, width), float("nan"), device=ctx.device)
    ops.combined_cosine(a_hs, a_rw, b_hs, b_rw, alpha=0.5, backend="triton", out=scores)
    cosine = (scores.double() - _cosine64(a_hs, a_rw, b_hs, b_rw, 0.5)).abs().max().item()
    worst = max(gather, cosine)
    return dict(gather_err=gather, cosine_err=cosine, ok=worst <= TOLERANCE[dtype])  # NaN fails the bound


def _cosine64(a_hs, a_rw, b_hs, b_rw, alpha):
    unit = lambda x: torch.nn.functional.normalize(x.double(), dim=1)  # noqa: E731
    return unit(a_hs) @ unit(b_hs).T + alpha * unit(a_rw) @ unit(b_rw).T


def compiled_kernel_stats() -> list[dict]:
    """Registers and spills of every kernel Triton compiled in this process (none when interpreted)."""
    import importlib
    import pkgutil

    import moee_fast.kernels as package

    stats = []
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, obj in vars(module).items():
            fn = getattr(obj, "fn", obj)  # autotuned kernels wrap the JIT function
            for cache in getattr(fn, "device_caches", {}).values():
                for key, compiled in cache[0].items():
                    stats.append(dict(kernel=name, n_regs=getattr(compiled, "n_regs", None),
                                      n_spills=getattr(compiled, "n_spills", None), specialization=str(key)[:160]))
    return stats or [dict(kernel="none compiled", note="the Triton interpreter compiles nothing")]


def step_grid_limit(ctx: Context) -> dict:
    """One query against more corpus rows than CUDA's grid axis y allows blocks for (65,535)."""
    from moee_fast import ops

    n = 1_000 if ctx.dry else 4_300_000
    gen = torch.Generator(device=ctx.device).manual_seed(0)
    q_hs, c_hs = torch.randn(1, 64, device=ctx.device, generator=gen), torch.randn(n, 64, device=ctx.device, generator=gen)
    q_rw, c_rw = (torch.softmax(torch.randn(m, 64, device=ctx.device, generator=gen), -1) for m in (1, n))
    expected = _cosine64(q_hs, q_rw, c_hs, c_rw, 1.0)
    scores = torch.full((1, n), float("nan"), device=ctx.device)
    ops.combined_cosine(q_hs, q_rw, c_hs, c_rw, backend="triton", out=scores)
    values, indices = ops.topk_combined_cosine(q_hs, q_rw, c_hs, c_rw, 10, backend="triton")
    best = expected.topk(10, dim=1)
    return dict(corpus_rows=n, cosine_err=(scores.double() - expected).abs().max().item(),
                topk_value_err=(values.double() - best.values).abs().max().item(),
                topk_same_indices=bool(set(indices[0].tolist()) == set(best.indices[0].tolist())))


def step_attention(ctx: Context) -> dict:
    """varlen against padded attention on a skewed batch: the case that padding blows up."""
    try:
        from moee_fast.fastpath import attention
    except ImportError as exc:
        return dict(status="not available", reason=f"{type(exc).__name__}: {exc}")
    pack = getattr(attention, "pack", None)
    if pack is None:
        from moee_fast.packing import pack
    lengths = [64] + [4] * 60 if ctx.dry else [512] + [8] * 4032
    heads, head_dim = (2, 16) if ctx.dry else (16, 128)
    dtype = torch.float32 if ctx.dry else torch.bfloat16
    packing = pack([[1] * n for n in lengths], ctx.device)
    q, k, v = (torch.randn(1, heads, sum(lengths), head_dim, device=ctx.device, dtype=dtype) for _ in range(3))
    outputs = {}

    def measure(name):
        outputs[name], ms, peak = ctx.timed(lambda: getattr(attention, name)(q, k, v, packing, head_dim**-0.5, None))
        return dict(ms=ms, peak_mib=peak)

    rows = [caught(name, measure, name) for name in ("varlen_attention", "padded_attention")]
    result = dict(texts=len(lengths), tokens=sum(lengths), rows=rows)
    if len(outputs) == 2:
        result["max_abs_diff"] = (outputs["varlen_attention"].float() - outputs["padded_attention"].float()).abs().max().item()
    return result


SYNC_PROBE = """
import sys, torch
from moee_fast import MoEEncoder
enc = MoEEncoder.from_pretrained(sys.argv[1], device=sys.argv[2])
out = enc.encode(["a short text", "a somewhat longer text about experts and routers " * 20, "x"])
assert torch.isfinite(out.hs).all() and torch.isfinite(out.rw).all(), "non-finite embeddings"
print("encoded", tuple(out.hs.shape), tuple(out.rw.shape))
"""


def step_sync_debug_encode(ctx: Context) -> dict:
    """CUDA_LAUNCH_BLOCKING=1 makes a failing launch raise at the call that made it."""
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    proc = subprocess.run([sys.executable, "-c", SYNC_PROBE, ctx.checkpoint(), str(ctx.device)], env=env,
                          capture_output=True, text=True, timeout=LIMITS["sync_debug_encode"] - 5)
    result = dict(returncode=proc.returncode, stdout=proc.stdout.strip()[-300:])
    if proc.returncode:
        result["error"] = proc.stderr.strip().splitlines()[-1][:300] if proc.stderr.strip() else "failed"
    return result


def step_bf16_vs_fp32(ctx: Context) -> dict:
    from benchmarks.corpus import synthetic_corpus
    from moee_fast import MoEEncoder

    encoders = {dtype: MoEEncoder.from_pretrained(ctx.checkpoint(), device=ctx.device, dtype=dtype)
                for dtype in (torch.float32, torch.bfloat16)}
    texts = synthetic_corpus(encoders[torch.float32].tokenizer, 8 if ctx.dry else 256, seed=1)
    full, half = (encoders[dtype].encode(texts) for dtype in (torch.float32, torch.bfloat16))
    return dict(texts=len(texts), hs_max_row_rel_err=max_row_relative_error(half.hs, full.hs),
                rw_max_row_rel_err=max_row_relative_error(half.rw, full.rw))


def step_throughput(ctx: Context) -> dict:
    from benchmarks import gpu_report

    sizes = ["--texts", "8", "--reference-texts", "4", "--budgets", "64", "--warmup-texts", "2", "--experts", "eager"] \
        if ctx.dry else ["--texts", "1024", "--reference-texts", "256", "--budgets", "65536"]
    out_dir = ctx.args.out_dir
    gpu_report.main(["--models", "olmoe", *sizes, "--out-dir", str(out_dir), *(["--smoke"] if ctx.dry else [])])
    return dict(report="gpu_report_*.md and .jsonl beside this file")


STEPS = [step_kernels, step_grid_limit, step_attention, step_sync_debug_encode, step_bf16_vs_fp32, step_throughput]


# ------------------------------------------------------------------------------------------------ report


def render(title: str):
    def markdown(records: list[dict]) -> str:
        lines = [title, ""]
        for record in records:
            lines += [f"## {record['step']} ({record['wall_s']:.1f} s)", ""]
            lines += [f"- {key}: {value}" for key, value in record.items() if key not in ("step", "wall_s", "rows")]
            table = record.get("rows") or []
            if table:
                header = list(dict.fromkeys(key for row in table for key in row))
                lines += ["", *markdown_table(header, [[row.get(k, "") for k in header] for row in table])]
            lines.append("")
        return "\n".join(lines)

    return markdown


def run_step(step, ctx: Context, limit: float) -> dict:
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        return caught(step.__name__.removeprefix("step_"), step, ctx)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="every step on the CPU, tiny shapes, Triton's interpreter")
    parser.add_argument("--budget-s", type=float, default=570, help="wall seconds for all steps (default 570)")
    parser.add_argument("--out-dir", type=Path, help="default benchmarks/results (dry: a temp dir)")
    args = parser.parse_args(argv)
    if not args.dry and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU, and torch sees none; --dry runs every step on the CPU")
    args.out_dir = args.out_dir or (Path(tempfile.mkdtemp(prefix="gpu_first_check_")) if args.dry else RESULTS_DIR)
    ctx = Context(args)
    card = "CPU (dry run)" if args.dry else torch.cuda.get_device_name()
    title = (f"# First GPU check on {card}\n\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch "
             f"{torch.__version__}; every step below ran in this order under its own time limit.")
    log = ResultsLog(args.out_dir, card_stem("gpu_first_check", card), render(title))
    deadline = time.monotonic() + args.budget_s
    for step in STEPS:
        name = step.__name__.removeprefix("step_")
        left = deadline - time.monotonic()
        if left < 5:
            log.add(dict(step=name, skipped="no time left", wall_s=0.0))
            continue
        record = log.add(run_step(step, ctx, min(LIMITS.get(name, left), left)))
        print(f"{name}: {record.get('error') or 'done'} ({record['wall_s']:.1f} s)", file=sys.stderr, flush=True)
    print(f"written to {log.markdown} and {log.jsonl.name}")


if __name__ == "__main__":
    main()
