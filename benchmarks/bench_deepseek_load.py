"""Peak resident memory of loading a DeepSeekMoE checkpoint in bfloat16 on CPU.

Run: python -m benchmarks.bench_deepseek_load [CHECKPOINT_DIR] [--quick]
Without a directory it writes a ~1 GB random bf16 checkpoint in the published layout (256 MiB
shards, per-expert tensors, an lm_head that is not loaded) to a temporary directory; --quick: a
~0.24 GB one (2 layers, 64 MiB shards). The result goes to benchmarks/results/deepseek_load_<date>.md
(and .jsonl) as soon as it is measured.
The load runs in a fresh process; its peak resident memory (ru_maxrss) less the resident memory
after every import is reported as a multiple of the loaded weights. Streaming the shards one
tensor at a time keeps it near 1x: a load that held two copies would show 2x.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap

import torch

PROBE = textwrap.dedent(
    """
    import resource, sys, torch, transformers
    from moee_fast import MoEEncoder
    from moee_fast.loading import models  # every import done before the baseline

    def resident_bytes():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    baseline = resident_bytes()
    enc = MoEEncoder.from_pretrained(sys.argv[1], device="cpu", dtype=torch.bfloat16)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    loaded = sum(p.numel() * p.element_size() for p in enc.model.parameters())
    print(peak - baseline, loaded)
    """
)

# ~0.92 GB of bf16 weights: 5 layers (layer 0 dense), 32 routed + 2 shared experts of width 1024.
SYNTHETIC = dict(
    hidden_size=1024, intermediate_size=4096, moe_intermediate_size=1024, num_hidden_layers=5,
    num_attention_heads=8, n_routed_experts=32, n_shared_experts=2, num_experts_per_tok=6,
    first_k_dense_replace=1,
)


def write_synthetic_checkpoint(path: str, layers: int = SYNTHETIC["num_hidden_layers"], shard_mib: int = 256) -> None:
    from moee_fast.demo import SAMPLE_TEXTS, build_tokenizer
    from benchmarks.models import save_random_checkpoint
    from moee_fast.loading.models.deepseek import DeepseekConfig

    tokenizer = build_tokenizer(SAMPLE_TEXTS * 4, vocab_size=400)
    config = DeepseekConfig(**{**SYNTHETIC, "num_hidden_layers": layers}, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    save_random_checkpoint(config, path, dtype=torch.bfloat16, max_shard_bytes=shard_mib * 2**20)
    tokenizer.save_pretrained(path)


def measure(path: str) -> tuple[int, int]:
    """(peak extra resident bytes of the load, bytes of the loaded weights)."""
    result = subprocess.run([sys.executable, "-c", PROBE, path], capture_output=True, text=True, check=True)
    extra, loaded = map(int, result.stdout.split()[-2:])
    return extra, loaded


def render(records: list[dict]) -> str:
    from benchmarks.helpers import markdown_table, quick_note

    rows = [[r["checkpoint"], f"{r['files_gb']:.3f}", f"{r['loaded_gb']:.3f}", f"{r['peak_gb']:.3f}", f"{r['ratio']:.2f}x"]
            for r in records]
    return "\n".join([
        "# Peak resident memory of a DeepSeekMoE bf16 load on CPU", "",
        *quick_note(any(r["quick"] for r in records)),
        "Peak resident memory of the load (fresh process, imports excluded) against the loaded weights (bf16, no lm_head).", "",
        *markdown_table(["checkpoint", "files GB", "loaded GB", "load peak GB", "peak / weights"], rows),
    ]) + "\n"


def main() -> None:
    from benchmarks.helpers import ResultsLog, add_quick_arguments, results_dir, results_stem

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", help="a DeepSeekMoE checkpoint directory (default: a synthetic one)")
    add_quick_arguments(parser, "a 2-layer synthetic checkpoint of ~0.24 GB")
    args = parser.parse_args()
    log = ResultsLog(args.out_dir or results_dir(), results_stem("deepseek_load", args.quick), render)
    with tempfile.TemporaryDirectory() as scratch:
        path = args.checkpoint or scratch
        if not args.checkpoint:
            write_synthetic_checkpoint(path, *((2, 64) if args.quick else ()))
        files = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
        extra, loaded = measure(path)
    log.add(dict(checkpoint=args.checkpoint or "synthetic", quick=args.quick, files_gb=files / 1e9, loaded_gb=loaded / 1e9,
                 peak_gb=extra / 1e9, ratio=extra / loaded))
    print(f"checkpoint files {files / 1e9:.3f} GB, loaded weights {loaded / 1e9:.3f} GB (bf16, no lm_head)")
    print(f"load peak resident memory: {extra / 1e9:.3f} GB = {extra / loaded:.2f}x the loaded weights")
    print(f"written to {log.markdown}")


if __name__ == "__main__":
    main()
