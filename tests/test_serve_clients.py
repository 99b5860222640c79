"""`moee serve` as real clients meet it: token-id inputs (langchain-openai's OpenAIEmbeddings sends
them by default), vLLM's and TEI's fields, text-embeddings-inference's routes through
huggingface_hub's InferenceClient, /v1/models, and the reference page served offline. Every
vector is compared with in-process encoding of the same input."""

from __future__ import annotations

import re

import httpx
import pytest
import torch

from conftest import random_texts
from moee_fast import MoEEncoder
from serve_live import LiveServer, assert_error, assert_rows_close, post

NAME_FLAGS = ("--variant", "concat", "--alpha", "0.5", "--prompt", "prompteol")


@pytest.fixture(scope="module")
def model_path(checkpoint):
    return checkpoint("olmoe")


@pytest.fixture(scope="module")
def server(model_path):
    live = LiveServer(model_path, *NAME_FLAGS)
    yield live
    assert live.stop() == 0, live.output()


@pytest.fixture(scope="module")
def encoder(model_path):
    return MoEEncoder.from_pretrained(model_path, device="cpu")


def ids_reference(encoder, ids):
    """In-process embeddings of token-id sequences: the texts that tokenize to them, encoded
    verbatim (the check below makes sure they do)."""
    from moee_fast.serve.batcher import encode_ids
    from moee_fast.embeddings import MoEEmbeddings

    hs, rw = encode_ids(encoder, ids)
    return MoEEmbeddings(hs, rw)


# ------------------------------------------------------------------------------ token ids
def test_token_ids_are_embedded_as_given_skipping_the_prompt(server, encoder):
    texts = random_texts(5, seed=31)
    ids = encoder.tokenizer(texts)["input_ids"]  # verbatim: the server's --prompt is not applied to ids
    expected = encoder.encode(texts).vectors("concat", 0.5)
    body = post(server, "/v1/embeddings", {"input": ids}, headers={}).json()
    assert_rows_close([item["embedding"] for item in body["data"]], expected)
    assert body["usage"]["prompt_tokens"] == sum(map(len, ids))
    one = post(server, "/v1/embeddings", {"input": ids[2]}, headers={}).json()  # one list of ints: one input
    assert len(one["data"]) == 1
    assert_rows_close([one["data"][0]["embedding"]], expected[2:3])
    mixed = post(server, "/v1/embeddings", {"input": [texts[0], ids[1]], "prompt": "verbatim"}, headers={}).json()
    assert_rows_close([item["embedding"] for item in mixed["data"]], expected[:2])


def test_token_ids_outside_the_vocabulary_name_the_position(server, encoder):
    vocab = encoder.model.get_input_embeddings().num_embeddings
    assert_error(post(server, "/v1/embeddings", {"input": [[1, 2], [3, vocab]]}, headers={}), 400, "input[1][1]", f"[0, {vocab})")
    assert_error(post(server, "/embed", {"inputs": [5, -2]}, headers={}), 400, "inputs[0][1]", "token id")


def test_truncate_prompt_tokens_keeps_the_last_tokens(server, encoder):
    texts = random_texts(3, seed=5, max_words=40)
    templated = [encoder_prompt("prompteol").format(t) for t in texts]
    full = encoder.tokenizer(templated)["input_ids"]
    assert all(len(seq) > 6 for seq in full)
    body = post(server, "/v1/embeddings", {"input": texts, "truncate_prompt_tokens": 6, "variant": "hs"}, headers={}).json()
    assert_rows_close([item["embedding"] for item in body["data"]], ids_reference(encoder, [seq[-6:] for seq in full]).hs)
    assert body["usage"]["prompt_tokens"] == 18
    whole = post(server, "/v1/embeddings", {"input": texts, "truncate_prompt_tokens": -1, "variant": "hs"}, headers={}).json()
    assert_rows_close([item["embedding"] for item in whole["data"]], encoder.encode(texts, prompt="prompteol").hs)


def encoder_prompt(prompt):
    from moee_fast import build_prompt

    return build_prompt(prompt)


def test_normalize_gives_unit_vectors(server, encoder):
    texts = random_texts(4, seed=9)
    vectors = encoder.encode(texts, prompt="prompteol").vectors("rw", 0.5)
    body = post(server, "/v1/embeddings", {"input": texts, "variant": "rw", "normalize": True}, headers={}).json()
    assert_rows_close([item["embedding"] for item in body["data"]], torch.nn.functional.normalize(vectors, dim=1))


def test_truncate_cuts_a_huge_text_by_characters_first(server, encoder):
    context = encoder.context_length
    huge = " ".join(random_texts(1, seed=2, max_words=30)) * 4000  # ~1 MB, far beyond the context
    response = post(server, "/v1/embeddings", {"input": ["short", huge], "truncate": True, "variant": "hs", "prompt": "verbatim"}, headers={})
    assert response.status_code == 200, response.text
    with pytest.warns(UserWarning, match="truncated"):
        expected = encoder.encode(["short", huge[:200_000]], max_length=context).hs
    assert_rows_close([item["embedding"] for item in response.json()["data"]], expected)
    refused = post(server, "/v1/embeddings", {"input": ["short", huge]}, headers={})
    assert assert_error(refused, 400, "input[1]", "context")["code"] == "context_length_exceeded"


# ------------------------------------------------------------------------------ clients
def test_openai_sdk_models_and_served_name(server, model_path):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    name = model_path.rstrip("/").rsplit("/", 1)[-1]
    assert [model.id for model in client.models.list().data] == [name]
    info = httpx.get(server.url + "/info").json()
    assert info["model_id"] == info["model"] == name and "/" not in name
    response = client.embeddings.create(model="x", input="hello there")
    assert response.model == name


def test_langchain_openai_embeddings_with_default_settings(server, encoder, monkeypatch):
    """OpenAIEmbeddings tokenizes with tiktoken and sends token ids. tiktoken checks its cache
    files against a SHA-256 of the published cl100k_base ranks, which cannot be made offline, so a
    byte-level encoding under that name goes into tiktoken's own registry of loaded encodings."""
    langchain_openai = pytest.importorskip("langchain_openai")
    import tiktoken
    import tiktoken.registry

    byte_level = tiktoken.Encoding("cl100k_base", pat_str=r"\S+|\s+", mergeable_ranks={bytes([i]): i for i in range(256)}, special_tokens={})
    monkeypatch.setitem(tiktoken.registry.ENCODINGS, "cl100k_base", byte_level)
    texts = ["A man is playing a guitar.", "Someone plays an instrument."]
    sent = []
    model = langchain_openai.OpenAIEmbeddings(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                                              http_client=httpx.Client(event_hooks={"request": [lambda r: sent.append(r)]}))
    vectors = model.embed_documents(texts)
    assert b'"input":[[' in sent[0].read().replace(b" ", b"")  # token ids, as it sends by default
    ids = [list(text.encode()) for text in texts]
    assert_rows_close(vectors, ids_reference(encoder, ids).vectors("concat", 0.5))
    assert_rows_close([model.embed_query(texts[0])], ids_reference(encoder, ids[:1]).vectors("concat", 0.5))


def test_huggingface_inference_client_feature_extraction(server, encoder):
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=server.url)
    text = "Routers send each token to a few experts."
    expected = encoder.encode([text], prompt="prompteol").vectors("concat", 0.5)
    got = client.feature_extraction(text)
    assert_rows_close(got.reshape(1, -1), torch.nn.functional.normalize(expected, dim=1))  # TEI normalizes by default
    raw = client.feature_extraction(text, normalize=False, prompt_name="sentiment")
    assert_rows_close(raw.reshape(1, -1), encoder.encode([text], prompt="sentiment").vectors("concat", 0.5))


# ------------------------------------------------------------------------------ TEI routes
def test_tei_embed_and_root_answer_lists_of_floats(server, encoder):
    texts = random_texts(3, seed=12)
    expected = encoder.encode(texts, prompt="prompteol").vectors("concat", 0.5)
    for route in ("/embed", "/"):
        body = post(server, route, {"inputs": texts, "normalize": False}, headers={}).json()
        assert isinstance(body, list) and isinstance(body[0][0], float)
        assert_rows_close(body, expected)
    single = post(server, "/embed", {"inputs": texts[0]}, headers={}).json()
    assert_rows_close(single, torch.nn.functional.normalize(expected[:1], dim=1))


def test_rerank_in_tei_and_cohere_shapes(server, encoder):
    query, documents = "experts route tokens", random_texts(6, seed=13)
    q, d = encoder.encode([query], prompt="prompteol"), encoder.encode(documents, prompt="prompteol")
    unit = lambda x: x.double().flatten(1) / x.double().flatten(1).norm(dim=1, keepdim=True)  # noqa: E731
    expected = (unit(q.hs) @ unit(d.hs).T + 0.5 * unit(q.rw) @ unit(d.rw).T)[0]
    order = torch.argsort(expected, descending=True).tolist()
    tei = post(server, "/rerank", {"query": query, "texts": documents, "return_text": True}, headers={}).json()
    assert [r["index"] for r in tei] == order and [r["text"] for r in tei] == [documents[i] for i in order]
    assert torch.allclose(torch.tensor([r["score"] for r in tei], dtype=torch.float64), expected[order], atol=1e-5)
    cohere = post(server, "/rerank", {"query": query, "documents": documents, "top_n": 2}, headers={}).json()
    assert [r["index"] for r in cohere["results"]] == order[:2] and "document" not in cohere["results"][0]


def test_info_has_the_fields_tei_clients_read(server, encoder):
    info = httpx.get(server.url + "/info").json()
    for field in ("model_id", "model_dtype", "model_type", "max_concurrent_requests", "max_input_length",
                  "max_batch_tokens", "max_client_batch_size", "version"):
        assert field in info, field
    assert info["max_input_length"] == encoder.context_length


# ------------------------------------------------------------------------------ pages
def test_docs_and_redoc_load_nothing_from_another_host(server):
    for route in ("/docs", "/redoc"):
        response = httpx.get(server.url + route)
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
        assert "/v1/embeddings" in response.text and "truncate_prompt_tokens" in response.text
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", response.text), "a reference to another host"
    icon = httpx.get(server.url + "/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/")
