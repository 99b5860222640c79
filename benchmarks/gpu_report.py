"""moee-fast against the reference path on full-size MoE shapes, on one CUDA GPU.

OLMoE-1B-7B-, Qwen1.5-MoE-A2.7B- and DeepSeekMoE-16B-shaped models with random weights in bf16
(throughput does not depend on trained values) are built directly on the GPU, one at a time; the
reference path (the published evaluation loop, benchmarks/reference_path.py) and MoEEncoder share
the same weights. For each model: tokens/s, texts/s, MFU (useful FLOPs per second, from
`embedding_flops`, over this card's bf16 matmul rate measured in the same run), peak GPU memory,
and how closely the two paths' HS and RW agree. moee-fast runs with each experts implementation
transformers offers and a sweep of token budgets; the fastest is the recommendation. Prints a
table and writes it (plus the raw numbers as JSON) to
benchmarks/results/gpu_report_<gpu>_<date>.{md,json}.

Run on a CUDA machine:   python benchmarks/gpu_report.py [--models olmoe,qwen2_moe,deepseek]
Check it on a CPU:       python benchmarks/gpu_report.py --smoke
(--smoke runs the same code on the CPU with tiny shapes, in fp32, and writes to a temp dir.)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import re
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from corpus import synthetic_corpus
from gpu_ops_report import bf16_gemm_tflops
from models import embedding_flops
from reference_path import DeepseekCausalLM, reference_encode

RESULTS_DIR = Path(__file__).resolve().parent / "results"

LABELS = {"olmoe": "OLMoE-1B-7B", "qwen2_moe": "Qwen1.5-MoE-A2.7B", "deepseek": "DeepSeekMoE-16B"}
TARGET_MODEL = "olmoe"
TARGET_MFU = 0.40
TARGET_SPEEDUP = 5.0
# Relative error per row above which the two paths are flagged as disagreeing (bf16: they are
# never bit-identical, padding side and batch composition differ).
AGREEMENT_FLAG = 5e-2
REFERENCE_BATCH = 128  # the published loop's batch size
# batched_mm gathers every (token, expert) pair's weight matrices: its batches are capped so the
# gathered weights take at most this fraction of the free memory.
GATHER_MEMORY_FRACTION = 0.25


def full_size_configs() -> dict:
    """The published configs' shapes (values that change no FLOP count, like rope scaling, too)."""
    from transformers import OlmoeConfig, Qwen2MoeConfig

    from moee_fast.models.deepseek import DeepseekConfig

    return {
        "olmoe": OlmoeConfig(
            hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
            num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, vocab_size=50304,
            max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5, norm_topk_prob=False,
            tie_word_embeddings=False,
        ),
        "qwen2_moe": Qwen2MoeConfig(
            hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
            shared_expert_intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
            num_key_value_heads=16, num_experts=60, num_experts_per_tok=4, decoder_sparse_step=1,
            vocab_size=151936, max_position_embeddings=8192, rope_theta=1e6, rms_norm_eps=1e-6,
            norm_topk_prob=False, tie_word_embeddings=False,
        ),
        "deepseek": DeepseekConfig(
            hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=28,
            num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64, n_shared_experts=2,
            num_experts_per_tok=6, first_k_dense_replace=1, moe_layer_freq=1, vocab_size=102400,
            max_position_embeddings=4096, rms_norm_eps=1e-6, norm_topk_prob=False,
        ),
    }


def smoke_configs() -> dict:
    """Each family's traits (OLMoE's qk-norm, Qwen's shared expert, DeepSeek's dense first layer
    and shared experts) at a size a CPU runs in seconds."""
    from transformers import OlmoeConfig, Qwen2MoeConfig

    from moee_fast.models.deepseek import DeepseekConfig

    common = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                  vocab_size=1024, max_position_embeddings=4096, eos_token_id=None, bos_token_id=None)
    return {
        "olmoe": OlmoeConfig(intermediate_size=32, num_experts=16, num_experts_per_tok=4, **common),
        "qwen2_moe": Qwen2MoeConfig(intermediate_size=128, moe_intermediate_size=48,
                                    shared_expert_intermediate_size=128, num_experts=15, num_experts_per_tok=4,
                                    **common),
        "deepseek": DeepseekConfig(intermediate_size=192, moe_intermediate_size=48, n_routed_experts=16,
                                   n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, **common),
    }


# ------------------------------------------------------------------------------------------------
# Timing and the card's matmul rate


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dense_matmul_tflops(device: torch.device, n: int, dtype: torch.dtype) -> float:
    """The dense matmul rate MFU is measured against: a large square matmul in the models' dtype,
    median of several. On the GPU it is gpu_ops_report's bf16 GEMM, timed with CUDA events."""
    if device.type == "cuda":
        if dtype != torch.bfloat16:
            raise ValueError(f"the GPU matmul rate is measured in bf16, the models run in {dtype}")
        return bf16_gemm_tflops(n)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    times = []
    for _ in range(3 + 15):  # the first 3 warm up
        start = time.perf_counter()
        torch.matmul(a, b)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times[3:]) / 1e12


def timed(fn, device: torch.device):
    """(result, seconds) of fn, synchronized on both sides."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# Models with random weights, built in place


@torch.no_grad()
def randomize_(model: nn.Module, std: float = 0.02) -> None:
    """Normal(0, std) matrices, unit norms, zero biases: real checkpoints are not all 0/1, and
    routing on all-equal router weights would be degenerate."""
    for name, param in model.named_parameters():
        if param.dim() >= 2:
            param.normal_(0.0, std)
        elif "norm" in name:
            param.fill_(1.0)
        else:
            param.zero_()


def build_causal_lm(config, device: torch.device, dtype: torch.dtype):
    """(causal LM for the reference path, its base model for moee-fast): one set of weights."""
    if config.model_type == "deepseek":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        from moee_fast.models.deepseek import DeepseekModel

        with torch.device("meta"):
            base = DeepseekModel(config).to(dtype)  # no memory until to_empty: no fp32 copy
        base.to_empty(device=device)
        with torch.device(device):
            base.rotary_emb = LlamaRotaryEmbedding(config)  # fp32 frequencies, as the loader builds them
            lm = DeepseekCausalLM(base, nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype))
        base.config.dtype = dtype
    else:
        from transformers import AutoModelForCausalLM

        with torch.device(device):
            lm = AutoModelForCausalLM.from_config(config, dtype=dtype)
        if any(p.device.type != device.type for p in lm.parameters()):  # should from_config ignore the device context
            lm.to(device)
        base = lm.model
    randomize_(lm)
    return lm.eval().requires_grad_(False), base.eval()


# ------------------------------------------------------------------------------------------------
# Runs


@dataclass
class Run:
    model: str
    path: str  # "moee-fast" or "reference"
    experts: str
    token_budget: int | None  # moee-fast: tokens per packed forward; reference: None (batches of 128)
    texts: int
    tokens: int
    computed_tokens: int  # run through the model, padding included
    seconds: float
    useful_flops: float
    matmul_tflops: float
    peak_gib: float | None
    hs_max_rel_err: float | None = None
    rw_max_rel_err: float | None = None
    note: str = ""
    error: str = ""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def texts_per_s(self) -> float:
        return self.texts / self.seconds if self.seconds else 0.0

    @property
    def useful_tflops(self) -> float:
        return self.useful_flops / self.seconds / 1e12 if self.seconds else 0.0

    @property
    def mfu(self) -> float:
        return self.useful_tflops / self.matmul_tflops

    def as_dict(self) -> dict:
        return asdict(self) | dict(tokens_per_s=self.tokens_per_s, texts_per_s=self.texts_per_s,
                                   useful_tflops=self.useful_tflops, mfu=self.mfu)


@dataclass
class Workload:
    """The corpus texts one run times, and the useful FLOPs of embedding them."""

    indices: list[int]  # positions in the corpus, to line rows up across paths
    texts: list[str]
    lengths: list[int]  # tokens per text, special tokens included, as both paths tokenize
    flops: float


def workload(corpus: list[str], lengths: list[int], positions, base: nn.Module) -> Workload:
    positions = list(positions)
    chosen = [lengths[p] for p in positions]
    return Workload(positions, [corpus[p] for p in positions], chosen, embedding_flops(base, chosen))


def max_row_rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    ours, theirs = ours.flatten(1).float(), theirs.flatten(1).float()
    return ((ours - theirs).norm(dim=1) / theirs.norm(dim=1).clamp_min(1e-30)).max().item()


def agreement(run: Run, work: Workload, hs, rw, reference) -> None:
    """Fill run's HS/RW error against the reference rows of the same corpus texts."""
    if reference is None:
        return
    ref_indices, ref_hs, ref_rw = reference
    ref_row = {index: row for row, index in enumerate(ref_indices)}
    ours = [row for row, index in enumerate(work.indices) if index in ref_row]
    if not ours:
        return
    theirs = [ref_row[work.indices[row]] for row in ours]
    run.hs_max_rel_err = max_row_rel_err(hs[ours], ref_hs[theirs])
    run.rw_max_rel_err = max_row_rel_err(rw[ours], ref_rw[theirs])
    if max(run.hs_max_rel_err, run.rw_max_rel_err) > AGREEMENT_FLAG:
        run.note = _join(run.note, f"DISAGREES with the reference (> {AGREEMENT_FLAG:g})")


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def reference_padded_tokens(lengths: list[int], batch_size: int) -> int:
    chunks = [lengths[s : s + batch_size] for s in range(0, len(lengths), batch_size)]
    return sum(len(chunk) * max(chunk) for chunk in chunks)


def run_reference(name, lm, tokenizer, work: Workload, warmup_texts: int, device, matmul_tflops):
    """The published loop; on out-of-memory the batch is halved (and said so), as a user would."""
    batch_size = REFERENCE_BATCH
    while True:
        try:
            reference_encode(lm, tokenizer, work.texts[:warmup_texts], batch_size=batch_size)
            reset_peak_memory(device)
            encode = lambda: reference_encode(lm, tokenizer, work.texts, batch_size=batch_size)  # noqa: E731
            (hs, rw), seconds = timed(encode, device)
            break
        except torch.OutOfMemoryError:
            if batch_size == 1:
                raise
        # Out of the handler: the failed forward's tensors live as long as its traceback does.
        free_memory(device)
        batch_size //= 2
        log(f"{name}: reference ran out of memory; retrying with batches of {batch_size}")
    note = f"batches of {batch_size} ({REFERENCE_BATCH} ran out of memory)" if batch_size != REFERENCE_BATCH else ""
    run = Run(name, "reference", lm.model.config._experts_implementation, None, len(work.texts), sum(work.lengths),
              reference_padded_tokens(work.lengths, batch_size), seconds, work.flops, matmul_tflops,
              peak_memory_gib(device), note=note)
    return run, (work.indices, hs, rw)


def gathered_bytes_per_token(model: nn.Module) -> int:
    """Bytes of expert weights batched_mm gathers per token: top-k copies of one expert."""
    experts = next(m for m in model.modules() if hasattr(m, "gate_up_proj") and hasattr(m, "down_proj"))
    per_expert = (experts.gate_up_proj[0].numel() + experts.down_proj[0].numel()) * experts.gate_up_proj.element_size()
    return model.config.num_experts_per_tok * per_expert


def run_moee(name, encoder, work: Workload, warmup_texts: int, experts: str, budget: int, device,
             matmul_tflops, reference, note=""):
    encoder.model.set_experts_implementation(experts)
    encoder.token_budget = budget
    encoder.encode(work.texts[:warmup_texts])
    reset_peak_memory(device)
    out, seconds = timed(lambda: encoder.encode(work.texts), device)
    if encoder.token_budget < budget:  # the encoder halved its batches after running out of memory
        note = _join(note, f"out of memory at {budget}: batches split down to {encoder.token_budget} tokens")
    # Packed batches: the model runs the real tokens only.
    run = Run(name, "moee-fast", experts, budget, len(work.texts), sum(work.lengths), sum(work.lengths), seconds,
              work.flops, matmul_tflops, peak_memory_gib(device), note=note)
    agreement(run, work, out.hs, out.rw, reference)
    return run


def failed(name, path, experts, budget, work: Workload, matmul_tflops, exc: BaseException) -> Run:
    """A run that raised, kept in the report; anything but running out of memory prints its traceback."""
    if isinstance(exc, torch.OutOfMemoryError):
        message = "out of memory"
    else:
        traceback.print_exception(exc, file=sys.stderr)
        message = f"{type(exc).__name__}: {exc}"
    return Run(name, path, experts, budget, len(work.texts), sum(work.lengths), 0, 0.0, work.flops,
               matmul_tflops, None, error=message.splitlines()[0][:200])


def bench_model(key: str, config, args, tokenizer, corpus: list[str], device, matmul_tflops) -> tuple[list[Run], dict]:
    """Every run of one model, and what the report says about its build."""
    from moee_fast import MoEEncoder
    from moee_fast import models as _native_families  # noqa: F401  (registers DeepSeekMoE's adapter)
    from moee_fast.adapters import adapter_for

    name = LABELS[key]
    config.pad_token_id, config.bos_token_id, config.eos_token_id = (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    )
    torch.manual_seed(0)
    log(f"{name}: building {args.dtype_name} random weights on {device}")
    lm, base = build_causal_lm(config, device, args.dtype)
    weights_gib = sum(p.numel() * p.element_size() for p in lm.parameters()) / 2**30
    info = dict(weights_gib=weights_gib, experts_default=base.config._experts_implementation,
                attention=base.config._attn_implementation)
    log(f"{name}: {weights_gib:.1f} GiB of weights; experts default {info['experts_default']}, "
        f"attention {info['attention']}")

    lengths = [len(ids) for ids in tokenizer(corpus)["input_ids"]]
    everything = workload(corpus, lengths, range(len(corpus)), base)
    runs: list[Run] = []

    # The reference first: MoEEncoder's hooks stay on the shared base model once it is built.
    ref_work = workload(corpus, lengths, range(min(args.reference_texts, len(corpus))), base)
    reference = None
    try:
        run, reference = run_reference(name, lm, tokenizer, ref_work, args.warmup_texts, device, matmul_tflops)
        run.note = _join(run.note, f"timed on the first {len(ref_work.texts)} texts")
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        run = failed(name, "reference", info["experts_default"], None, ref_work, matmul_tflops, exc)
    free_memory(device)
    runs.append(run)
    log_run(run)

    encoder = MoEEncoder(base, tokenizer, adapter_for(config.model_type, base), name=name)
    default_budget = args.budget or encoder.token_budget

    def attempt(experts, budget, work, note=""):
        try:
            run = run_moee(name, encoder, work, args.warmup_texts, experts, budget, device, matmul_tflops,
                           reference, note)
        except (torch.OutOfMemoryError, RuntimeError, ValueError, KeyError) as exc:
            run = failed(name, "moee-fast", experts, budget, work, matmul_tflops, exc)
        free_memory(device)
        runs.append(run)
        log_run(run)
        return run

    timed_at_default = []
    for experts in args.experts:
        if experts == "batched_mm":
            # Decode-time path: only short texts fit its gathered weights; time those.
            per_token = gathered_bytes_per_token(base)
            budget = max(1, min(default_budget, int(GATHER_MEMORY_FRACTION * _free_bytes(device) // per_token)))
            short = [p for p, n in enumerate(lengths) if n <= budget][: args.batched_mm_texts]
            attempt(experts, budget, workload(corpus, lengths, short, base),
                    note=f"{len(short)} texts of <= {budget} tokens: it gathers {per_token / 2**20:.3g} MiB of "
                    "expert weights per token")
        else:
            timed_at_default.append(attempt(experts, default_budget, everything))
    ran = [r for r in timed_at_default if not r.error]
    if ran:
        fastest = max(ran, key=lambda r: r.tokens_per_s).experts
        for budget in args.budgets:
            if budget != default_budget:
                attempt(fastest, budget, everything)

    del encoder, lm, base, reference
    free_memory(device)
    return runs, info


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return 4 * 2**30  # a CPU smoke run: tiny experts, any cap works


# ------------------------------------------------------------------------------------------------
# Report


def best_moee(runs: list[Run], model: str) -> Run | None:
    ok = [r for r in runs if r.model == model and r.path == "moee-fast" and not r.error]
    return max(ok, key=lambda r: r.tokens_per_s) if ok else None


def reference_run(runs: list[Run], model: str) -> Run | None:
    return next((r for r in runs if r.model == model and r.path == "reference" and not r.error), None)


def _fmt(value, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def _tflops(value: float) -> str:
    """GPU rates with one decimal; a CPU smoke run's small ones with three significant digits."""
    return f"{value:,.1f}" if value >= 10 else f"{value:.3g}"


def markdown_report(meta: dict, runs: list[Run]) -> str:
    lines = [
        f"# moee-fast vs the reference path on {meta['device']}",
        "",
        f"{meta['date']}; torch {meta['torch']}, transformers {meta['transformers']}, CUDA {meta['cuda']}, "
        f"{meta['dtype']}.",
        f"{meta['dtype']} matmul rate measured here ({meta['matmul_size']}^3 torch.matmul, median): "
        f"{_tflops(meta['matmul_tflops'])} TFLOP/s; MFU = useful FLOPs (embedding_flops: no padding, no LM head) "
        "per second over that rate.",
        f"Corpus: synthetic_corpus(seed=0), {meta['texts']} texts (3 short of 8-40 tokens per passage of "
        f"100-400); the reference path is timed on the first {meta['reference_texts']} of them (it is much "
        "slower), so rates are compared per token and per text. Random weights, "
        f"{'scaled-down smoke shapes' if meta['smoke'] else 'full-size published shapes'}.",
        "",
        *(f"- {model}: {b['weights_gib']:.1f} GiB of weights; transformers' default experts implementation "
          f"{b['experts_default']} (the reference path runs with it), attention {b['attention']}"
          for model, b in meta["builds"].items()),
        "",
        "| model | path | experts | token budget | texts | tokens | computed/real | s | tokens/s | texts/s | "
        "useful TFLOP/s | MFU | peak GiB | HS max rel err | RW max rel err | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in runs:
        if r.error:
            lines.append(f"| {r.model} | {r.path} | {r.experts} | {_fmt(r.token_budget, 'd', '-')} | {r.texts} | "
                         f"{r.tokens} | | | | | | | | | | failed: {r.error} |")
            continue
        lines.append(
            f"| {r.model} | {r.path} | {r.experts} | {_fmt(r.token_budget, 'd', 'batches of 128')} | {r.texts} | "
            f"{r.tokens} | {r.computed_tokens / r.tokens:.2f} | {r.seconds:.2f} | {r.tokens_per_s:,.0f} | "
            f"{r.texts_per_s:,.1f} | {_tflops(r.useful_tflops)} | {100 * r.mfu:.1f}% | {_fmt(r.peak_gib, '.1f')} | "
            f"{_fmt(r.hs_max_rel_err, '.2e', '-')} | {_fmt(r.rw_max_rel_err, '.2e', '-')} | {r.note} |"
        )
    lines += ["", "## Summary", "",
              "| model | recommended experts | token budget | tokens/s | MFU | peak GiB | reference tokens/s | "
              "reference peak GiB | speed-up (per token) |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for model in dict.fromkeys(r.model for r in runs):
        best, ref = best_moee(runs, model), reference_run(runs, model)
        if best is None:
            lines.append(f"| {model} | no moee-fast run succeeded | | | | | | | |")
            continue
        speedup = best.tokens_per_s / ref.tokens_per_s if ref else None
        lines.append(
            f"| {model} | {best.experts} | {best.token_budget} | {best.tokens_per_s:,.0f} | {100 * best.mfu:.1f}% | "
            f"{_fmt(best.peak_gib, '.1f')} | {_fmt(ref and ref.tokens_per_s, ',.0f')} | "
            f"{_fmt(ref and ref.peak_gib, '.1f')} | {_fmt(speedup, '.1f')}x |"
        )
    lines += ["", "## Targets", "", *target_lines(runs, meta), ""]
    return "\n".join(lines)


def target_lines(runs: list[Run], meta: dict) -> list[str]:
    label = LABELS[TARGET_MODEL]
    head = (f"Targets (GPU H100, {label} shape, bf16): MFU >= {100 * TARGET_MFU:.0f}% and >= "
            f"{TARGET_SPEEDUP:g}x the reference path (tokens/s).")
    best, ref = best_moee(runs, label), reference_run(runs, label)
    if best is None:
        return [head, "", f"- not measured: no successful moee-fast run of {label}"]
    lines = [head, "", f"- MFU: {100 * best.mfu:.1f}% ({'met' if best.mfu >= TARGET_MFU else 'NOT met'})"]
    if ref is None:
        lines.append("- speed-up: not measured (the reference run failed or was skipped)")
    else:
        speedup = best.tokens_per_s / ref.tokens_per_s
        lines.append(f"- speed-up: {speedup:.1f}x ({'met' if speedup >= TARGET_SPEEDUP else 'NOT met'})")
    if meta["smoke"] or "H100" not in meta["device"]:
        lines.append(f"- measured on {meta['device']}{' with smoke shapes' if meta['smoke'] else ''}: "
                     "the targets are stated for an H100 with full-size shapes")
    return lines


# ------------------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


def log_run(run: Run) -> None:
    if run.error:
        log(f"{run.model} {run.path} {run.experts} budget={run.token_budget}: failed: {run.error}")
    else:
        log(f"{run.model} {run.path} {run.experts} budget={run.token_budget}: {run.tokens_per_s:,.0f} tokens/s, "
            f"MFU {100 * run.mfu:.1f}%, peak {_fmt(run.peak_gib, '.1f')} GiB")


_START = time.perf_counter()


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _name_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="the same code on the CPU with tiny shapes and few texts; writes to a temp dir")
    parser.add_argument("--models", type=_name_list, default=list(LABELS),
                        help=f"comma-separated, of {','.join(LABELS)}")
    parser.add_argument("--texts", type=int, help="corpus texts timed for moee-fast (default 2048; smoke 48)")
    parser.add_argument("--reference-texts", type=int,
                        help="first texts timed for the reference path (default 512; smoke 24)")
    parser.add_argument("--experts", type=_name_list, default=["grouped_mm", "eager", "batched_mm"],
                        help="experts implementations timed for moee-fast, each at the default token budget")
    parser.add_argument("--budget", type=int, help="token budget the implementations are compared at "
                        "(default: the encoder's default for the device; smoke 1024)")
    parser.add_argument("--budgets", type=_int_list,
                        help="token budgets swept with the fastest implementation "
                        "(default 16384,32768,65536; smoke 512,2048)")
    parser.add_argument("--batched-mm-texts", type=int, help="short texts timed for batched_mm (default 64; smoke 8)")
    parser.add_argument("--warmup-texts", type=int, help="texts encoded before each timed run (default 64; smoke 4)")
    parser.add_argument("--matmul-size", type=int,
                        help="side of the square matmul timed for MFU (default 8192; smoke 512)")
    parser.add_argument("--out-dir", type=Path,
                        help="where the .md and .json go (default benchmarks/results; smoke: a temp dir)")
    args = parser.parse_args(argv)
    defaults = dict(texts=(48, 2048), reference_texts=(24, 512), budgets=([512, 2048], [16384, 32768, 65536]),
                    batched_mm_texts=(8, 64), warmup_texts=(4, 64), matmul_size=(512, 8192))
    for name, (smoke, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else full)
    if args.smoke and args.budget is None:
        args.budget = 1024
    unknown = [m for m in args.models if m not in LABELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(LABELS)}")
    # bf16 on the GPU; a CPU without bf16 matrix units runs bf16 far slower than fp32, so the
    # smoke run uses fp32 (the same code path; only the numbers differ).
    args.dtype, args.dtype_name = (torch.float32, "fp32") if args.smoke else (torch.bfloat16, "bf16")
    return args


def main(argv=None):
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("gpu_report.py needs a CUDA GPU, and torch sees none (torch.cuda.is_available() is False). "
                 "Run it with --smoke to check it on the CPU with tiny shapes.")
    import transformers

    from moee_fast.demo import SAMPLE_TEXTS, build_tokenizer

    device = torch.device("cpu") if args.smoke else torch.device("cuda")
    if args.smoke:
        torch.set_num_threads(1)  # tiny shapes: extra threads only add start-up and contention to every op
    device_name = "CPU (smoke run)" if args.smoke else torch.cuda.get_device_name(device)
    log(f"{device_name}: timing a {args.matmul_size}^3 {args.dtype_name} matmul")
    matmul_tflops = dense_matmul_tflops(device, args.matmul_size, args.dtype)
    log(f"{args.dtype_name} matmul: {matmul_tflops:,.3f} TFLOP/s")

    tokenizer = build_tokenizer(SAMPLE_TEXTS * 20, vocab_size=600)  # ids stay below every vocab; FLOPs unchanged
    tokenizer.padding_side = "left"  # the reference path pads on the left; moee-fast collates its own batches
    corpus = synthetic_corpus(tokenizer, args.texts, seed=0)
    configs = smoke_configs() if args.smoke else full_size_configs()

    runs: list[Run] = []
    builds = {}
    for key in args.models:
        model_runs, builds[LABELS[key]] = bench_model(key, configs[key], args, tokenizer, corpus, device, matmul_tflops)
        runs += model_runs

    meta = dict(
        device=device_name, date=datetime.date.today().isoformat(), smoke=args.smoke,
        torch=torch.__version__, transformers=transformers.__version__, cuda=torch.version.cuda or "none",
        capability=".".join(map(str, torch.cuda.get_device_capability(device))) if device.type == "cuda" else None,
        dtype=args.dtype_name, builds=builds, matmul_size=args.matmul_size,
        matmul_tflops=matmul_tflops, texts=args.texts, reference_texts=args.reference_texts,
        experts_tried=args.experts, budgets=args.budgets,
        recommended={r.model: dict(experts=r.experts, token_budget=r.token_budget)
                     for r in (best_moee(runs, m) for m in dict.fromkeys(x.model for x in runs)) if r},
    )
    report = markdown_report(meta, runs)
    print(report)

    out_dir = args.out_dir or (Path(tempfile.mkdtemp(prefix="gpu_report_smoke_")) if args.smoke else RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"gpu_report_{re.sub(r'[^A-Za-z0-9]+', '_', device_name).strip('_').lower()}_{meta['date']}"
    (out_dir / f"{stem}.md").write_text(report)
    raw = dict(meta=meta, runs=[r.as_dict() for r in runs])
    (out_dir / f"{stem}.json").write_text(json.dumps(raw, indent=2) + "\n")
    print(f"written to {out_dir / stem}.md and .json")


if __name__ == "__main__":
    main()
