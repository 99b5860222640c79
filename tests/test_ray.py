"""The Ray Data path on a local Ray (2 CPUs, fractional actors) against the single-process job,
and a Ray job killed mid-way that resumes from Ray Data's checkpoint."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

from moee_fast import MoEEncoder, encode_corpus, load_corpus
from conftest import random_texts, write_corpus_files

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_job_equals_the_single_process_job(tmp_path, checkpoint, local_ray):
    import ray.data

    from moee_fast.ray import encode_corpus_ray

    olmoe = checkpoint("olmoe")
    paths = write_corpus_files(tmp_path, random_texts(21, seed=21, max_words=30))
    single = encode_corpus(MoEEncoder.from_pretrained(olmoe, device="cpu"), paths, tmp_path / "local", shard_size=4, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = encode_corpus_ray(olmoe, paths, str(tmp_path / "ray"), shard_size=4, num_cpus=0.5)
    assert not [w for w in caught if "checkpoint" in str(w.message).lower()]  # Ray kept checkpointing on
    assert stats["rows"] == 21 and sorted(os.listdir(tmp_path / "ray")) == ["_lock", "_manifest.json", "data"]
    assert ray.data.DataContext.get_current().checkpoint_config is None  # the job's settings do not outlive it
    on_ray = load_corpus(tmp_path / "ray")
    assert on_ray.ids == single.ids
    assert torch.allclose(on_ray.hs, single.hs, rtol=1e-5, atol=1e-6) and torch.allclose(on_ray.rw, single.rw, rtol=1e-5, atol=1e-6)
    again = encode_corpus_ray(olmoe, paths, str(tmp_path / "ray"), shard_size=4, num_cpus=0.5)
    assert again["rows"] == 0  # finished: nothing appended
    with pytest.raises(ValueError, match="different prompt"):
        encode_corpus_ray(olmoe, paths, str(tmp_path / "ray"), shard_size=4, prompt="prompteol")

    # Data files with no checkpoint beside them (a run Ray could not checkpoint) are redone, not doubled.
    manifest = json.loads((tmp_path / "ray" / "_manifest.json").read_text())
    (tmp_path / "ray" / "_manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    redone = encode_corpus_ray(olmoe, paths, str(tmp_path / "ray"), shard_size=4, num_cpus=0.5)
    assert redone["rows"] == 21 and load_corpus(tmp_path / "ray").ids == single.ids


def test_ray_job_with_mean_pooling_equals_the_local_job_bitwise(tmp_path, checkpoint, local_ray):
    from moee_fast.ray import encode_corpus_ray

    olmoe = checkpoint("olmoe")
    # 8 rows per file and shards of 4: Ray's batches (per file) hold the same texts as the local shards.
    paths = write_corpus_files(tmp_path, random_texts(24, seed=24, max_words=30))
    pooling = dict(rw_pooling="mean", hs_pooling="mean")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the Ray actor (one CPU or less) runs: the same reduction order
    try:
        local = encode_corpus(MoEEncoder.from_pretrained(olmoe, device="cpu"), paths, tmp_path / "local", shard_size=4,
                              progress=False, **pooling)
        last = encode_corpus(MoEEncoder.from_pretrained(olmoe, device="cpu"), paths, tmp_path / "last", shard_size=4,
                             progress=False)
    finally:
        torch.set_num_threads(threads)
    encode_corpus_ray(olmoe, paths, str(tmp_path / "ray"), shard_size=4, num_cpus=0.5, **pooling)
    on_ray = load_corpus(tmp_path / "ray")
    assert on_ray.ids == local.ids
    assert not on_ray.hs.isnan().any() and not on_ray.rw.isnan().any()
    assert torch.equal(on_ray.hs, local.hs) and torch.equal(on_ray.rw, local.rw)
    assert not torch.allclose(local.rw, last.rw)  # the mean is not the last token's
    for job in ("local", "ray"):
        options = json.loads((tmp_path / job / "_manifest.json").read_text())["options"]
        assert options["rw_pooling"] == options["hs_pooling"] == "mean"
    with pytest.raises(ValueError, match="different rw_pooling"):
        encode_corpus_ray(olmoe, paths, str(tmp_path / "ray"), shard_size=4, num_cpus=0.5, hs_pooling="mean")


def test_batch_encoder_adds_columns(checkpoint, local_ray):
    import ray.data

    from moee_fast.ray import MoEEBatchEncoder

    olmoe = checkpoint("olmoe")
    texts = random_texts(9, seed=2, max_words=25)
    ds = ray.data.from_items([{"text": t, "id": str(i)} for i, t in enumerate(texts)])
    rows = ds.map_batches(MoEEBatchEncoder, fn_constructor_kwargs={"model": olmoe}, batch_size=4, batch_format="pyarrow",
                          concurrency=1, num_cpus=0.5).take_all()
    direct = MoEEncoder.from_pretrained(olmoe, device="cpu").encode(texts)
    by_id = {row["id"]: row for row in rows}
    hs = torch.tensor([list(by_id[str(i)]["hs"]) for i in range(9)])
    assert torch.allclose(hs, direct.hs, rtol=1e-5, atol=1e-6)


def test_command_line_engine_ray(tmp_path, checkpoint, local_ray, capsys):
    from moee_fast.cli import main

    olmoe = checkpoint("olmoe")
    paths = write_corpus_files(tmp_path, random_texts(6, seed=6, max_words=20))
    base = ["encode", "--model", olmoe, "--input", *paths, "--shard-size", "4"]
    assert main(base + ["--output", str(tmp_path / "local")]) == 0
    assert main(base + ["--output", str(tmp_path / "ray"), "--engine", "ray"]) == 0
    assert "wrote 6 rows" in capsys.readouterr().out
    local, on_ray = load_corpus(tmp_path / "local"), load_corpus(tmp_path / "ray")
    assert on_ray.ids == local.ids and torch.allclose(on_ray.hs, local.hs, rtol=1e-5, atol=1e-6)
    assert main(base + ["--output", str(tmp_path / "ray2"), "--engine", "ray", "--input", "-"]) == 1
    mean = ["--rw-pooling", "mean", "--hs-pooling", "mean"]
    assert main(base + ["--output", str(tmp_path / "local-mean"), *mean]) == 0
    assert main(base + ["--output", str(tmp_path / "ray-mean"), "--engine", "ray", *mean]) == 0
    local, on_ray = load_corpus(tmp_path / "local-mean"), load_corpus(tmp_path / "ray-mean")
    assert torch.allclose(on_ray.rw, local.rw, rtol=1e-5, atol=1e-6) and not torch.allclose(on_ray.rw, load_corpus(tmp_path / "ray").rw)


RAY_JOB = """
import sys, time
import ray
import moee_fast.ray as moee_ray

model, out, log, *paths = sys.argv[1:]


class SlowLoggedEncoder(moee_ray.MoEEBatchEncoder):
    # Slow enough that the job can be killed mid-way; logs the rows it actually encodes.
    def __call__(self, batch):
        time.sleep(0.3)
        with open(log, "a") as f:
            f.write("".join(f"{key}\\n" for key in batch.column("row").to_pylist()))
        return super().__call__(batch)


moee_ray.MoEEBatchEncoder = SlowLoggedEncoder
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
# As `moee encode --engine ray` runs it on a 2-CPU machine, actors sized by default: the resumed
# run's checkpoint filter (1 CPU) must still find room.
from moee_fast.cli import main
sys.exit(main(["encode", "--engine", "ray", "--model", model, "--input", *paths, "--output", out, "--shard-size", "2"]))
"""


def committed_rows(out) -> list[int]:
    """The row keys Ray Data's committed checkpoint files hold (pending ones excluded)."""
    import pyarrow.parquet as pq

    folder = out / "checkpoint"
    names = [n for n in os.listdir(folder) if not n.endswith(".pending.parquet")] if folder.is_dir() else []
    return [key for n in names for key in pq.read_table(folder / n, columns=["row"]).column("row").to_pylist()]


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (Ray's workers put themselves in their own sessions)."""
    parents = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError, IndexError):
            pass
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def kill_tree(process) -> None:
    """SIGKILL the job's process group and every process it started, and wait until all are gone."""
    tree = descendants(process.pid)
    os.killpg(process.pid, signal.SIGKILL)
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 60
    while any(os.path.exists(f"/proc/{pid}") and not _is_zombie(pid) for pid in tree) and time.monotonic() < deadline:
        time.sleep(0.05)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_killed_ray_job_resumes_from_its_checkpoint(tmp_path, checkpoint):
    olmoe = checkpoint("olmoe")
    texts = random_texts(16, seed=13, max_words=25)
    paths = write_corpus_files(tmp_path, texts)
    single = encode_corpus(MoEEncoder.from_pretrained(olmoe, device="cpu"), paths, tmp_path / "local", shard_size=2, progress=False)
    out = tmp_path / "ray"

    def job(log: str, **popen):
        return subprocess.Popen([sys.executable, "-c", RAY_JOB, olmoe, str(out), str(tmp_path / log), *paths],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **popen)

    first = job("first.log", start_new_session=True)
    deadline = time.monotonic() + 300
    while not committed_rows(out) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert first.poll() is None, first.stderr.read().decode()[-3000:]
    kill_tree(first)
    kept = committed_rows(out)
    assert 0 < len(kept) < len(texts), "the kill landed before any or after every row was checkpointed"

    second = job("second.log")
    _, err = second.communicate(timeout=300)
    assert second.returncode == 0, err.decode()[-3000:]
    encoded_again = [int(key) for key in (tmp_path / "second.log").read_text().split()]
    assert len(encoded_again) < len(texts) and not set(encoded_again) & set(kept)  # checkpointed rows were skipped
    resumed = load_corpus(out)
    assert resumed.ids == single.ids and len(set(resumed.ids)) == len(texts)  # none lost, none duplicated
    assert torch.allclose(resumed.hs, single.hs, rtol=1e-5, atol=1e-6) and torch.allclose(resumed.rw, single.rw, rtol=1e-5, atol=1e-6)
    assert resumed.manifest["last_run"]["rows"] == len(texts) - len(kept)
    assert not (out / "checkpoint").exists()


def test_ray_engine_refuses_a_users_files_and_reports_errors_in_one_line(tmp_path, checkpoint, local_ray, capsys):
    from moee_fast.cli import main

    source = tmp_path / "in.txt"
    source.write_text("first\n\nthird\n")
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    (out / "data" / "important.csv").write_text("mine")
    base = ["encode", "--engine", "ray", "--model", checkpoint("olmoe", bos=False), "--input", str(source)]
    assert main(base + ["--output", str(out)]) == 1
    assert "holds 'data/', which no corpus job wrote" in capsys.readouterr().err
    assert (out / "data" / "important.csv").read_text() == "mine"
    assert main(base + ["--output", str(tmp_path / "fresh")]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("moee:")]  # Ray logs its progress too
    assert len(errors) == 1 and f"{source}:2" in errors[0] and "empty" in errors[0] and len(errors[0]) < 400, err[-3000:]
    assert "\x1b[" not in errors[0] and "Traceback" not in err
