"""Corpus jobs: shards and manifest against transformers' own forward of each text alone,
resuming (after Ctrl-C and after kill -9 at random points) bit for bit, refusals, skipped empty
rows, worker processes per device, parquet shards."""

import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import moee_fast
from moee_fast import MoEEncoder, encode_corpus, load_corpus
from moee_fast.corpus import CorpusInterrupted
from moee_fast.corpus.job import CorpusJob
from conftest import random_texts, reference_embeddings, relative_error, write_corpus_files


@pytest.fixture(scope="module")
def olmoe(checkpoint):
    return checkpoint("olmoe")


@pytest.fixture(scope="module")
def encoder(olmoe):
    return MoEEncoder.from_pretrained(olmoe, device="cpu")


def assert_same_corpus(a, b):
    assert a.ids == b.ids and torch.equal(a.hs, b.hs) and torch.equal(a.rw, b.rw)


def test_corpus_equals_each_text_alone_in_input_order(tmp_path, olmoe, encoder):
    texts = random_texts(23, seed=11, max_words=40)
    paths = write_corpus_files(tmp_path, texts)
    corpus = encode_corpus(encoder, paths, tmp_path / "out", shard_size=5, progress=False)
    hs, rw = reference_embeddings(olmoe, texts)
    assert len(corpus) == 23 and corpus.hs.shape == hs.shape and corpus.rw.shape == rw.shape
    assert relative_error(corpus.hs, hs).max() <= 1e-5 and relative_error(corpus.rw, rw).max() <= 1e-5
    expected_ids = [f"{paths[0]}:{n}" for n in range(1, 8)] + [f"{paths[1]}:{n}" for n in range(1, 8)]
    assert corpus.ids == expected_ids + [f"{paths[2]}:{n}" for n in range(1, 10)]
    assert sorted(os.listdir(tmp_path / "out")) == ["_lock", "_manifest.json"] + [f"part-{i:05d}.safetensors" for i in range(5)]
    shards = list(corpus)
    assert [len(ids) for ids, _ in shards] == [5, 5, 5, 5, 3]
    assert torch.equal(shards[1][1].hs, corpus.hs[5:10])
    scores = moee_fast.similarity(corpus.to_embeddings(), corpus.to_embeddings(), variant="sum")
    assert scores.shape == (23, 23) and torch.isfinite(scores).all()
    manifest = corpus.manifest
    assert manifest["complete"] and manifest["total_rows"] == 23 and manifest["shape"] == [64, 3, 8]
    assert [entry["input_rows"] for entry in manifest["shards"]] == [5, 5, 5, 5, 3]


def test_parquet_shards_hold_the_same_rows(tmp_path, encoder):
    import pandas as pd

    paths = write_corpus_files(tmp_path, random_texts(10, seed=3, max_words=20))
    st = encode_corpus(encoder, paths, tmp_path / "st", shard_size=4, progress=False)
    pq = encode_corpus(encoder, paths, tmp_path / "pq", shard_size=4, format="parquet", progress=False)
    assert_same_corpus(st, pq)
    frame = pd.read_parquet(tmp_path / "pq" / "part-00001.parquet")
    assert list(frame.columns) == ["id", "hs", "rw"] and list(frame["id"]) == st.ids[4:8]
    assert torch.equal(torch.tensor(list(frame["rw"])).view(4, 3, 8), st.rw[4:8])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's non-writable-array warning included
        reread = load_corpus(tmp_path / "pq")
        parts = [part for _, part in reread]
    assert torch.equal(torch.cat([part.hs for part in parts]), st.hs)


class InterruptAfter:
    """An encoder that presses Ctrl-C on its n-th call."""

    def __init__(self, encoder, calls):
        self.encoder, self.calls = encoder, calls

    def __getattr__(self, name):
        return getattr(self.encoder, name)

    def encode(self, *args, **kwargs):
        self.calls -= 1
        if self.calls < 0:
            raise KeyboardInterrupt
        return self.encoder.encode(*args, **kwargs)


def test_resume_after_ctrl_c_equals_an_uninterrupted_run(tmp_path, encoder):
    paths = write_corpus_files(tmp_path, random_texts(20, seed=5, max_words=30))
    whole = encode_corpus(encoder, paths, tmp_path / "whole", shard_size=3, progress=False)
    with pytest.raises(CorpusInterrupted, match="interrupted after 9 of 20 rows; run the same command again to resume"):
        encode_corpus(InterruptAfter(encoder, 3), paths, tmp_path / "resumed", shard_size=3, progress=False)
    with pytest.raises(ValueError, match="not finished.*9 of 20"):
        load_corpus(tmp_path / "resumed")
    assert len(load_corpus(tmp_path / "resumed", allow_incomplete=True)) == 9
    resumed = encode_corpus(InterruptAfter(encoder, 4), paths, tmp_path / "resumed", shard_size=3, progress=False)
    assert_same_corpus(resumed, whole)
    assert resumed.manifest["last_run"]["rows"] == 11



def test_a_kill_mid_write_leaves_files_a_rerun_clears(tmp_path, encoder):
    """A kill while a shard is written leaves our temp file, or safetensors' own (it writes through
    a ".tmp" + 6 characters file beside the target): the rerun removes both and finishes."""
    paths = write_corpus_files(tmp_path, random_texts(12, seed=6, max_words=20))
    whole = encode_corpus(encoder, paths, tmp_path / "whole", shard_size=3, progress=False)
    with pytest.raises(CorpusInterrupted):
        encode_corpus(InterruptAfter(encoder, 2), paths, tmp_path / "killed", shard_size=3, progress=False)
    leftovers = [".tmpQ3xZ9a", ".part-00002.safetensors.k2j4_x.tmp"]
    for name in leftovers:
        (tmp_path / "killed" / name).write_bytes(b"partial")
    (tmp_path / "killed" / ".tmpnotes").write_text("mine")  # not a writer's name: refused, kept
    with pytest.raises(ValueError, match="holds '.tmpnotes'"):
        encode_corpus(encoder, paths, tmp_path / "killed", shard_size=3, progress=False)
    (tmp_path / "killed" / ".tmpnotes").unlink()
    assert_same_corpus(encode_corpus(encoder, paths, tmp_path / "killed", shard_size=3, progress=False), whole)
    assert not [name for name in leftovers if (tmp_path / "killed" / name).exists()]

KILLABLE_JOB = """
import sys, torch
torch.set_num_threads(1)
from moee_fast import encode_corpus
encode_corpus(sys.argv[1], [sys.argv[2]], sys.argv[3], shard_size=2, progress=False)
"""


def run_job(olmoe, source, out, kill_after_shards=None, rng=None):
    """The job in a fresh process; with kill_after_shards, SIGKILL it once the manifest records
    that many shards, after a random extra moment (so the kill lands anywhere in a shard)."""
    process = subprocess.Popen([sys.executable, "-c", KILLABLE_JOB, olmoe, str(source), str(out)], stderr=subprocess.PIPE)
    if kill_after_shards is None:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err.decode()
        return
    manifest = out / "_manifest.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if len(json.loads(manifest.read_text())["shards"]) >= kill_after_shards:
                break
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.005)
    time.sleep(rng.uniform(0, 0.2))
    process.send_signal(signal.SIGKILL)
    process.communicate()


def test_kill_9_at_random_points_then_rerun_equals_an_uninterrupted_run(tmp_path, olmoe):
    rng = random.Random(os.getpid())
    source = tmp_path / "in.txt"
    source.write_text("\n".join(random_texts(40, seed=rng.randrange(1000), max_words=30)) + "\n")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed job's processes run
    try:
        encode_corpus(olmoe, [str(source)], tmp_path / "whole", shard_size=2, progress=False)
    finally:
        torch.set_num_threads(threads)
    for shards in sorted(rng.sample(range(0, 18), 3)):
        run_job(olmoe, source, tmp_path / "killed", kill_after_shards=shards, rng=rng)
    run_job(olmoe, source, tmp_path / "killed")
    whole, killed = load_corpus(tmp_path / "whole"), load_corpus(tmp_path / "killed")
    assert_same_corpus(killed, whole)
    assert sorted(os.listdir(tmp_path / "killed")) == sorted(os.listdir(tmp_path / "whole"))
    assert killed.manifest["shards"] == whole.manifest["shards"]


def test_a_changed_job_refuses_to_resume_until_overwrite(tmp_path, checkpoint, olmoe, encoder):
    paths = write_corpus_files(tmp_path, random_texts(6, seed=8, max_words=20))
    out = tmp_path / "out"
    first = encode_corpus(encoder, paths, out, shard_size=4, progress=False)
    changes = [
        (dict(prompt="prompteol"), "different prompt \\('', now 'prompteol'\\)"),
        (dict(rw_source="logits"), "different rw_source"),
        (dict(shard_size=5), "different shard_size \\(4, now 5\\)"),
    ]
    for change, message in changes:
        with pytest.raises(ValueError, match=message + ".*--overwrite"):
            encode_corpus(encoder, paths, out, **{"shard_size": 4, **change})
    with pytest.raises(ValueError, match="different model"):
        encode_corpus(checkpoint("mixtral"), paths, out, shard_size=4)
    with open(paths[0], "a") as f:
        f.write("one more line\n")
    with pytest.raises(ValueError, match="different inputs"):
        encode_corpus(encoder, paths, out, shard_size=4)
    assert_same_corpus(load_corpus(out), first)
    again = encode_corpus(encoder, paths, out, shard_size=5, prompt="prompteol", overwrite=True, progress=False)
    assert len(again) == 7 and again.manifest["prompt"] == "prompteol"


def test_empty_rows_fail_by_file_line_or_are_skipped_and_recorded(tmp_path, checkpoint):
    encoder = MoEEncoder.from_pretrained(checkpoint("olmoe", bos=False), device="cpu")
    source = tmp_path / "in.txt"
    source.write_text("first\nsecond\n\nfourth\n")
    with pytest.raises(ValueError, match=rf"{source}:3 is empty"):
        encode_corpus(encoder, [str(source)], tmp_path / "out", shard_size=2, progress=False)
    corpus = encode_corpus(encoder, [str(source)], tmp_path / "out", shard_size=2, skip_empty=True, overwrite=True, progress=False)
    assert corpus.ids == [f"{source}:1", f"{source}:2", f"{source}:4"]
    assert corpus.manifest["shards"][1]["skipped"] == [f"{source}:3"]
    alone = encoder.encode(["first", "second", "fourth"])
    assert relative_error(corpus.hs, alone.hs).max() <= 1e-5


def test_output_directory_checks(tmp_path, encoder):
    paths = write_corpus_files(tmp_path, random_texts(3, seed=2, max_words=20))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds 'notes.txt'"):
        encode_corpus(encoder, paths, tmp_path / "foreign", overwrite=True)
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="not a directory"):
        encode_corpus(encoder, paths, paths[0])
    with pytest.raises(ValueError, match="inside the output directory"):
        encode_corpus(encoder, paths, tmp_path)
    with pytest.raises(ValueError, match="format must be"):
        encode_corpus(encoder, paths, tmp_path / "x", format="csv")
    assert not os.path.exists(tmp_path / "x")


def test_damaged_shards_are_named(tmp_path, encoder):
    paths = write_corpus_files(tmp_path, random_texts(6, seed=4, max_words=20))
    encode_corpus(encoder, paths, tmp_path / "out", shard_size=3, progress=False)
    shard = tmp_path / "out" / "part-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match="part-00001.safetensors: 100 bytes where the manifest recorded"):
        load_corpus(tmp_path / "out")
    (tmp_path / "out" / "_manifest.json").write_text("{")
    with pytest.raises(ValueError, match="_manifest.json: not a readable manifest"):
        load_corpus(tmp_path / "out")


def test_two_cpu_workers_equal_one_process(tmp_path, olmoe, encoder):
    paths = write_corpus_files(tmp_path, random_texts(14, seed=9, max_words=30))
    single = encode_corpus(encoder, paths, tmp_path / "one", shard_size=3, progress=False)
    pooled = encode_corpus(olmoe, paths, tmp_path / "two", shard_size=3, devices="cpu,cpu", progress=False)
    assert pooled.ids == single.ids
    assert relative_error(pooled.hs, single.hs).max() <= 1e-6 and relative_error(pooled.rw, single.rw).max() <= 1e-6
    assert pooled.manifest["shards"] == single.manifest["shards"]


class PausedJob:
    """Runs encode_corpus with `devices` in a thread that pauses once the manifest records
    `after` shards, so a test can kill workers at a known point; the workers keep running."""

    def __init__(self, monkeypatch, after: int):
        self.paused, self.resume, self.after, self.outcome = threading.Event(), threading.Event(), after, {}
        record = CorpusJob.record

        def pausing_record(job, result):
            record(job, result)
            if len(job.manifest["shards"]) == self.after and not self.paused.is_set():
                self.paused.set()
                self.resume.wait(timeout=300)

        monkeypatch.setattr(CorpusJob, "record", pausing_record)

    def start(self, *args, **kwargs):
        before = {child.pid for child in multiprocessing.active_children()}

        def run():
            try:
                self.outcome["corpus"] = encode_corpus(*args, **kwargs)
            except Exception as exc:  # the test inspects it
                self.outcome["error"] = exc

        self.thread = threading.Thread(target=run)
        self.thread.start()
        assert self.paused.wait(timeout=300), self.outcome
        self.workers = [c.pid for c in multiprocessing.active_children() if c.pid not in before]
        return self

    def finish(self):
        self.resume.set()
        self.thread.join(timeout=300)
        return self.outcome


def wait_for(condition, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def settled_shards(out) -> dict[str, int]:
    """{shard file: inode} once no shard file has appeared for a second (the workers are idle)."""
    found, since = None, time.monotonic()
    while time.monotonic() - since < 1:
        now = {p.name: p.stat().st_ino for p in out.glob("part-*.safetensors")}
        if now != found:
            found, since = now, time.monotonic()
        time.sleep(0.05)
    return found


def test_a_killed_worker_loses_at_most_its_shard(tmp_path, olmoe, monkeypatch):
    source = tmp_path / "in.txt"
    source.write_text("\n".join(random_texts(24, seed=17, max_words=30)) + "\n")
    job = dict(shard_size=2, devices="cpu,cpu", progress=False)
    whole = encode_corpus(olmoe, [str(source)], tmp_path / "whole", **job)

    one = PausedJob(monkeypatch, after=3).start(olmoe, [str(source)], tmp_path / "one", **job)
    assert len(one.workers) == 2
    written = settled_shards(tmp_path / "one")
    os.kill(one.workers[0], signal.SIGSTOP)  # it takes shards from here on but encodes none
    one.resume.set()
    wait_for(lambda: len(json.loads((tmp_path / "one" / "_manifest.json").read_text())["shards"]) >= 6)
    os.kill(one.workers[0], signal.SIGKILL)  # holding shards it never started
    finished = one.finish()
    assert "error" not in finished, finished  # the other worker took the dead one's shards
    assert_same_corpus(finished["corpus"], whole)
    assert finished["corpus"].manifest["shards"] == whole.manifest["shards"]
    assert {name: ino for name, ino in settled_shards(tmp_path / "one").items() if name in written} == written  # none redone

    both = PausedJob(monkeypatch, after=2).start(olmoe, [str(source)], tmp_path / "both", **job)
    written = settled_shards(tmp_path / "both")
    for pid in both.workers:
        os.kill(pid, signal.SIGKILL)
    failed = both.finish()
    assert isinstance(failed.get("error"), RuntimeError) and "every worker stopped" in str(failed["error"])
    assert "run the same command again to resume" in str(failed["error"])
    kept = load_corpus(tmp_path / "both", allow_incomplete=True).manifest["shards"]
    assert {entry["file"] for entry in kept} == set(written)  # finished shards, the dead workers' included
    rerun = encode_corpus(olmoe, [str(source)], tmp_path / "both", **job)
    assert_same_corpus(rerun, whole)
    assert rerun.manifest["last_run"]["rows"] == 24 - 2 * len(kept)


POOLED_JOB = """
import sys
from moee_fast import encode_corpus
encode_corpus(sys.argv[1], [sys.argv[2]], sys.argv[3], shard_size=2, devices="cpu,cpu", progress=False)
"""


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, ...), None once gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def children_of(pid: int) -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and (_stat(int(p)) or [None, None])[1] == str(pid)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_die_with_their_parent(tmp_path, olmoe):
    """kill -9 of a --devices cpu,cpu job takes its workers with it (they would write shards no
    manifest lists); the rerun finishes without leaked-semaphore warnings."""
    source = tmp_path / "in.txt"
    source.write_text("\n".join(random_texts(40, seed=12, max_words=30)) + "\n")
    out = tmp_path / "out"
    job = subprocess.Popen([sys.executable, "-c", POOLED_JOB, olmoe, str(source), str(out)], stderr=subprocess.PIPE)
    wait_for(lambda: (out / "_manifest.json").exists() and json.loads((out / "_manifest.json").read_text())["shards"])
    workers = children_of(job.pid)
    assert len(workers) >= 2
    job.kill()
    job.communicate()
    wait_for(lambda: all(_stat(p) is None or _stat(p)[0] == "Z" for p in workers), seconds=30)
    rerun = subprocess.run([sys.executable, "-c", POOLED_JOB, olmoe, str(source), str(out)], capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "leaked" not in rerun.stderr and len(load_corpus(out)) == 40


def test_stdin_jobs_resume_and_refuse_another_stream(tmp_path, encoder, monkeypatch):
    import io

    texts = random_texts(10, seed=13, max_words=20)

    def stdin(lines):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(("\n".join(lines) + "\n").encode())))

    stdin(texts)
    whole = encode_corpus(encoder, "-", tmp_path / "whole", shard_size=3, progress=False)
    stdin(texts)
    with pytest.raises(CorpusInterrupted, match="interrupted after 6 rows; run the same command again to resume"):
        encode_corpus(InterruptAfter(encoder, 2), "-", tmp_path / "out", shard_size=3, progress=False)
    stdin(texts[:4] + ["another text"] + texts[5:])
    with pytest.raises(ValueError, match="rows 4-6 of stdin differ from those part-00001.safetensors was encoded from"):
        encode_corpus(encoder, "-", tmp_path / "out", shard_size=3, progress=False)
    stdin(texts)
    assert_same_corpus(encode_corpus(encoder, "-", tmp_path / "out", shard_size=3, progress=False), whole)


def test_the_progress_bar_moves_within_a_shard(tmp_path, encoder, monkeypatch):
    from moee_fast.corpus import job as corpus_job
    from moee_fast.corpus.job import Shard, encode_shard
    from moee_fast.corpus.store import read_shard

    texts = random_texts(5, seed=14, max_words=20)
    shard = Shard(0, 0, 5, ids=[str(i) for i in range(5)], texts=texts, wheres=[f"w:{i}" for i in range(5)])
    options = {"batch_size": None, "prompt": None, "max_length": None, "rw_source": "scores"}
    monkeypatch.setattr(corpus_job, "PROGRESS_STEP", 2)
    steps = []
    result = encode_shard(encoder, shard, options, str(tmp_path), "safetensors", steps.append)
    assert steps == [2, 2, 1] and result.entry["rows"] == 5
    alone = encoder.encode(texts)
    ids, hs, rw = read_shard(str(tmp_path / "part-00000.safetensors"), result.shape, 5)
    assert relative_error(torch.from_numpy(hs.copy()), alone.hs).max() <= 1e-5
