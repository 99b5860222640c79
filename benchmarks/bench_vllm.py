"""vLLM alone (HS only) vs vLLM with the MoEE plugin (HS + RW) vs MoEEncoder, side by side.

    scripts/vllm_env.sh VENV && VENV/bin/python benchmarks/bench_vllm.py [--model olmoe] [--texts 192] [--rounds 5] [--quick]

Runs in vLLM's environment. The same texts (the benchmark corpus: short texts and passages) go
through three engines built on one scaled checkpoint (benchmarks/models.py), fp32, alternating
every round (the order rotates): vLLM's pooling runner with last-token pooling and no
normalisation (what vLLM embeds today: HS only), the same runner with the MoEE plugin (HS and
RW), and MoEEncoder. Both vLLM engines run with their defaults (torch.compile, chunked prefill)
except the prefix cache, which is off so that no round reuses an earlier one's work. Each round
records wall time and the CPU seconds of this process and its children (vLLM's engine runs in a
child process). The plugin's HS must equal vLLM's, and its HS and RW MoEEncoder's, within 1e-5.
Results go to benchmarks/results/vllm_cpu[_quick]_<date>.md, rewritten after each round. --quick:
48 texts, 2 layers, one round.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # its default keeps one core for the scheduler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import moee_fast  # noqa: E402,F401  before torch: its OpenMP spin bound (moee_fast/openmp.py), as the `moee` command gets it
import psutil  # noqa: E402  (a vLLM dependency)
import torch  # noqa: E402

from benchmarks.corpus import synthetic_corpus  # noqa: E402
from benchmarks.helpers import (  # noqa: E402
    add_quick_arguments, max_row_relative_error, markdown_table, quick_note, results_dir, results_stem,
)
from benchmarks.models import build_checkpoint, scaled_configs  # noqa: E402
from moee_fast import MoEEncoder, loading  # noqa: E402
from moee_fast.vllm import VLLMEncoder  # noqa: E402

ENGINE = dict(dtype="float32", enable_prefix_caching=False, kv_cache_memory_bytes=1 << 28, max_model_len=1024)


def cpu_seconds() -> float:
    """CPU seconds of this process and all its children so far."""
    processes = [psutil.Process()] + psutil.Process().children(recursive=True)
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def uptime() -> str:
    """What `uptime` says (the machine's load, which other work on a shared machine adds to)."""
    import subprocess

    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"uptime failed: {exc}"


def vllm_hs_only(path: str, tokenizer):
    """texts -> HS [N, H] through vLLM's own pooling runner, tokenized as the other two engines do."""
    from vllm import LLM
    from vllm.config import PoolerConfig

    llm = LLM(model=path, runner="pooling", convert="embed", pooler_config=PoolerConfig(pooling_type="LAST", use_activation=False), **ENGINE)

    def embed(texts: list[str]) -> torch.Tensor:
        prompts = [{"prompt_token_ids": ids} for ids in tokenizer(texts)["input_ids"]]
        return torch.stack([torch.as_tensor(out.outputs.embedding) for out in llm.embed(prompts, use_tqdm=False)])

    return embed


def render(args, names, wall, cpu, errors, n_texts, tokens, load_before, load_after, uptimes) -> str:
    import vllm

    base = statistics.median(wall[names[0]])
    rows = []
    for name in names:
        median = statistics.median(wall[name])
        rows.append([name, f"{n_texts / median:.1f}", f"{tokens / median:.0f}", f"{base / median:.3f}",
                     f"{statistics.median(cpu[name]):.2f}", f"{statistics.median(cpu[names[0]]) / statistics.median(cpu[name]):.3f}"])
    plugin_cost = 1 - base / statistics.median(wall[names[1]])
    plugin_cost_cpu = 1 - statistics.median(cpu[names[0]]) / statistics.median(cpu[names[1]])
    lines = [
        f"# vLLM with and without the MoEE plugin vs MoEEncoder ({datetime.date.today().isoformat()})",
        "",
        *quick_note(args.quick),
        f"`benchmarks/bench_vllm.py --model {args.model} --texts {args.texts} --rounds {args.rounds}`: the scaled "
        f"{args.model} checkpoint (random weights), fp32, {n_texts} texts / {tokens} tokens per round, "
        f"{len(wall[names[0]])} of {args.rounds} rounds alternating the three engines (rotating order), medians. vLLM {vllm.__version__} "
        f"(CPU build), torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}; "
        f"prefix caching off, torch.compile and chunked prefill on (vLLM's defaults).",
        "",
        f"Load average before the run {load_before[0]:.1f} / after {load_after[0]:.1f} on {os.cpu_count()} cores: "
        + ("the machine was shared with other work, so wall times are noisy; the CPU-second ratio is the steadier one."
           if max(load_before[0], load_after[0]) > 0.5 * (os.cpu_count() or 1) else "a quiet machine."),
        "",
        f"`uptime` before: `{uptimes[0]}`; after: `{uptimes[1]}`.",
        "",
        *markdown_table(["engine", "texts/s", "tokens/s", "x vLLM alone (wall)", "CPU s / round", "x vLLM alone (CPU s)"], rows),
        "",
        f"The plugin's cost: {plugin_cost:.1%} of vLLM's throughput by wall time, {plugin_cost_cpu:.1%} by CPU seconds "
        "(target: at most 5%).",
        "",
        "Agreement (max row relative error): " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()) + ".",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="olmoe", choices=["olmoe", "qwen2_moe", "mixtral"])
    parser.add_argument("--texts", type=int, help="default 192; quick 48")
    parser.add_argument("--rounds", type=int, help="default 5; quick 1")
    parser.add_argument("--layers", type=int, help="override the scaled model's depth (quick: 2)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    add_quick_arguments(parser, "48 texts, 2 layers, one round")
    args = parser.parse_args()
    args.texts = args.texts or (48 if args.quick else 192)
    args.rounds = args.rounds or (1 if args.quick else 5)
    args.layers = args.layers or (2 if args.quick else None)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))  # vLLM's engine otherwise drops to one thread
    torch.set_num_threads(args.threads)

    root = tempfile.mkdtemp(prefix="bench_vllm_")
    path = build_checkpoint(args.model, root, scaled_configs(args.layers)[args.model])
    tokenizer = loading.checkpoint.load_tokenizer(path)
    texts = synthetic_corpus(tokenizer, args.texts, seed=0)
    tokens = sum(map(len, tokenizer(texts)["input_ids"]))
    load_before, uptime_before = os.getloadavg(), uptime()

    ours = MoEEncoder.from_pretrained(path)
    plugin = VLLMEncoder.from_pretrained(path, **ENGINE)
    hs_only = vllm_hs_only(path, tokenizer)
    runs = {
        "vLLM alone (HS only)": lambda: hs_only(texts),
        "vLLM + MoEE plugin (HS + RW)": lambda: plugin.encode(texts),
        "moee-fast MoEEncoder (HS + RW)": lambda: ours.encode(texts),
    }
    outputs = {name: run() for name, run in runs.items()}  # warm-up, and the outputs compared
    plain, mine, ref = outputs.values()
    errors = {"plugin HS vs vLLM HS": max_row_relative_error(mine.hs, plain),
              "plugin HS vs MoEEncoder": max_row_relative_error(mine.hs, ref.hs),
              "plugin RW vs MoEEncoder": max_row_relative_error(mine.rw.flatten(1), ref.rw.flatten(1))}
    wall = {name: [] for name in runs}
    cpu = {name: [] for name in runs}
    names = list(runs)
    out = (args.out_dir or results_dir()) / f"{results_stem('vllm_cpu', args.quick)}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    for round_index in range(args.rounds):
        order = names[round_index % 3:] + names[:round_index % 3]
        for name in order:
            c0, t0 = cpu_seconds(), time.perf_counter()
            runs[name]()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(cpu_seconds() - c0)
        print(f"round {round_index + 1}: " + ", ".join(f"{n.split(' (')[0]} {len(texts) / wall[n][-1]:.1f} texts/s" for n in order), flush=True)
        report = render(args, names, wall, cpu, errors, len(texts), tokens, load_before, os.getloadavg(), (uptime_before, uptime()))
        out.write_text(report)  # after each round: a stopped run keeps the rounds that ended
    print(report)
    print(f"written to {out}")
    if not all(error <= 1e-5 for error in errors.values()):  # NaN fails too
        print("FAILED: the engines disagree beyond 1e-5", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
