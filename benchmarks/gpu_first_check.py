"""The first run on a GPU: what the CPU cannot check, in at most 10 minutes, saving as it goes.

In order, each step under its own time limit, every outcome (failure and timeout included)
appended to benchmarks/results/gpu_first_check_<card>.jsonl and the .md regenerated:
1. kernels: the Triton ops on poisoned outputs across expert counts (8, 60, 64, 160, 256) and
   dtypes against float64 (the fused MoE experts too), then registers and spills of every
   compiled kernel;
2. grid limit: one query against more than 4.2M fp32 corpus rows (top-k and the full row);
3. attention: varlen against padded attention on a skewed batch (one 512-token text and 4,032
   8-token texts): time, peak memory, largest difference;
4. sync debugging: one encode in a child process with CUDA_LAUNCH_BLOCKING=1;
5. bf16 against fp32: the same texts encoded in both, row relative error of HS and RW;
6. throughput: benchmarks.gpu_report on the OLMoE shape for the time left.

The budget (default 480 s) counts from process start, imports included, so the whole run fits
one 10-minute command with room to spare; a step past its limit is stopped (StepTimeout is a
BaseException, so no `except Exception` swallows it; the subprocess steps are killed with their
process group) and recorded, and a watchdog ends the process 20 s past the budget whatever hangs.
Temporary checkpoints are removed at the end. An exported TRITON_INTERPRET is refused unless --dry:
it would silently run the "GPU" kernels in Triton's CPU interpreter.

Run on a CUDA machine:  python -m benchmarks.gpu_first_check
Check it on a CPU:      python -m benchmarks.gpu_first_check --dry   (tiny shapes, the Triton interpreter)
Quick mode (either):    --quick   (a 170 s budget unless --budget-s says otherwise: the throughput step gets less)
"""

from __future__ import annotations

import time

PROCESS_START = time.monotonic()  # the budget counts from here, before torch and triton import

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

if "--dry" in sys.argv:  # before triton is imported: its CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from benchmarks.helpers import (  # noqa: E402
    QUICK_ENV,
    RESULTS_DIR,
    ResultsLog,
    card_stem,
    caught,
    markdown_table,
    max_row_relative_error,
    quick,
    time_calls,
)

EXPERT_COUNTS = (8, 60, 64, 160, 256)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
# seconds per step on the GPU (--dry: DRY_LIMIT_SCALE times, the interpreter on a shared CPU);
# the throughput report gets what is left of --budget-s
LIMITS = dict(kernels=150, grid_limit=45, attention=45, sync_debug_encode=75, bf16_vs_fp32=45)
DRY_LIMIT_SCALE = 6
HARD_STOP_GRACE_S = 20  # past the budget, the watchdog ends the process


class StepTimeout(BaseException):
    """A step ran past its limit. Not an Exception: `caught()` and any `except Exception` inside
    a step must let it through to `run_step`, which records it."""


def _alarm(signum, frame):
    raise StepTimeout("the step ran past its time limit")


class Context:
    """What the steps share: the device, the shapes for it, and one small checkpoint."""

    def __init__(self, args):
        self.dry, self.args = args.dry, args
        self.device = torch.device("cpu" if args.dry else "cuda")
        self.min_seconds = 0.0 if args.dry else 5.0  # timed work per figure (dry: one timed call)
        self._scratch = tempfile.mkdtemp(prefix="gpu_first_check_")
        self._checkpoint = None

    def checkpoint(self) -> str:
        if self._checkpoint is None:
            from benchmarks.models import build_checkpoint, scaled_configs, smoke_configs

            config = smoke_configs()["olmoe"] if self.dry else scaled_configs(num_hidden_layers=2)["olmoe"]
            self._checkpoint = build_checkpoint("olmoe", os.path.join(self._scratch, "olmoe"), config=config)
        return self._checkpoint

    def close(self) -> None:
        shutil.rmtree(self._scratch, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ steps


def step_kernels(ctx: Context) -> dict:
    from moee_fast import ops

    rows = []
    for experts in EXPERT_COUNTS:
        for dtype in DTYPES:
            for layers in (1, 2 if ctx.dry else 4):  # one layer: the encoder's call, no pointer table
                rows.append(dict(experts=experts, dtype=str(dtype).removeprefix("torch."), layers=layers,
                                 **_kernel_errors(ctx, ops, experts, dtype, layers)))
    for experts, top_k in ((8, 2), (60, 4), (64, 8), (160, 6)):
        for dtype in (torch.bfloat16, torch.float16):
            rows.append(dict(experts=experts, dtype=str(dtype).removeprefix("torch."), layers="fused MoE",
                             top_k=top_k, **_fused_moe_error(ctx, ops, experts, top_k, dtype)))
    failed = [f"E={r['experts']} {r['dtype']} L={r['layers']}" for r in rows if not r["ok"]]
    return dict(ok=not failed, failed=", ".join(failed), rows=rows + compiled_kernel_stats())


def _fused_moe_error(ctx, ops, experts: int, top_k: int, dtype) -> dict:
    """Largest row relative error of the fused MoE experts against float64, NaN-poisoned output."""
    gen = torch.Generator().manual_seed(experts)
    tokens, hidden, inter = (11, 40, 24) if ctx.dry else (1000, 2048, 1024)
    x = torch.randn(tokens, hidden, generator=gen).to(ctx.device, dtype)
    weights, index = (t.to(ctx.device) for t in torch.softmax(torch.randn(tokens, experts, generator=gen), -1).topk(top_k, -1))
    gate_up = (torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5).to(ctx.device, dtype)
    down = (torch.randn(experts, hidden, inter, generator=gen) / inter**0.5).to(ctx.device, dtype)
    out = torch.full((tokens, hidden), float("nan"), device=ctx.device, dtype=dtype)
    ops.fused_moe_experts(x, index, weights, gate_up, down, out=out)
    expected = torch.zeros(tokens, hidden, dtype=torch.float64, device=ctx.device)
    for e in range(experts):
        token, slot = (index == e).nonzero(as_tuple=True)
        h = x[token].double() @ gate_up[e].double().T
        y = (torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]) @ down[e].double().T
        expected.index_add_(0, token, y * weights[token, slot, None].double())
    error = ((out.double() - expected).norm(dim=1) / expected.norm(dim=1)).max().item()
    return dict(moe_row_err=error, ok=error <= TOLERANCE[dtype])  # NaN fails the bound


def _kernel_errors(ctx, ops, experts: int, dtype, layers: int) -> dict:
    """Largest absolute error of the Triton ops against float64 on outputs poisoned with NaN."""
    gen = torch.Generator().manual_seed(experts)
    batch, tokens = (9, 3) if ctx.dry else (37, 5)
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
    from moee_fast.packing import pack
    lengths = [64] + [4] * 60 if ctx.dry else [512] + [8] * 4032
    heads, head_dim = (2, 16) if ctx.dry else (16, 128)
    dtype = torch.float32 if ctx.dry else torch.bfloat16
    _, _, packing = pack([[1] * n for n in lengths], ctx.device)
    gen = torch.Generator(device=ctx.device).manual_seed(0)
    q, k, v = (torch.randn(1, heads, sum(lengths), head_dim, device=ctx.device, dtype=dtype, generator=gen) for _ in range(3))
    # Each text alone through SDPA in float64: what both paths must equal.
    expected = torch.cat([
        torch.nn.functional.scaled_dot_product_attention(
            *(x[:, :, start:end].double() for x in (q, k, v)), is_causal=True, scale=head_dim**-0.5).transpose(1, 2)
        for start, end in zip(packing.cu_seqlens[:-1].tolist(), packing.cu_seqlens[1:].tolist())], 1)
    names = ["padded_attention"]
    if ctx.device.type == "cuda" and dtype in attention._VARLEN_DTYPES:  # varlen_attn runs on CUDA only
        names.insert(0, "varlen_attention")

    def measure(name):
        timing = time_calls(lambda: getattr(attention, name)(q, k, v, packing, head_dim**-0.5, None), ctx.device,
                            ctx.min_seconds)
        err = (timing.result.double() - expected).abs().max().item()
        return dict(ms=1e3 * timing.seconds, timed_calls=timing.calls, peak_gib=timing.peak_gib, max_abs_err=err,
                    ok=err <= TOLERANCE[dtype] * 4)  # NaN fails the bound

    rows = [caught(name, measure, name) for name in names]
    failed = [r["step"] for r in rows if not r.get("ok")]
    return dict(texts=len(lengths), tokens=sum(lengths), ok=not failed, failed=", ".join(failed), rows=rows)


SYNC_PROBE = """
import sys, torch
from moee_fast import MoEEncoder
enc = MoEEncoder.from_pretrained(sys.argv[1], device=sys.argv[2])
out = enc.encode(["a short text", "a somewhat longer text about experts and routers " * 20, "x"])
assert torch.isfinite(out.hs).all() and torch.isfinite(out.rw).all(), "non-finite embeddings"
print("encoded", tuple(out.hs.shape), tuple(out.rw.shape))
"""


def run_child(args: list[str], env: dict | None = None) -> dict:
    """A child process in its own process group, killed with all of its children if the step's
    alarm fires (vLLM's engine runs in processes of its own)."""
    proc = subprocess.Popen(args, env=env, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate()
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    result = dict(returncode=proc.returncode, stdout=stdout.strip()[-300:])
    if proc.returncode:
        result["error"] = stderr.strip().splitlines()[-1][:300] if stderr.strip() else f"exit status {proc.returncode}"
    return result


def step_sync_debug_encode(ctx: Context) -> dict:
    """CUDA_LAUNCH_BLOCKING=1 makes a failing launch raise at the call that made it."""
    return run_child([sys.executable, "-c", SYNC_PROBE, ctx.checkpoint(), str(ctx.device)],
                     dict(os.environ, CUDA_LAUNCH_BLOCKING="1"))


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
    """benchmarks.gpu_report in a child process: it writes each run as it ends, so a kill at the
    step's limit keeps every figure already measured."""
    sizes = ["--smoke", "--texts", "8", "--reference-texts", "4", "--budgets", "64", "--experts", "eager"] \
        if ctx.dry else ["--texts", "1024", "--reference-texts", "256", "--budgets", "65536"]
    result = run_child([sys.executable, "-m", "benchmarks.gpu_report", "--models", "olmoe", *sizes,
                        "--out-dir", str(ctx.args.out_dir)])
    report = next(Path(ctx.args.out_dir).glob("gpu_report_*.jsonl"), None)
    runs = [json.loads(line) for line in report.read_text().splitlines()] if report else []
    failed = [f"{r['path']} {r.get('experts', '')}".strip() for r in runs if "error" in r]
    result.update(report=report.name if report else None, runs=len(runs), failed_runs=", ".join(failed))
    if "error" not in result and (not runs or failed):
        result["error"] = f"failed runs: {', '.join(failed)}" if failed else "gpu_report recorded nothing"
    return result


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
    """The step's record: its result, {"error": ...} for an exception, or a StepTimeout error
    when it ran past `limit` seconds."""
    name = step.__name__.removeprefix("step_")
    start = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        return caught(name, step, ctx)
    except StepTimeout as exc:
        return dict(step=name, error=f"StepTimeout: {exc} ({limit:.0f} s)", wall_s=round(time.perf_counter() - start, 3))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def start_watchdog(log: ResultsLog, hard_deadline: float) -> None:
    """Ends the process at `hard_deadline` (monotonic) even if a step is stuck where the alarm
    cannot reach (inside a C call), after recording that it did."""
    def stop():
        log.add(dict(step="watchdog", error="stopped at the hard deadline: a step ignored its alarm",
                     wall_s=round(time.monotonic() - PROCESS_START, 1)))
        os._exit(3)

    timer = threading.Timer(max(0.0, hard_deadline - time.monotonic()), stop)
    timer.daemon = True
    timer.start()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="every step on the CPU, tiny shapes, Triton's interpreter")
    parser.add_argument("--budget-s", type=float,
                        help="wall seconds from process start for all steps (default 480: one 10-minute command, with room; "
                        "quick: 170)")
    parser.add_argument("--quick", action="store_true", default=quick(), help=f"a first check in under 3 minutes (same as {QUICK_ENV}=1)")
    parser.add_argument("--out-dir", type=Path, help="default benchmarks/results (dry: a temp dir)")
    args = parser.parse_args(argv)
    args.budget_s = args.budget_s or (170 if args.quick else 480)
    if not args.dry and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("TRITON_INTERPRET is set: the Triton kernels would run in the CPU interpreter, not on the GPU; "
                     "unset it (or use --dry)")
    if not args.dry and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU, and torch sees none; --dry runs every step on the CPU")
    args.out_dir = args.out_dir or (Path(tempfile.mkdtemp(prefix="gpu_first_check_")) if args.dry else RESULTS_DIR)
    ctx = Context(args)
    card = "CPU (dry run)" if args.dry else torch.cuda.get_device_name()
    title = (f"# First GPU check on {card}\n\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch "
             f"{torch.__version__}; every step below ran in this order under its own time limit.")
    log = ResultsLog(args.out_dir, card_stem("gpu_first_check", card), render(title))
    deadline = PROCESS_START + args.budget_s
    start_watchdog(log, deadline + HARD_STOP_GRACE_S)
    scale = DRY_LIMIT_SCALE if args.dry else 1
    try:
        for step in STEPS:
            name = step.__name__.removeprefix("step_")
            left = deadline - time.monotonic()
            if left < 5:
                log.add(dict(step=name, skipped="no time left", wall_s=0.0))
                continue
            record = log.add(run_step(step, ctx, min(scale * LIMITS.get(name, left), left)))
            print(f"{name}: {record.get('error') or 'done'} ({record['wall_s']:.1f} s)", file=sys.stderr, flush=True)
    finally:
        ctx.close()
    print(f"written to {log.markdown} and {log.jsonl.name}")


if __name__ == "__main__":
    main()
