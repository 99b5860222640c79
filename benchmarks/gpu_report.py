"""moee-fast against both baselines on full-size MoE shapes, on one CUDA GPU.

OLMoE-1B-7B-, Qwen1.5-MoE-A2.7B- and DeepSeekMoE-16B-shaped models with random weights in bf16
(throughput does not depend on trained values) are built on the GPU one at a time and shared by
every path: the reference path (the published evaluation loop) and the careful transformers loop
(benchmarks/reference_path.py: SDPA, transformers' default experts implementation), then
MoEEncoder with each experts implementation and a sweep of token budgets, then vLLM's pooling
runner (`--convert embed`, last-token pooling: HS only) where vllm imports. Each run reports
tokens/s, useful-FLOP efficiency against the bf16 matmul rate measured in the same run, peak GPU
memory, and its agreement with the baselines. Every run is caught and recorded as it ends:
benchmarks/results/gpu_report_<card>.jsonl (one record a run) and .md (regenerated each time).
The targets these numbers are judged by are in benchmarks/results/TARGETS.md.

Run on a CUDA machine:   python -m benchmarks.gpu_report [--models olmoe,qwen2_moe,deepseek]
Check it on a CPU:       python -m benchmarks.gpu_report --smoke   (tiny shapes, fp32, a temp dir)
Quick mode (either):     --quick   (OLMoE only, a quarter of the texts, one budget, 1 s per figure)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.corpus import synthetic_corpus
from benchmarks.helpers import (
    QUICK_ENV,
    RESULTS_DIR,
    ResultsLog,
    card_stem,
    caught,
    markdown_table,
    matmul_flops_per_s,
    max_row_relative_error,
    quick,
    time_calls,
)
from benchmarks.models import build_causal_lm, embedding_flops, full_size_configs, smoke_configs
from benchmarks.reference_path import CAREFUL_BATCH, DeepseekCausalLM, careful_encode, reference_encode

LABELS = {"olmoe": "OLMoE-1B-7B", "qwen2_moe": "Qwen1.5-MoE-A2.7B", "deepseek": "DeepSeekMoE-16B"}
REFERENCE_BATCH = 128  # the published loop's batch size


def with_padding(tokenizer, side: str):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.padding_side = side
    return tokenizer


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def padded_tokens(lengths: list[int], batch_size: int) -> int:
    return sum(len(c) * max(c) for c in (lengths[i : i + batch_size] for i in range(0, len(lengths), batch_size)))


class ModelBench:
    """One model's runs: every path times the same texts (the reference a prefix of them, being
    slow), keeps its embeddings for the agreement columns, and is recorded as it ends."""

    def __init__(self, label: str, corpus: list[str], tokenizer, base: nn.Module, args, matmul: float, log):
        self.label, self.args, self.matmul, self.log, self.device = label, args, matmul, log, args.device
        self.lengths = [len(ids) for ids in tokenizer(corpus)["input_ids"]]
        self.corpus, self.base, self.embeddings, self._flops = corpus, base, {}, {}

    def flops(self, n_texts: int) -> float:
        """Useful FLOPs of the first n_texts, counted once (vLLM's run comes after the model is freed)."""
        if n_texts not in self._flops:
            self._flops[n_texts] = embedding_flops(self.base, self.lengths[:n_texts])
        return self._flops[n_texts]

    def run(self, path: str, encode, n_texts: int, computed_tokens=None, **extra) -> dict:
        texts, lengths = self.corpus[:n_texts], self.lengths[:n_texts]
        record = caught(f"{self.label} {path}", self._time, path, encode, texts, lengths, computed_tokens)
        record = dict(model=self.label, path=path, texts=len(texts), tokens=sum(lengths), **extra, **record)
        free_memory(self.device)
        log_line(record)
        return self.log.add(record)

    def _time(self, path, encode, texts, lengths, computed_tokens) -> dict:
        timing = time_calls(lambda: encode(texts), self.device, self.args.min_seconds)
        (hs, rw), seconds, peak = timing.result, timing.seconds, timing.peak_gib
        flops = self.flops(len(texts))
        record = dict(seconds=seconds, timed_calls=timing.calls, computed_tokens=computed_tokens or sum(lengths), peak_gib=peak,
                      tokens_per_s=sum(lengths) / seconds, texts_per_s=len(texts) / seconds,
                      useful_tflops=flops / seconds / 1e12, mfu=flops / seconds / self.matmul)
        for name, (their_hs, their_rw) in self.embeddings.items():  # the other paths, on the rows both embedded
            if name == path:
                continue
            n = min(len(hs), len(their_hs))
            record[f"hs_err_vs_{name}"] = max_row_relative_error(hs[:n], their_hs[:n])
            if rw is not None and their_rw is not None:
                record[f"rw_err_vs_{name}"] = max_row_relative_error(rw[:n], their_rw[:n])
        self.embeddings.setdefault(path, (hs, rw))
        return record


def bench_model(key: str, config, args, tokenizer, corpus: list[str], matmul: float, log) -> None:
    """Both baselines first (MoEEncoder patches the shared base model), then moee-fast, then vLLM."""
    from moee_fast import MoEEncoder
    from moee_fast.loading import models as _native_families  # noqa: F401  (registers DeepSeekMoE's adapter)
    from moee_fast.adapters import adapter_for

    label, device = LABELS[key], args.device
    config.pad_token_id, config.bos_token_id, config.eos_token_id = (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    torch.manual_seed(0)
    lm, base = build_causal_lm(config, device, args.dtype)
    bench = ModelBench(label, corpus, tokenizer, base, args, matmul, log)
    n_ref = min(args.reference_texts, len(corpus))
    left, right = with_padding(tokenizer, "left"), with_padding(tokenizer, "right")
    bench.run("reference", lambda t: reference_encode(lm, left, t, REFERENCE_BATCH), n_ref,
              padded_tokens(bench.lengths[:n_ref], REFERENCE_BATCH), experts=base.config._experts_implementation)
    base.set_attn_implementation("sdpa")
    careful = base if config.model_type != "deepseek" else DeepseekCausalLM(base, lm_head=None)
    bench.run("careful", lambda t: careful_encode(careful, right, t, CAREFUL_BATCH), len(corpus),
              padded_tokens(sorted(bench.lengths), CAREFUL_BATCH), experts=base.config._experts_implementation)

    encoder = MoEEncoder(base, tokenizer, adapter_for(config.model_type, base), name=label)
    budget = args.budget or encoder.token_budget
    ran = []
    for experts in args.experts:
        ran.append(bench.run("moee-fast", moee_encode(encoder, experts, budget), len(corpus),
                             experts=experts, token_budget=budget))
    ok = [r for r in ran if "error" not in r]
    fastest = max(ok, key=lambda r: r["tokens_per_s"])["experts"] if ok else args.experts[0]
    for other in (b for b in args.budgets if b != budget):
        bench.run("moee-fast", moee_encode(encoder, fastest, other), len(corpus), experts=fastest, token_budget=other)

    reason = vllm_unavailable(device, config)
    # A full-size checkpoint is 14-29 GB on a 64 GB disk: it lives only while vLLM runs on it.
    with tempfile.TemporaryDirectory(prefix="gpu_report_vllm_") as vllm_dir:
        if reason is None:
            lm.save_pretrained(vllm_dir)
            tokenizer.save_pretrained(vllm_dir)
        bench.base = None  # every FLOP count vLLM needs is cached: free the weights for its engine
        del encoder, lm, base, careful
        free_memory(device)
        if reason is not None:
            log.add(dict(model=label, path="vllm", skipped=reason))
            log_line(log.records[-1])
        else:
            try:
                bench.run("vllm", lambda t: vllm_embed(vllm_dir, t, args), len(corpus), experts="vllm",
                          note=f"its engine preallocates {args.vllm_memory:.0%} of the card (peak GiB is this process's)")
            finally:
                _VLLM.pop(vllm_dir, None)  # shuts its engine down before the next model is built
                free_memory(device)


def moee_encode(encoder, experts: str, budget: int):
    def encode(texts):
        encoder.model.set_experts_implementation(experts)
        encoder.token_budget = budget
        out = encoder.encode(texts)
        return out.hs, out.rw

    return encode


def vllm_unavailable(device: torch.device, config) -> str | None:
    """Why vLLM's pooling runner cannot be timed here, or None."""
    if device.type != "cuda":
        return "vLLM runs on CUDA only (this is a CPU run)"
    if config.model_type == "deepseek":
        return "the random DeepSeekMoE weights are not saved in a layout vLLM loads"
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # absent, or built for another torch
        return f"vllm does not import here ({type(exc).__name__}: {exc})"
    return None


_VLLM = {}


def vllm_embed(path: str, texts: list[str], args):
    """HS only: vLLM's pooling runner with last-token pooling, no normalisation (`--convert embed`)."""
    if path not in _VLLM:
        from vllm import LLM
        from vllm.config import PoolerConfig

        pooler = PoolerConfig(pooling_type="LAST", normalize=False)
        common = dict(model=path, runner="pooling", convert="embed", dtype="bfloat16", seed=0,
                      gpu_memory_utilization=args.vllm_memory, max_model_len=4096)
        try:
            _VLLM[path] = LLM(**common, pooler_config=pooler)
        except TypeError:  # releases before pooler_config was renamed
            _VLLM[path] = LLM(**common, override_pooler_config=pooler)
    outputs = _VLLM[path].embed(texts, use_tqdm=False)
    return torch.stack([torch.as_tensor(o.outputs.embedding, dtype=torch.float32) for o in outputs]), None


# ------------------------------------------------------------------------------------------------
# Report


def _cell(record: dict, key: str, spec: str) -> str:
    value = record.get(key)
    return "-" if value is None else format(value, spec)


def render(meta: dict):
    """The markdown of every record so far (a closure over the run's metadata)."""
    def markdown(records: list[dict]) -> str:
        rows = []
        for r in records:
            if r["path"] == "meta":
                continue
            if "seconds" not in r:
                rows.append([r["model"], r["path"], r.get("experts", ""), "", "", "", "", "", "", "", "",
                             r.get("error") and f"failed: {r['error']}" or f"skipped: {r.get('skipped')}"])
                continue
            errors = ", ".join([f"{k.replace('_err_vs_', ' vs ')} {v:.1e}" for k, v in r.items() if "_err_vs_" in k]
                               + ([r["note"]] if r.get("note") else []))
            rows.append([r["model"], r["path"], r.get("experts", ""), r.get("token_budget", "-"), r["texts"],
                         f"{r['computed_tokens'] / r['tokens']:.2f}", f"{r['seconds']:.2f}",
                         f"{r['tokens_per_s']:,.0f}", f"{r['useful_tflops']:.3g}", f"{100 * r['mfu']:.1f}%",
                         _cell(r, "peak_gib", ".1f"), errors])
        header = ["model", "path", "experts", "token budget", "texts", "computed/real", "s", "tokens/s",
                  "useful TFLOP/s", "MFU", "peak GiB", "max row rel. err (HS, RW) / note"]
        return "\n".join([
            f"# moee-fast vs the careful transformers loop and the reference path on {meta['device']}", "",
            f"{meta['date']}; torch {meta['torch']}, transformers {meta['transformers']}, {meta['dtype']}; "
            f"{meta['dtype']} matmul rate measured here: {meta['matmul_tflops']:.3g} TFLOP/s (MFU = useful FLOPs "
            "per second, no padding and no LM head, over it). Corpus: synthetic_corpus(seed=0), "
            f"{meta['texts']} texts; the reference path times the first {meta['reference_texts']}, so compare "
            "tokens/s. Random weights, " + ("smoke shapes." if meta["smoke"] else "full-size published shapes."),
            "Targets: benchmarks/results/TARGETS.md.", "",
            *markdown_table(header, rows), "", *summary(records), "",
        ])

    return markdown


def summary(records: list[dict]) -> list[str]:
    """Per model: the fastest moee-fast run and how it compares (tokens/s) with each other path."""
    done = [r for r in records if "seconds" in r]
    rows = []
    for model in dict.fromkeys(r["model"] for r in done):
        ours = [r for r in done if r["model"] == model and r["path"] == "moee-fast"]
        if not ours:
            continue
        best = max(ours, key=lambda r: r["tokens_per_s"])
        others = {r["path"]: r for r in done if r["model"] == model and r["path"] != "moee-fast"}
        rows.append([model, best["experts"], best["token_budget"], f"{best['tokens_per_s']:,.0f}",
                     f"{100 * best['mfu']:.1f}%",
                     *(f"{best['tokens_per_s'] / others[p]['tokens_per_s']:.2f}x" if p in others else "-"
                       for p in ("careful", "reference", "vllm"))])
    header = ["model", "fastest experts", "token budget", "tokens/s", "MFU", "vs careful", "vs reference", "vs vLLM (HS only)"]
    return ["## Summary: the fastest moee-fast run, tokens/s over each other path's", "", *markdown_table(header, rows)]


# ------------------------------------------------------------------------------------------------


_START = time.perf_counter()


def log_line(record: dict) -> None:
    state = record.get("error") or record.get("skipped") or f"{record['tokens_per_s']:,.0f} tokens/s, MFU {100 * record['mfu']:.1f}%"
    print(f"[{time.perf_counter() - _START:7.1f}s] {record['model']} {record['path']} {record.get('experts', '')} "
          f"{record.get('token_budget', '')}: {state}", file=sys.stderr, flush=True)


def _list(kind):
    return lambda text: [kind(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="the same code on the CPU with tiny shapes, in fp32")
    parser.add_argument("--models", type=_list(str), help=f"comma-separated, of {','.join(LABELS)} (default all; quick olmoe)")
    parser.add_argument("--texts", type=int, help="corpus texts (default 2048; smoke 40)")
    parser.add_argument("--reference-texts", type=int, help="first texts the reference path times (default 512; smoke 16)")
    parser.add_argument("--experts", type=_list(str), default=["grouped_mm", "eager"],
                        help="experts implementations timed for moee-fast at the default token budget")
    parser.add_argument("--budget", type=int, help="token budget they are compared at (default: the encoder's)")
    parser.add_argument("--budgets", type=_list(int), help="budgets swept with the fastest (default 16384,65536; smoke 256)")
    parser.add_argument("--min-seconds", type=float, help="timed work per figure, after a warm-up on the same texts "
                        "(default 5; smoke 0: one timed call)")
    parser.add_argument("--matmul-size", type=int, help="side of the square matmul for MFU (default 8192; smoke 256)")
    parser.add_argument("--vllm-memory", type=float, default=0.5, help="vLLM's gpu_memory_utilization")
    parser.add_argument("--out-dir", type=Path, help="default benchmarks/results (smoke: a temp dir)")
    parser.add_argument("--quick", action="store_true", default=quick(),
                        help=f"a first check in under 3 minutes: OLMoE only, fewer texts, one budget (same as {QUICK_ENV}=1)")
    args = parser.parse_args(argv)
    # (smoke, full) and, for the quick mode, (smoke, full) again
    defaults = dict(texts=(40, 2048), reference_texts=(16, 512), budgets=([256], [16384, 65536]),
                    min_seconds=(0.0, 5.0), matmul_size=(256, 8192), models=(list(LABELS), list(LABELS)))
    quick_defaults = dict(texts=(16, 512), reference_texts=(8, 128), budgets=([256], [16384]),
                          min_seconds=(0.0, 1.0), matmul_size=(256, 4096), models=(["olmoe"], ["olmoe"]))
    for name, (smoke, full) in (quick_defaults if args.quick else defaults).items():
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else full)
    unknown = [m for m in args.models if m not in LABELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(LABELS)}")
    if not args.smoke and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU, and torch sees none; --smoke checks it on the CPU with tiny shapes")
    # bf16 on the GPU; a CPU without bf16 matrix units runs it far slower, so smoke runs fp32.
    args.device = torch.device("cpu" if args.smoke else "cuda")
    args.dtype = torch.float32 if args.smoke else torch.bfloat16
    args.out_dir = args.out_dir or (Path(tempfile.mkdtemp(prefix="gpu_report_smoke_")) if args.smoke else RESULTS_DIR)
    return args


def main(argv=None):
    import transformers

    from moee_fast.demo import SAMPLE_TEXTS, build_tokenizer

    args = parse_args(argv)
    if args.smoke:
        torch.set_num_threads(1)  # tiny shapes: extra threads only add start-up and contention
    device_name = "CPU (smoke run)" if args.smoke else torch.cuda.get_device_name(args.device)
    matmul = matmul_flops_per_s(args.device, args.dtype, args.matmul_size)
    tokenizer = build_tokenizer(SAMPLE_TEXTS * 20, vocab_size=600)  # ids stay below every vocab; FLOPs unchanged
    corpus = synthetic_corpus(tokenizer, args.texts, seed=0)
    meta = dict(device=device_name, date=datetime.date.today().isoformat(), smoke=args.smoke, torch=torch.__version__,
                transformers=transformers.__version__, dtype=str(args.dtype).removeprefix("torch."),
                matmul_tflops=matmul / 1e12, texts=args.texts, reference_texts=args.reference_texts)
    log = ResultsLog(args.out_dir, card_stem("gpu_report", device_name), render(meta))
    log.add(dict(model="-", path="meta", skipped="run metadata", **meta))
    configs = smoke_configs() if args.smoke else full_size_configs()
    for key in args.models:
        record = caught(f"{LABELS[key]} build", bench_model, key, configs[key], args, tokenizer, corpus, matmul, log)
        if "error" in record:  # outside any timed run (building, saving for vLLM): record it too
            log.add(dict(model=LABELS[key], path="setup", **record))
        free_memory(args.device)
    print(log.markdown.read_text())
    print(f"written to {log.markdown} and {log.jsonl.name}")


if __name__ == "__main__":
    main()
