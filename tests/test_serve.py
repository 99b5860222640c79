"""`moee serve` end to end: a live server on 127.0.0.1 in a subprocess, driven with the official
openai client and httpx, every answer compared with in-process `encode` of the same texts."""

from __future__ import annotations

import asyncio
import json
import random
import zlib

import httpx
import numpy as np
import pytest
import torch

from conftest import random_texts, relative_error
from moee_fast import MoEEncoder
from serve_live import AUTH, KEY, LiveServer, assert_error, assert_rows_close, decoded, post


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def model_path(checkpoint):
    return checkpoint("qwen2_moe")


@pytest.fixture(scope="module")
def server(model_path):
    live = LiveServer(model_path, "--max-inputs", "64", "--max-body-bytes", "65536", "--max-compare-inputs", "4",
                      "--served-model-name", "tiny-qwen2-moe", "--variant", "sum", "--alpha", "0.75", env={"MOEE_API_KEY": KEY})
    yield live
    assert live.stop() == 0, live.output()


@pytest.fixture(scope="module")
def encoder(model_path):
    return MoEEncoder.from_pretrained(model_path, device="cpu")


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


# ------------------------------------------------------------------------------ /v1/embeddings
@pytest.mark.parametrize(
    "variant, alpha, prompt, encoding_format",
    [
        ("sum", 0.75, None, "float"),
        ("sum", 2.5, "prompteol", None),  # the SDK's default: base64, decoded by the SDK
        ("hs", None, "Q: {text} A:", "base64"),  # asked for explicitly: the SDK hands back the strings
        ("rw", None, None, None),
        ("concat", None, "sentiment", "float"),
    ],
)
def test_openai_client_vectors_equal_in_process_encode(client, encoder, variant, alpha, prompt, encoding_format):
    texts = random_texts(9, seed=zlib.crc32(repr((variant, prompt, encoding_format)).encode()))
    extra = {"variant": variant, **({"alpha": alpha} if alpha is not None else {}), **({"prompt": prompt} if prompt else {})}
    kwargs = {"encoding_format": encoding_format} if encoding_format else {}
    response = client.embeddings.create(model="any-name", input=texts, extra_body=extra, **kwargs)
    expected = encoder.encode(texts, prompt=prompt).vectors(variant, 0.75 if alpha is None else alpha)
    assert [item.index for item in response.data] == list(range(len(texts)))
    assert_rows_close([item.embedding for item in response.data], expected)
    assert response.model == "tiny-qwen2-moe"
    formatted = texts if prompt is None else [encoder_prompt(prompt).format(t) for t in texts]
    tokens = sum(len(ids) for ids in encoder.tokenizer(formatted)["input_ids"])
    assert response.usage.prompt_tokens == response.usage.total_tokens == tokens


def encoder_prompt(prompt):
    from moee_fast import build_prompt

    return build_prompt(prompt)


def test_single_string_and_server_defaults(client, encoder):
    text = "routing weights carry topics"
    response = client.embeddings.create(model="tiny-qwen2-moe", input=text, encoding_format="float")
    assert len(response.data) == 1
    assert_rows_close([response.data[0].embedding], encoder.encode([text]).vectors("sum", 0.75))


def test_base64_is_little_endian_float32(server, encoder):
    texts = ["the a model", "🚀 東京"]
    body = post(server, "/v1/embeddings", {"input": texts, "encoding_format": "base64", "variant": "hs"}).json()
    assert all(isinstance(item["embedding"], str) for item in body["data"])
    assert_rows_close([item["embedding"] for item in body["data"]], encoder.encode(texts).hs)


# ------------------------------------------------------------------------------ MoEE routes
def test_embed_returns_both_views(server, encoder):
    texts = random_texts(5, seed=7)
    body = post(server, "/moee/embed", {"input": texts, "prompt": "prompteol"}).json()
    expected = encoder.encode(texts, prompt="prompteol")
    assert_rows_close(body["hs"], expected.hs)
    assert_rows_close(body["rw"], expected.rw)
    assert (body["layers"], body["experts"]) == tuple(expected.rw.shape[1:])
    assert (body["rw_pooling"], body["hs_pooling"]) == ("last", "last")


@pytest.mark.parametrize("rw_pooling, hs_pooling", [("mean", "last"), ("last", "mean"), ("mean", "mean")])
def test_embed_pools_as_asked_while_other_poolings_share_the_queue(server, encoder, rw_pooling, hs_pooling):
    texts = random_texts(6, seed=17)
    mine = {"input": texts, "prompt": "prompteol", "rw_pooling": rw_pooling, "hs_pooling": hs_pooling}
    others = [{"input": texts[::-1]}, {"input": texts[:2], "rw_pooling": "mean"}, {"input": texts[3:], "hs_pooling": "mean"}]

    async def send_together():
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=120) as http:
            return await asyncio.gather(*(http.post("/moee/embed", json=body) for body in [mine, *others]))

    responses = asyncio.run(send_together())
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    body = responses[0].json()
    assert (body["rw_pooling"], body["hs_pooling"]) == (rw_pooling, hs_pooling)
    expected = encoder.encode(texts, prompt="prompteol", rw_pooling=rw_pooling, hs_pooling=hs_pooling)
    assert_rows_close(body["hs"], expected.hs)
    assert_rows_close(body["rw"], expected.rw)
    for sent, response in zip(others, responses[1:]):
        pooling = {key: sent[key] for key in ("rw_pooling", "hs_pooling") if key in sent}
        expected = encoder.encode(sent["input"], **pooling)
        assert_rows_close(response.json()["hs"], expected.hs)
        assert_rows_close(response.json()["rw"], expected.rw)


def reference_sum_scores(a, b, alpha):
    """cos_HS + alpha cos_RW in float64, rows of a against rows of b."""
    unit = lambda x: x.double().flatten(1) / x.double().flatten(1).norm(dim=1, keepdim=True)  # noqa: E731
    return unit(a.hs) @ unit(b.hs).T + alpha * unit(a.rw) @ unit(b.rw).T


def test_similarity_and_rerank_score_moee_sum(server, encoder):
    query, documents = "experts route tokens", random_texts(7, seed=11)
    expected = reference_sum_scores(encoder.encode([query]), encoder.encode(documents), 1.5)[0]
    scores = post(server, "/similarity", {"source": query, "targets": documents, "alpha": 1.5}).json()["scores"]
    assert torch.allclose(torch.tensor(scores, dtype=torch.float64), expected, atol=1e-5)

    body = post(server, "/rerank", {"query": query, "documents": documents, "alpha": 1.5, "top_n": 3, "return_documents": True}).json()
    order = torch.argsort(expected, descending=True)[:3].tolist()
    assert [r["index"] for r in body["results"]] == order
    assert [r["document"]["text"] for r in body["results"]] == [documents[i] for i in order]
    assert torch.allclose(torch.tensor([r["relevance_score"] for r in body["results"]], dtype=torch.float64), expected[order], atol=1e-5)


def test_compare_gives_the_three_matrices_and_routing(server, encoder):
    texts = ["a model routes tokens", "hidden states carry meaning", "東京 🙂"]
    body = post(server, "/compare", {"input": texts, "alpha": 0.5}).json()
    emb = encoder.encode(texts)
    unit = lambda x: x.double().flatten(1) / x.double().flatten(1).norm(dim=1, keepdim=True)  # noqa: E731
    assert torch.allclose(torch.tensor(body["hs"], dtype=torch.float64), unit(emb.hs) @ unit(emb.hs).T, atol=1e-5)
    assert torch.allclose(torch.tensor(body["rw"], dtype=torch.float64), unit(emb.rw) @ unit(emb.rw).T, atol=1e-5)
    assert torch.allclose(torch.tensor(body["sum"], dtype=torch.float64), reference_sum_scores(emb, emb, 0.5), atol=1e-5)
    assert_rows_close(body["routing"], emb.rw)


def test_text_beyond_the_context_is_400_unless_truncated(server, encoder):
    long_text = " ".join(random_texts(40, seed=5, max_words=120))
    context = encoder.model.config.max_position_embeddings
    assert len(encoder.tokenizer(long_text)["input_ids"]) > context
    texts = ["short one", long_text]
    assert_error(post(server, "/v1/embeddings", {"input": texts}), 400, "input[1]", f"context of {context}")
    body = post(server, "/v1/embeddings", {"input": texts, "truncate": True, "variant": "hs"}).json()
    with pytest.warns(UserWarning, match="truncated"):
        expected = encoder.encode(texts, max_length=context).hs
    assert_rows_close([item["embedding"] for item in body["data"]], expected)
    assert body["usage"]["prompt_tokens"] == len(encoder.tokenizer("short one")["input_ids"]) + context


# ------------------------------------------------------------------------------ rejections
def test_missing_or_wrong_key_is_401(server):
    assert_error(post(server, "/v1/embeddings", {"input": "x"}, headers={}), 401, text="API key")
    assert_error(post(server, "/v1/embeddings", {"input": "x"}, headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(post(server, "/moee/embed", {"input": "x"}, headers={"Authorization": KEY}), 401)
    assert_error(httpx.get(server.url + "/v1/models"), 401)


def test_too_large_is_413(server):
    big = "word " * 20000  # 100 kB, over --max-body-bytes 65536
    assert_error(post(server, "/v1/embeddings", {"input": big}), 413, text="65536 bytes")
    # Streamed without a Content-Length: counted as it arrives.
    chunks = (part.encode() for part in [json.dumps({"input": big})[i : i + 8192] for i in range(0, 100_100, 8192)])
    response = httpx.post(server.url + "/v1/embeddings", content=chunks, headers={**AUTH, "Content-Type": "application/json"}, timeout=60)
    assert_error(response, 413)
    assert_error(post(server, "/v1/embeddings", {"input": ["x"] * 65}), 413, "input", "--max-inputs 64")
    assert_error(post(server, "/compare", {"input": ["x"] * 5}), 413, "input", "--max-compare-inputs 4")


@pytest.mark.parametrize(
    "body, param, text",
    [
        (b'{"input": ["unterminated"', None, "not valid JSON"),
        (b'{"input": "caf\xe9"}', None, "UTF-8"),
        ([1, 2], None, "JSON object"),
        ({"model": "m"}, "input", "Field required"),
        ({"input": []}, "input", "empty"),
        ({"input": ["ok", 3]}, "input[1]", "must be a string or a list of token ids"),
        ({"input": [[1, 2, 10**9]]}, "input[0][2]", "token id"),
        ({"input": [[1, -1]]}, "input[0][1]", "token id"),
        ({"input": [[1, True]]}, "input[0][1]", "token id"),
        ({"input": ["ok", []]}, "input[1]", "empty"),
        ({"input": ["ok", None]}, "input[1]", "must be a string"),
        ({"input": {"text": "x"}}, "input", "must be a string"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format", ""),
        ({"input": "x", "dimensions": 16}, "dimensions", "cannot be shortened"),
        ({"input": "x", "dimensions": "16"}, "dimensions", ""),
        ({"input": "x", "variant": "max"}, "variant", "unknown variant"),
        ({"input": "x", "alpha": -1}, "alpha", "alpha"),
        ({"input": "x", "alpha": "1"}, "alpha", ""),
        ({"input": "x", "prompt": "no placeholder"}, "prompt", "{text}"),
        ({"input": "x", "truncate": "yes"}, "truncate", ""),
        ({"input": "x", "truncate": 1}, "truncate", ""),
        ({"input": "x", "normalize": "true"}, "normalize", ""),
        ({"input": "x", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens", "-1 or in [1,"),
        ({"input": "x", "dimensons": 8}, "dimensons", "unknown field"),
        ({"input": "x", "encoding": "float"}, "encoding", "unknown field"),
    ],
)
def test_bad_requests_are_400_naming_the_param(server, body, param, text):
    assert_error(post(server, "/v1/embeddings", body), 400, param, text)


def test_bad_requests_are_an_openai_sdk_bad_request_error(client):
    import openai

    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model="m", input="x", dimensions=7)
    with pytest.raises(openai.BadRequestError, match="encoding_format"):
        client.embeddings.create(model="m", input="x", encoding_format="int8")


LONE_SURROGATE = r'"a\ud800b"'  # a JSON string holding a lone surrogate (a valid JSON escape)


@pytest.mark.parametrize(
    "route, template, param",
    [
        ("/v1/embeddings", '{"input": ["ok", %s]}', "input[1]"),
        ("/embed", '{"inputs": ["ok", %s]}', "inputs[1]"),
        ("/", '{"inputs": %s}', "inputs[0]"),
        ("/moee/embed", '{"input": [%s]}', "input[0]"),
        ("/similarity", '{"source": "q", "targets": ["ok", %s]}', "targets[1]"),
        ("/similarity", '{"source": %s, "targets": ["ok"]}', "source"),
        ("/rerank", '{"query": "q", "documents": ["ok", %s]}', "documents[1]"),
        ("/rerank", '{"query": %s, "texts": ["ok"]}', "query"),
        ("/compare", '{"input": ["ok", %s]}', "input[1]"),
    ],
)
def test_a_lone_surrogate_is_400_naming_the_input_on_every_route(server, route, template, param):
    body = (template % LONE_SURROGATE).encode()
    assert rb"\ud800" in body
    assert_error(post(server, route, body), 400, param, "lone surrogate")


def test_bad_requests_on_moee_routes_name_the_item(server):
    assert_error(post(server, "/similarity", {"source": "q", "targets": ["a", 7]}), 400, "targets[1]")
    assert_error(post(server, "/rerank", {"query": "q", "documents": ["a"], "top_n": 0}), 400, "top_n")
    assert_error(post(server, "/rerank", {"query": "q", "documents": []}), 400, "documents", "empty")
    assert_error(post(server, "/rerank", {"query": "q", "documents": ["a"], "texts": ["b"]}), 400, "texts", "either")
    assert_error(post(server, "/compare", {"input": "not a list"}), 400, "input")
    assert_error(post(server, "/embed", {"inputs": "x", "prompt_name": "nope"}), 400, "prompt_name", "preset")
    assert_error(post(server, "/embed", {"inputs": "x", "truncation_direction": "Left"}), 400, "truncation_direction", "unknown field")
    assert_error(post(server, "/moee/embed", {"input": "x", "rw_pooling": "max"}), 400, "rw_pooling", "'last' or 'mean'")
    assert_error(post(server, "/moee/embed", {"input": "x", "hs_pooling": None}), 400, "hs_pooling")
    assert_error(post(server, "/v1/embeddings", {"input": "x", "rw_pooling": "mean"}), 400, "rw_pooling", "unknown field")


def test_unknown_route_and_full_dimensions(server, encoder):
    assert_error(httpx.get(server.url + "/v2/nothing"), 404)
    full = encoder.hidden_size + encoder.num_moe_layers * encoder.num_experts
    assert post(server, "/v1/embeddings", {"input": "x", "dimensions": full}).status_code == 200


# ------------------------------------------------------------------------------ status routes
def test_health_info_docs(server, encoder):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    info = httpx.get(server.url + "/info").json()
    assert info["family"] == encoder.adapter.family
    assert (info["hidden_size"], info["num_moe_layers"], info["num_experts"]) == (encoder.hidden_size, encoder.num_moe_layers, encoder.num_experts)
    assert info["dimensions"]["sum"] == encoder.hidden_size + encoder.num_moe_layers * encoder.num_experts
    assert info["defaults"] == {"variant": "sum", "alpha": 0.75, "prompt": None}
    assert info["limits"]["max_inputs"] == 64 and info["auth"] is True
    assert info["max_input_tokens"] == encoder.model.config.max_position_embeddings
    assert httpx.get(server.url + "/docs").status_code == 200
    assert "/v1/embeddings" in httpx.get(server.url + "/openapi.json").json()["paths"]


def test_metrics_parse_as_prometheus_text(server):
    from prometheus_client.parser import text_string_to_metric_families

    post(server, "/v1/embeddings", {"input": ["a", "b c"]})
    post(server, "/v1/embeddings", {"input": []})
    response = httpx.get(server.url + "/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    families = {family.name: family for family in text_string_to_metric_families(response.text)}
    requests = {(s.labels["route"], s.labels["status"]): s.value for s in families["moee_requests"].samples if s.name == "moee_requests_total"}
    assert requests[("/v1/embeddings", "200")] >= 1 and requests[("/v1/embeddings", "400")] >= 1
    for name in ("moee_tokens", "moee_texts", "moee_batch_texts", "moee_batch_tokens", "moee_queue_depth",
                 "moee_request_duration_seconds", "moee_inference_duration_seconds", "moee_queue_duration_seconds"):
        assert name in families, name
    assert [s.value for s in families["moee_queue_depth"].samples] == [0.0]


# ------------------------------------------------------------------------------ load
def test_concurrent_requests_all_answered_correctly(server, encoder):
    """1,000 requests of 1-4 texts from 64 concurrent clients, below the queue limit: every one
    answered 200 with its own rows, whatever it was batched with."""
    pool = random_texts(300, seed=99, max_words=40)
    expected = encoder.encode(pool).vectors("sum", 0.75)
    rng = random.Random(3)
    requests = [rng.sample(range(len(pool)), rng.randint(1, 4)) for _ in range(1000)]
    batches_before = batch_count(server)

    async def client_loop(http, work):
        failures = []
        while work:
            picks = work.pop()
            response = await http.post("/v1/embeddings", json={"input": [pool[i] for i in picks], "encoding_format": "base64"})
            if response.status_code != 200:
                failures.append(response.text)
                continue
            rows = [decoded(item["embedding"]) for item in response.json()["data"]]
            if relative_error(torch.tensor(np.stack(rows)), expected[picks]).max() > 1e-5:
                failures.append(f"wrong rows for {picks}")
        return failures

    async def run():
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, limits=limits, timeout=60) as http:
            work = list(requests)
            results = await asyncio.wait_for(asyncio.gather(*(client_loop(http, work) for _ in range(64))), timeout=240)
        return [f for failures in results for f in failures]

    assert asyncio.run(run()) == []
    assert batch_count(server) - batches_before < len(requests)  # requests were merged into batches


def batch_count(server) -> float:
    """How many encode calls the server has made."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(server.url + "/metrics").text):
        if family.name == "moee_batch_texts":
            return next(s.value for s in family.samples if s.name == "moee_batch_texts_count")
    raise AssertionError("no moee_batch_texts metric")


# ------------------------------------------------------------------------------ docs/serving.md
def serving_section() -> str:
    import os

    with open(os.path.join(os.path.dirname(__file__), os.pardir, "docs", "serving.md"), encoding="utf-8") as f:
        text = f.read()
    return text.split("# Serving", 1)[1].split("\n## ", 1)[0]  # the page above its reference part


def test_readme_serving_examples_run_against_the_server(server, encoder, monkeypatch):
    import re
    import shutil
    import subprocess

    section = serving_section().replace("http://127.0.0.1:8000", server.url)
    monkeypatch.setenv("MOEE_API_KEY", KEY)
    (client_code,) = re.findall(r"```py\n(.*?)```", section, flags=re.S)
    namespace: dict = {}
    exec(compile(client_code, "docs/serving.md", "exec"), namespace)
    texts = ["A man is playing a guitar.", "Someone plays an instrument."]
    assert_rows_close(namespace["vectors"], encoder.encode(texts).vectors("sum", 1.0))
    if shutil.which("curl"):
        curl = next(block for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S) if block.startswith("curl"))
        result = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, check=True)
        assert_rows_close([item["embedding"] for item in json.loads(result.stdout)["data"]], encoder.encode(texts).vectors("sum", 1.0))
