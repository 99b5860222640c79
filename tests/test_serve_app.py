"""`moee serve`'s pieces in process: the batcher with a real encoder, the app before its worker
runs, the message without the serve extra, and the page shipped in a built wheel."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

from conftest import random_texts, relative_error
from moee_fast import MoEEncoder

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)


@pytest.fixture(scope="module")
def encoder(checkpoint):
    return MoEEncoder.from_pretrained(checkpoint("olmoe", bos=False), device="cpu")


def token_ids(encoder, texts, prompt=None):
    from moee_fast import build_prompt

    strings = texts if prompt is None else [build_prompt(prompt).format(t) for t in texts]
    return encoder.tokenizer(strings)["input_ids"]


def run_jobs(encoder, jobs_ids, max_batch_tokens=4096, max_wait_ms=50.0, poolings=None):
    """Queue jobs of token ids together (pooled as `poolings`, default the last token), run the
    workers, and return each job's outcome."""
    from moee_fast.serve.batcher import LAST, Batcher, Job, JobQueue

    async def main():
        loop = asyncio.get_running_loop()
        queue = JobQueue(max_jobs=len(jobs_ids), max_tokens=max_batch_tokens)
        jobs = [Job(ids, loop.create_future(), loop, pooling) for ids, pooling in zip(jobs_ids, poolings or [LAST] * len(jobs_ids))]
        for job in jobs:
            queue.put(job)
        batcher = Batcher(encoder, queue, max_wait_ms)
        batcher.start()
        outcomes = await asyncio.gather(*(job.future for job in jobs), return_exceptions=True)
        await asyncio.to_thread(batcher.stop, 30)
        return outcomes, queue.depth

    return asyncio.run(main())


@pytest.mark.parametrize("max_batch_tokens", [4096, 7])  # 7: every job split into pieces, interleaved
def test_batcher_gives_each_job_its_rows_whatever_its_neighbours(encoder, max_batch_tokens):
    texts = random_texts(11, seed=4)
    spec = [(texts[:3], None), (texts[3:4], "prompteol"), (texts[4:9], None), (texts[9:], "Q: {text} A:")]
    outcomes, depth = run_jobs(encoder, [token_ids(encoder, t, p) for t, p in spec], max_batch_tokens)
    assert depth == 0
    for (job_texts, prompt), out in zip(spec, outcomes):
        expected = encoder.encode(job_texts, prompt=prompt)
        assert relative_error(out.hs, expected.hs).max() <= 1e-5
        assert relative_error(out.rw, expected.rw).max() <= 1e-5


def test_batcher_pools_each_job_as_asked_in_both_lanes(encoder):
    # A budget of 64 tokens: jobs of at most 16 are small (the express lane), the others are split.
    texts = random_texts(14, seed=9, max_words=24)
    spec = [(texts[:1], ("mean", "last")), (texts[1:6], ("last", "mean")), (texts[6:7], ("last", "last")),
            (texts[7:12], ("mean", "mean")), (texts[12:], ("mean", "last"))]
    jobs_ids = [token_ids(encoder, t) for t, _ in spec]
    sizes = [sum(map(len, ids)) for ids in jobs_ids]
    assert min(sizes) <= 16 < max(sizes), sizes  # both lanes have work
    outcomes, depth = run_jobs(encoder, jobs_ids, max_batch_tokens=64, max_wait_ms=20.0, poolings=[p for _, p in spec])
    assert depth == 0
    for (job_texts, (rw_pooling, hs_pooling)), out in zip(spec, outcomes):
        expected = encoder.encode(job_texts, rw_pooling=rw_pooling, hs_pooling=hs_pooling)
        assert relative_error(out.hs, expected.hs).max() <= 1e-5
        assert relative_error(out.rw, expected.rw).max() <= 1e-5
        assert out.metadata == {k: v for k, v in expected.metadata.items() if k.endswith("_pooling")}


def test_a_failing_job_costs_its_batch_neighbours_nothing(encoder):
    # An empty id sequence has no last token: the encoder refuses it.
    texts = ["first text", "ok", "third one here"]
    jobs = [token_ids(encoder, texts[:1]), [token_ids(encoder, texts[1:2])[0], []], token_ids(encoder, texts[2:])]
    outcomes, depth = run_jobs(encoder, jobs)
    assert depth == 0
    assert isinstance(outcomes[1], (ValueError, RuntimeError)), outcomes[1]
    for index in (0, 2):
        expected = encoder.encode(texts[index : index + 1])
        assert relative_error(outcomes[index].hs, expected.hs).max() <= 1e-5


def test_queue_interleaves_jobs_within_the_token_budget():
    from moee_fast.serve.batcher import Job, JobQueue, QueueFull

    loop = asyncio.new_event_loop()
    try:
        queue = JobQueue(max_jobs=3, max_tokens=10)
        big = Job([[1] * 4] * 6, loop.create_future(), loop)  # 24 tokens: pieces of 8, 8, 8
        small = Job([[2] * 3], loop.create_future(), loop)
        huge_row = Job([[3] * 25], loop.create_future(), loop)  # one row over the budget runs alone
        for job in (big, small, huge_row):
            queue.put(job)
        with pytest.raises(QueueFull):
            queue.put(Job([[1]], loop.create_future(), loop))
        shape = lambda batch: [(piece.job is big, piece.start, piece.stop) for piece in batch]  # noqa: E731
        assert shape(queue.take_batch(max_wait_s=0)) == [(True, 0, 2)]  # the small job does not fit beside it
        assert [p.job for p in queue.take_batch(max_wait_s=0)] == [small]  # its turn before big's next piece
        assert [p.job for p in queue.take_batch(max_wait_s=0)] == [huge_row]
        assert shape(queue.take_batch(max_wait_s=0)) == [(True, 2, 4)]
        assert shape(queue.take_batch(max_wait_s=0)) == [(True, 4, 6)]
        assert queue.depth == 3  # taken, not yet answered
        queue.answered(3)
        queue.close()
        assert queue.take_batch(max_wait_s=0) is None
    finally:
        loop.close()


def test_small_jobs_take_the_express_lane_and_a_batch_has_one_pooling():
    from moee_fast.serve.batcher import EXPRESS, MAIN, Job, JobQueue

    loop = asyncio.new_event_loop()
    try:
        queue = JobQueue(max_jobs=10, max_tokens=10, express_tokens=4)
        big = Job([[1] * 4] * 6, loop.create_future(), loop)  # 24 tokens: large, pieces of 8
        short = Job([[2] * 3], loop.create_future(), loop)
        mean = Job([[3] * 2], loop.create_future(), loop, ("mean", "last"))
        tiny = Job([[4]], loop.create_future(), loop)
        for job in (big, short, mean, tiny):
            queue.put(job)
        jobs = lambda batch: [piece.job for piece in batch]  # noqa: E731
        assert jobs(queue.take_batch(0, EXPRESS)) == [short, tiny]  # the mean-pooled job waits for a batch of its own
        assert jobs(queue.take_batch(0, MAIN)) == [big]  # the main lane serves large jobs first
        assert jobs(queue.take_batch(0, EXPRESS)) == [mean]
        assert jobs(queue.take_batch(0, MAIN)) == [big]
        assert jobs(queue.take_batch(0, MAIN)) == [big]
        alone = Job([[5] * 2], loop.create_future(), loop)
        queue.put(alone)
        assert jobs(queue.take_batch(0, MAIN)) == [alone]  # no large job waits: the main lane helps
        queue.close()
        assert queue.take_batch(0, MAIN) is None and queue.take_batch(0, EXPRESS) is None
    finally:
        loop.close()


def test_health_and_routes_are_503_until_the_worker_runs(encoder):
    from fastapi.testclient import TestClient

    from moee_fast.serve import ServeConfig, create_app

    app = create_app(encoder, ServeConfig(served_model_name="tiny"))
    client = TestClient(app)  # not entered: the lifespan, which starts the worker, has not run
    assert client.get("/health").status_code == 503
    response = client.post("/v1/embeddings", json={"input": "hello"})
    assert response.status_code == 503 and "not loaded" in response.json()["error"]["message"]
    with TestClient(app) as running:
        assert running.get("/health").json() == {"status": "ok"}
        assert running.post("/v1/embeddings", json={"input": "hello"}).status_code == 200


def test_requests_received_after_sigterm_are_answered(encoder):
    """SIGTERM sets `draining` (uvicorn stops accepting, then waits for the requests it has): a
    request already received and still being checked or tokenized is answered, not refused."""
    from fastapi.testclient import TestClient

    from moee_fast.serve import ServeConfig, create_app

    app = create_app(encoder, ServeConfig(served_model_name="tiny"))
    with TestClient(app) as running:
        app.state.service.draining = True
        assert running.get("/health").status_code == 503
        response = running.post("/v1/embeddings", json={"input": ["hello", "world"], "variant": "hs"})
        assert response.status_code == 200, response.text
        rows = torch.tensor([item["embedding"] for item in response.json()["data"]])
        assert relative_error(rows, encoder.encode(["hello", "world"]).hs).max() <= 1e-5


@pytest.mark.parametrize(
    "field, value, message",
    [("variant", "max", "unknown variant"), ("alpha", float("nan"), "alpha"), ("prompt", "no placeholder", "{text}"), ("max_queue", 0, "max_queue")],
)
def test_serve_config_refuses_bad_defaults(field, value, message):
    from moee_fast.serve import ServeConfig

    with pytest.raises(ValueError, match=message):
        ServeConfig(served_model_name="m", **{field: value})


def test_without_the_serve_extra_the_error_names_it():
    script = """
import sys
sys.modules["fastapi"] = None  # as if the serve extra were not installed
try:
    from moee_fast.serve import create_app
except ImportError as exc:
    print("import:", exc)
from moee_fast.cli import main
try:
    main(["serve"])
except SystemExit as exc:
    print("command:", exc)
main(["encode", "--help"])  # every other command still parses: exits 0
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("import:") and "pip install moee-fast[serve]" in lines[0]
    assert lines[1].startswith("command:") and "pip install moee-fast[serve]" in lines[1]


def test_a_built_wheel_ships_the_page(tmp_path):
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns("*.so", "__pycache__", "*.egg-info", "build")
    for name in ("moee_fast", "kernels"):
        shutil.copytree(os.path.join(ROOT, name), source / name, ignore=ignore)
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), source / name)
    env = {**os.environ, "MOEE_FAST_BUILD_EXT": "0"}
    command = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist")]
    subprocess.run(command, check=True, env=env, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("moee_fast-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for page_file in ("index.html", "app.js", "style.css"):
        assert f"moee_fast/serve/static/{page_file}" in names
