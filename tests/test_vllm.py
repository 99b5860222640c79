"""MoEE through vLLM (moee_fast.vllm): HS and RW from vLLM's own forward equal MoEEncoder's.

These tests run where vllm imports: .ci/run builds vLLM's CPU environment
(scripts/vllm_env.sh) and runs them there. Each engine compiles its model (torch.compile, vLLM's
default) once, which takes most of a test's time; checkpoints are tiny random models of each
family, with head sizes vLLM's CPU attention supports.
"""

import contextlib
import gc
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # its default keeps a core for the scheduler
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: one start, one cleanup

vllm = pytest.importorskip("vllm", reason="vllm is not installed in this environment; .ci/run runs these tests in vLLM's own (scripts/vllm_env.sh)")

from moee_fast import MoEEncoder, loading  # noqa: E402
from moee_fast.vllm import VLLMEncoder, architecture, engine_kwargs  # noqa: E402

from conftest import random_texts, relative_error, save_checkpoint  # noqa: E402
from deepseek_reference import write_checkpoint  # noqa: E402

FAMILIES = ["olmoe", "qwen2_moe", "qwen3_moe", "mixtral", "deepseek", "deepseek_v2"]
# vLLM's CPU attention takes head sizes that are multiples of 32; its CPU MLA kernel a latent
# cache of kv_lora_rank 512 + rope 64.
SHAPES = {
    "qwen3_moe": dict(hidden_size=128, head_dim=32),
    "deepseek_v2": dict(hidden_size=128, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=32, v_head_dim=32),
}
# A small KV cache (the default reserves a fraction of the machine's memory) and short contexts.
ENGINE = dict(kv_cache_memory_bytes=1 << 26, max_model_len=512, seed=0)
PROMPT = 'This sentence : "{text}" means in one word:"'  # a shared prefix for the prefix cache
TOLERANCE = 1e-5
# The DeepSeekMoE v1 test checkpoint (tests/deepseek_reference.py: unit-scale embeddings) amplifies
# fp32 rounding towards its last router: there MoEEncoder and vLLM are each up to 2e-5 from the
# float64 reference, so up to twice that from each other.
FAMILY_TOLERANCE = {"deepseek": 5e-5}


@pytest.fixture
def vllm_checkpoint(checkpoint, tmp_path_factory, tokenizer_corpus):
    def make(family: str) -> str:
        if family == "deepseek":  # DeepSeekMoE v1: the published layout, which transformers has no class for
            return write_checkpoint(tmp_path_factory.mktemp("deepseek"), tokenizer_corpus, hidden_size=128)
        return checkpoint(family, **SHAPES.get(family, dict(hidden_size=128)))

    return make


def reference(path: str, texts, prompt=PROMPT):
    """MoEEncoder on transformers' own eager forward (fast_path="none"; DeepSeekMoE v1: moee-fast's
    native model, which tests/test_deepseek.py checks against a float64 reference), fp32."""
    return MoEEncoder.from_pretrained(path, fast_path="none").encode(texts, prompt=prompt)


def assert_close(out, ref, tolerance=TOLERANCE):
    assert out.hs.shape == ref.hs.shape and out.rw.shape == ref.rw.shape
    assert relative_error(out.hs, ref.hs).max().item() < tolerance
    assert relative_error(out.rw, ref.rw).max().item() < tolerance


def shutdown(encoder) -> None:
    from vllm.distributed import cleanup_dist_env_and_memory

    del encoder.llm
    gc.collect()
    cleanup_dist_env_and_memory()


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_moee_encoder_with_vllm_defaults(vllm_checkpoint, family):
    """torch.compile, prefix caching and chunked prefill on (vLLM's defaults); a batch budget of
    64 tokens splits the long texts' prefills into chunks, and the second call reads the texts'
    prefixes from the cache."""
    path = vllm_checkpoint(family)
    texts = random_texts(14, seed=5, max_words=60)
    ref = reference(path, texts)
    encoder = VLLMEncoder.from_pretrained(path, max_num_batched_tokens=64, max_num_seqs=8, **ENGINE)
    try:
        first = encoder.encode(texts, prompt=PROMPT)
        again = encoder.encode(list(reversed(texts)), prompt=PROMPT)
    finally:
        shutdown(encoder)
    tolerance = FAMILY_TOLERANCE.get(family, TOLERANCE)
    assert_close(first, ref, tolerance)
    assert_close(again, ref[torch.arange(len(texts) - 1, -1, -1)], tolerance)


def test_matches_without_prefix_caching_or_chunked_prefill(vllm_checkpoint):
    path = vllm_checkpoint("olmoe")
    texts = random_texts(9, seed=11, max_words=80)
    ref = reference(path, texts)
    encoder = VLLMEncoder.from_pretrained(path, enable_prefix_caching=False, enable_chunked_prefill=False,
                                          max_num_batched_tokens=512, enforce_eager=True, **ENGINE)
    try:
        out = encoder.encode(texts, prompt=PROMPT)
    finally:
        shutdown(encoder)
    assert_close(out, ref)


def test_unsupported_family_is_named(tmp_path, tokenizer_corpus):
    path = save_checkpoint(tmp_path, "olmoe", tokenizer_corpus, hidden_size=128)
    assert architecture("olmoe") == "MoEEOlmoeForCausalLM"
    with pytest.raises(ValueError, match="'llama'.*olmoe"):
        architecture("llama")
    kwargs = engine_kwargs(path, output="sum", alpha=2.0, hf_overrides={"keep": 1}, dtype="float32")
    assert kwargs["runner"] == "pooling" and kwargs["dtype"] == "float32"
    assert kwargs["hf_overrides"] == {"keep": 1, "architectures": ["MoEEOlmoeForCausalLM"], "moee_output": "sum", "moee_alpha": 2.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(command: list[str], port: int, log_path, env: dict | None = None):
    """A server process (its output in `log_path`) until /health answers; stopped on exit.
    Yields a function that POSTs JSON to a route and returns the decoded answer."""
    url = f"http://127.0.0.1:{port}"

    def post(route: str, body: dict):
        request = urllib.request.Request(url + route, json.dumps(body).encode(), {"Content-Type": "application/json"})
        return json.load(urllib.request.urlopen(request, timeout=120))

    with open(log_path, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 600
            while True:
                assert server.poll() is None, log_path.read_text()[-3000:]
                try:
                    urllib.request.urlopen(url + "/health", timeout=5)
                    break
                except OSError:
                    assert time.monotonic() < deadline, f"{command[:4]} did not come up: {log_path.read_text()[-3000:]}"
                    time.sleep(2)
            yield post
        finally:
            server.terminate()
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def rows(answer: dict) -> torch.Tensor:
    return torch.tensor([row["embedding"] for row in sorted(answer["data"], key=lambda r: r["index"])])


def test_vllm_serve_returns_the_moee_sum_vector(vllm_checkpoint, tmp_path):
    """vLLM's OpenAI server with the plugin: /v1/embeddings answers [HS/|HS|; sqrt(alpha) RW/|RW|]."""
    path = vllm_checkpoint("qwen2_moe")
    texts = random_texts(5, seed=3, max_words=30)
    alpha = 2.5
    expected = reference(path, texts, prompt=None).vectors("sum", alpha)
    port = _free_port()
    overrides = json.dumps({"architectures": [architecture("qwen2_moe")], "moee_output": "sum", "moee_alpha": alpha})
    # `vllm serve` through moee_fast.vllm's launcher: vllm-cpu's own `vllm` command fails at startup.
    command = [sys.executable, "-m", "moee_fast.vllm", "serve", path, "--host", "127.0.0.1", "--port", str(port),
               "--runner", "pooling", "--hf-overrides", overrides, "--dtype", "float32", "--enforce-eager",
               "--kv-cache-memory-bytes", str(1 << 26), "--max-model-len", "512"]
    tokenizer = loading.checkpoint.load_tokenizer(path)
    ids = [tokenizer(t)["input_ids"] for t in texts]
    with running_server(command, port, tmp_path / "serve.log", dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1")) as post:
        got = rows(post("/v1/embeddings", {"model": path, "input": ids, "encoding_format": "float"}))
    assert got.shape == expected.shape
    assert relative_error(got, expected).max().item() < TOLERANCE
    # The dot product of two such vectors is MoEE(sum)'s score cos_HS + alpha cos_RW.
    assert math.isclose((got[0] @ got[0]).item(), 1 + alpha, rel_tol=1e-5)


def test_moee_serve_with_the_vllm_engine_answers_as_with_ours(vllm_checkpoint, tmp_path):
    """`moee serve --engine vllm`: the same routes give the same answers as with MoEEncoder behind them."""
    from fastapi.testclient import TestClient

    from moee_fast.serve import ServeConfig, create_app

    path = vllm_checkpoint("olmoe")
    texts = random_texts(6, seed=8, max_words=40)
    requests = [
        ("/v1/embeddings", {"input": texts, "variant": "concat", "prompt": PROMPT}),
        ("/v1/embeddings", {"input": texts[:3], "alpha": 2.0}),  # the server's default variant, sum
        ("/moee/embed", {"input": texts[3:]}),
    ]
    port = _free_port()
    command = [sys.executable, "-m", "moee_fast.cli", "serve", "--engine", "vllm", "--model", path, "--host", "127.0.0.1",
               "--port", str(port), "--log-level", "warning"]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")  # GiB; the engine's default reserves a share of the machine
    with running_server(command, port, tmp_path / "serve.log", env) as post:
        served = [post(route, body) for route, body in requests]
        info = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/info", timeout=30))
    with TestClient(create_app(MoEEncoder.from_pretrained(path, fast_path="none"), ServeConfig(served_model_name=info["model"]))) as ours:
        expected = [ours.post(route, json=body).json() for route, body in requests]
        same_fields = lambda answer: {k: v for k, v in answer.items() if k not in ("max_batch_tokens", "limits")}  # noqa: E731
        assert same_fields(info) == same_fields(ours.get("/info").json())  # token budgets differ by engine
    for (route, _), got, want in zip(requests, served, expected):
        assert got.keys() == want.keys(), route
        if route == "/moee/embed":
            for view in ("hs", "rw"):
                assert relative_error(torch.tensor(got[view]).flatten(1), torch.tensor(want[view]).flatten(1)).max().item() < TOLERANCE
        else:
            assert got["usage"] == want["usage"] and got["model"] == want["model"]
            assert relative_error(rows(got), rows(want)).max().item() < TOLERANCE, route
