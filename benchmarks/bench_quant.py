"""What quantized loading costs and saves: fp32, bf16, NF4 and int8 side by side, on CPU.

NF4 and int8 run twice: routers quantized where the paper's runs quantized them (`quantize=`),
and routers kept in full precision (`quantize_routers=False`, rows "-fp-routers").

Run: python benchmarks/bench_quant.py [--texts 24] [--layers 4] [--families olmoe,mixtral,qwen2_moe,deepseek] [--quick]
For every scaled benchmark model (benchmarks/models.py) and precision, one fresh process loads
the checkpoint and encodes the same seeded corpus (benchmarks/corpus.py); it reports
- load peak: the most resident memory the load took above the process before it (ru_maxrss),
- resident: resident memory after the load, above that same baseline,
- anon load peak / anon resident: the same for anonymous memory only (RssAnon, sampled every
  2 ms during the load): tensors and heap, without the page cache of the memory-mapped
  checkpoint that the two above count; glibc returns freed large blocks during the load, so
  transient tensors do not stay counted. Both include the process's fixed growth while loading
  (tokenizer, lazily imported libraries: 30-45 MiB here),
- weights: the bytes of the loaded parameters and buffers (quantized storage, routed experts
  included),
- encode throughput (texts/s, tokens/s) of one timed pass after a warm-up batch,
- agreement with the fp32 embeddings of the same process layout: cosine per text of HS and of
  RW (flattened), as the median and the minimum over the corpus.
A markdown table goes to stdout and to benchmarks/results/quant_<date>.md, rewritten as each row
ends (beside it quant_<date>.jsonl, a line a row), so a stopped run keeps what it measured.
--quick: OLMoE at 2 layers, 8 texts, fp32 and nf4 only (unless families or precisions are given).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap

PRECISIONS = ("fp32", "bf16", "nf4", "nf4-fp-routers", "int8", "int8-fp-routers")

PROBE = textwrap.dedent(
    """
    import ctypes, ctypes.util, json, resource, sys, threading, time, torch, transformers
    from safetensors.torch import save_file
    from moee_fast import MoEEncoder
    from moee_fast.loading import models, quantization as quantize  # every import done before the baseline
    import bitsandbytes, accelerate
    sys.path.insert(0, sys.argv[4])
    from corpus import synthetic_corpus

    transformers.logging.set_verbosity_error()

    def resident_bytes():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    def anon_bytes():  # heap and tensors, without the file pages of the memory-mapped checkpoint
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

    def sample_anon_peak(peak, done):
        while not done.wait(0.002):
            peak[0] = max(peak[0], anon_bytes())

    # glibc keeps freed blocks below its (self-raising) mmap threshold for reuse, which would show the
    # load's transient tensors as resident for good: during the load, blocks of 256 KiB and more get
    # their own mappings and go back to the OS when freed (then the default ceiling again, for speed).
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, 256 << 10)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 20)

    path, precision, out_path, _, n_texts = sys.argv[1:6]
    baseline, anon_baseline = resident_bytes(), anon_bytes()
    anon_peak, loaded = [anon_baseline], threading.Event()
    sampler = threading.Thread(target=sample_anon_peak, args=(anon_peak, loaded))
    sampler.start()
    kwargs = {"dtype": torch.bfloat16} if precision == "bf16" else {}
    if precision.startswith(("nf4", "int8")):
        kwargs["quantize"] = precision.split("-")[0]
        if precision.endswith("-fp-routers"):
            kwargs["quantize_routers"] = False
    start = time.perf_counter()
    enc = MoEEncoder.from_pretrained(path, device="cpu", **kwargs)
    load_seconds = time.perf_counter() - start
    loaded.set()
    sampler.join()
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
    anon_peak, anon_resident = max(anon_peak[0], anon_bytes()) - anon_baseline, anon_bytes() - anon_baseline
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    resident = resident_bytes() - baseline
    weights = sum(t.numel() * t.element_size() for t in [*enc.model.parameters(), *enc.model.buffers()])
    texts = synthetic_corpus(enc.tokenizer, int(n_texts), seed=0)
    enc.encode(texts[:8])  # warm-up: first-call repacking and allocator growth
    start = time.perf_counter()
    out = enc.encode(texts)
    seconds = time.perf_counter() - start
    save_file({"hs": out.hs, "rw": out.rw}, out_path)
    print(json.dumps(dict(load_peak=peak, resident=resident, anon_peak=anon_peak, anon_resident=anon_resident, weights=weights, load_seconds=load_seconds,
                          seconds=seconds, texts=len(texts), tokens=int(out.metadata["tokens"]))))
    """
)


def run_probe(path: str, precision: str, out_path: str, n_texts: int) -> dict:
    here = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run(
        [sys.executable, "-c", PROBE, path, precision, out_path, here, str(n_texts)],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{precision} probe on {path} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def row_cosines(a, b):
    """Cosine per row of two [N, ...] tensors, flattened past the first axis, in float64."""
    import torch

    a, b = a.double().flatten(1), b.double().flatten(1)
    return torch.nn.functional.cosine_similarity(a, b, dim=1)


def agreement(out_path: str, fp32_path: str) -> dict:
    from safetensors.torch import load_file

    got, ref = load_file(out_path), load_file(fp32_path)
    hs, rw = row_cosines(got["hs"], ref["hs"]), row_cosines(got["rw"], ref["rw"])
    return dict(hs_median=hs.median().item(), hs_min=hs.min().item(), rw_median=rw.median().item(), rw_min=rw.min().item())


def measure_family(family: str, root: str, n_texts: int, layers: int, precisions=PRECISIONS):
    """Yields one row per precision as it ends."""
    from benchmarks.models import build_checkpoint, scaled_configs

    path = build_checkpoint(family, root, config=scaled_configs(layers)[family])
    outputs = {precision: os.path.join(root, f"{family}-{precision}.safetensors") for precision in precisions}
    for precision in precisions:  # fp32 first: the others are compared with it
        row = dict(family=family, precision=precision, **run_probe(path, precision, outputs[precision], n_texts))
        row.update(agreement(outputs[precision], outputs["fp32"]))
        print(f"  {family} {precision}: done", file=sys.stderr)
        yield row


def table(rows: list[dict]) -> str:
    mib = 2**20
    lines = [
        "| model | precision | weights MiB | load peak MiB | resident MiB | anon load peak MiB | anon resident MiB "
        "| anon peak / weights | load s | texts/s | tokens/s | HS cosine median (min) | RW cosine median (min) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['family']} | {r['precision']} | {r['weights'] / mib:.1f} | {r['load_peak'] / mib:.1f} | "
            f"{r['resident'] / mib:.1f} | {r['anon_peak'] / mib:.1f} | {r['anon_resident'] / mib:.1f} | "
            f"{r['anon_peak'] / r['weights']:.2f} | {r['load_seconds']:.2f} | "
            f"{r['texts'] / r['seconds']:.1f} | {r['tokens'] / r['seconds']:.0f} | "
            f"{r['hs_median']:.6f} ({r['hs_min']:.6f}) | {r['rw_median']:.6f} ({r['rw_min']:.6f}) |"
        )
    return "\n".join(lines)


def main() -> None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository: benchmarks.*
    from benchmarks.helpers import ResultsLog, add_quick_arguments, quick_note, results_dir, results_stem

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, help="corpus size (default: 24; quick 8)")
    parser.add_argument("--layers", type=int, help="decoder layers of every scaled model (default: 4; quick 2; "
                        "bf16 runs slowly on CPU)")
    parser.add_argument("--families", help="default: olmoe,mixtral,qwen2_moe,deepseek; quick: olmoe")
    parser.add_argument("--precisions", help=f"fp32 always runs first (default: {','.join(PRECISIONS)}; quick: fp32,nf4)")
    parser.add_argument("--checkpoints", help="where to keep the scaled checkpoints (default: a temporary directory)")
    add_quick_arguments(parser, "OLMoE at 2 layers, 8 texts, fp32 and nf4")
    args = parser.parse_args()
    args.texts = args.texts or (8 if args.quick else 24)
    args.layers = args.layers or (2 if args.quick else 4)
    args.families = args.families or ("olmoe" if args.quick else "olmoe,mixtral,qwen2_moe,deepseek")
    args.precisions = args.precisions or ("fp32,nf4" if args.quick else ",".join(PRECISIONS))
    precisions = ["fp32"] + [p for p in args.precisions.split(",") if p != "fp32"]
    unknown = sorted(set(precisions) - set(PRECISIONS))
    if unknown:
        parser.error(f"unknown precisions {', '.join(unknown)}; choose from {', '.join(PRECISIONS)}")
    import torch

    load_before = os.getloadavg()[0]

    def report(rows: list[dict]) -> str:
        header = (
            f"Machine: {platform.machine()}, {os.cpu_count()} cores, load average {load_before:.1f} before the run and "
            f"{os.getloadavg()[0]:.1f} after the last row, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads; the scaled models at {args.layers} layers; "
            f"{args.texts} texts of the seeded synthetic corpus per model; one process per row. NF4: double quantization, computing in the "
            "load dtype (fp32 here; the paper's runs computed in bf16 on GPU); every linear, routed expert matrix and router the paper's "
            "runs quantized (-fp-routers: routers and gating linears kept fp32); 4-bit weights decoded in fp32 by moee-fast's decoder. "
            "Timings are noisy where other work shares the machine; the agreement columns never are."
        )
        return "".join(line + "\n" for line in quick_note(args.quick)) + f"{header}\n\n{table(rows)}\n"

    log = ResultsLog(args.out_dir or results_dir(), results_stem("quant", args.quick), report)
    with tempfile.TemporaryDirectory() as scratch:
        root = args.checkpoints or scratch
        for family in args.families.split(","):
            for row in measure_family(family, root, args.texts, args.layers, precisions):
                log.add(row)
    print(report(log.records))
    print(f"written to {log.markdown}")


if __name__ == "__main__":
    main()
