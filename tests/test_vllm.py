"""MoEE through vLLM (moee_fast.vllm): HS and RW from vLLM's own forward equal MoEEncoder's.

These tests run where vllm imports: .ci/run builds vLLM's CPU environment
(scripts/vllm_env.sh) and runs them there. Each engine compiles its model (torch.compile, vLLM's
default) once, which takes most of a test's time; checkpoints are tiny random models of each
family, with head sizes vLLM's CPU attention supports.
"""

import gc
import math
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # its default keeps a core for the scheduler
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: one start, one cleanup

vllm = pytest.importorskip("vllm", reason="vllm is not installed in this environment; .ci/run runs these tests in vLLM's own (scripts/vllm_env.sh)")

from moee_fast import MoEEncoder, loading  # noqa: E402
from moee_fast.vllm import VLLMEncoder, architecture, engine_kwargs  # noqa: E402

from conftest import random_texts, relative_error, save_checkpoint  # noqa: E402

FAMILIES = ["olmoe", "qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v2"]
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


@pytest.fixture
def vllm_checkpoint(checkpoint):
    return lambda family: checkpoint(family, **SHAPES.get(family, dict(hidden_size=128)))


def reference(path: str, texts, prompt=PROMPT):
    """MoEEncoder on transformers' own eager forward (fast_path="none"), fp32."""
    return MoEEncoder.from_pretrained(path, fast_path="none").encode(texts, prompt=prompt)


def assert_close(out, ref):
    assert out.hs.shape == ref.hs.shape and out.rw.shape == ref.rw.shape
    assert relative_error(out.hs, ref.hs).max().item() < TOLERANCE
    assert relative_error(out.rw, ref.rw).max().item() < TOLERANCE


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
    assert_close(first, ref)
    assert_close(again, ref[torch.arange(len(texts) - 1, -1, -1)])


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


def test_vllm_serve_returns_the_moee_sum_vector(vllm_checkpoint, tmp_path):
    """vLLM's OpenAI server with the plugin: /v1/embeddings answers [HS/|HS|; sqrt(alpha) RW/|RW|]."""
    import json
    import urllib.request

    path = vllm_checkpoint("qwen2_moe")
    texts = random_texts(5, seed=3, max_words=30)
    alpha = 2.5
    expected = reference(path, texts, prompt=None).vectors("sum", alpha)
    port = _free_port()
    overrides = json.dumps({"architectures": [architecture("qwen2_moe")], "moee_output": "sum", "moee_alpha": alpha})
    # The server `vllm serve` starts; vllm-cpu 0.32's `vllm` command itself fails at startup, asking
    # importlib.metadata for a distribution named "vllm" (it is installed as "vllm-cpu").
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", path, "--host", "127.0.0.1", "--port", str(port),
               "--runner", "pooling", "--hf-overrides", overrides, "--dtype", "float32", "--enforce-eager",
               "--kv-cache-memory-bytes", str(1 << 26), "--max-model-len", "512"]
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1")
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(url + "/health", timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline, "vllm serve did not come up"
                time.sleep(2)
        tokenizer = loading.checkpoint.load_tokenizer(path)
        ids = [tokenizer(t)["input_ids"] for t in texts]
        body = json.dumps({"model": path, "input": ids, "encoding_format": "float"}).encode()
        request = urllib.request.Request(url + "/v1/embeddings", body, {"Content-Type": "application/json"})
        answer = json.load(urllib.request.urlopen(request, timeout=120))
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
    got = torch.tensor([row["embedding"] for row in sorted(answer["data"], key=lambda r: r["index"])])
    assert got.shape == expected.shape
    assert relative_error(got, expected).max().item() < TOLERANCE
    # The dot product of two such vectors is MoEE(sum)'s score cos_HS + alpha cos_RW.
    assert math.isclose((got[0] @ got[0]).item(), 1 + alpha, rel_tol=1e-5)
