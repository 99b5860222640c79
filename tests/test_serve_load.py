"""`moee serve` under a full queue and at shutdown: 429 with Retry-After beyond --max-queue while
every accepted request is still answered right, and SIGTERM finishing the request in flight."""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import random_texts
from moee_fast import MoEEncoder
from serve_live import LiveServer, assert_error, assert_rows_close, post

# The worker waits this long for a batch to fill, so requests sent together overlap for sure.
WAIT_MS = 1500


@pytest.fixture(scope="module")
def model_path(checkpoint):
    return checkpoint("mixtral")


@pytest.fixture(scope="module")
def server(model_path):
    live = LiveServer(model_path, "--max-queue", "2", "--max-wait-ms", str(WAIT_MS), "--variant", "hs")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def encoder(model_path):
    return MoEEncoder.from_pretrained(model_path, device="cpu")


def queue_depth(server) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(server.url + "/metrics").text):
        if family.name == "moee_queue_depth":
            return family.samples[0].value
    raise AssertionError("no moee_queue_depth metric")


def test_full_queue_answers_429_with_retry_after_and_loses_nothing(server, encoder):
    texts = random_texts(12, seed=21, max_words=30)
    with ThreadPoolExecutor(len(texts)) as pool:
        responses = list(pool.map(lambda text: post(server, "/v1/embeddings", {"input": [text, text[::-1]]}, headers={}), texts))
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {200, 429}, statuses
    for text, response in zip(texts, responses):
        if response.status_code == 429:
            assert assert_error(response, 429, None, "--max-queue")["code"] == "queue_full"
            assert int(response.headers["Retry-After"]) >= 1
        else:
            assert_rows_close([item["embedding"] for item in response.json()["data"]], encoder.encode([text, text[::-1]]).hs)
    assert queue_depth(server) == 0


def test_sigterm_finishes_the_request_in_flight_then_exits_0(server, encoder):
    texts = random_texts(6, seed=8)
    answer = {}
    sender = threading.Thread(target=lambda: answer.setdefault("response", post(server, "/moee/embed", {"input": texts}, headers={})))
    sender.start()
    deadline = time.monotonic() + 30
    while queue_depth(server) < 1:  # accepted and waiting for its batch to fill
        assert time.monotonic() < deadline, "the request never reached the queue"
        time.sleep(0.02)
    server.process.send_signal(signal.SIGTERM)
    sender.join(60)
    response = answer["response"]
    assert response.status_code == 200, response.text
    expected = encoder.encode(texts)
    assert_rows_close(response.json()["hs"], expected.hs)
    assert_rows_close(response.json()["rw"], expected.rw)
    assert server.process.wait(60) == 0, server.output()
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url + "/health", timeout=5)
