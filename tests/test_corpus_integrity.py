"""Corpus directories that guard and prove themselves: no job removes a file it did not write,
one job per directory, shards checked against the manifest by load_corpus and by a rerun (which
encodes a damaged shard again), model weights and bit-changing options compared, 2,000 shards
opened under a small open-file limit."""

import json
import os
import random
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from moee_fast import MoEEncoder, encode_corpus, load_corpus
from moee_fast.cli import main
from moee_fast.corpus import JobLocked, verify_corpus
from moee_fast.corpus.store import shard_name, write_shard
from conftest import random_texts


@pytest.fixture(scope="module")
def encoder(checkpoint):
    """A tiny OLMoE; its checkpoint directory is `encoder.name`."""
    return MoEEncoder.from_pretrained(checkpoint("olmoe"), device="cpu")


def source(tmp_path, n=9, seed=1):
    path = tmp_path / "in.txt"
    path.write_text("\n".join(random_texts(n, seed=seed, max_words=24)) + "\n")
    return [str(path)]


def same(a, b):
    return a.ids == b.ids and torch.equal(a.hs, b.hs) and torch.equal(a.rw, b.rw)


# -- never delete what the job did not write ---------------------------------------------------
@pytest.mark.parametrize("planted", ["data/important.csv", "checkpoint/notes.txt", "data/", "part-00009.safetensors.bak"])
def test_no_run_removes_a_file_the_job_did_not_write(tmp_path, encoder, planted):
    paths, out = source(tmp_path), tmp_path / "out"
    encode_corpus(encoder, paths, out, shard_size=4, progress=False)
    target = out / planted
    if planted.endswith("/"):
        target.mkdir()
    else:
        target.parent.mkdir(exist_ok=True)
        target.write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=f"holds '{planted.split('/')[0]}.*nothing was removed"):
            encode_corpus(encoder, paths, out, shard_size=4, overwrite=overwrite, progress=False)
        assert target.exists() and (target.is_dir() or target.read_text() == "mine")
    assert len(load_corpus(out)) == 9  # the job's own files are untouched too


def test_a_ray_jobs_folders_hold_only_its_parquet_files(tmp_path, encoder):
    """Beside a Ray job's manifest, data/ and checkpoint/ parquet files are its own; any other
    file in them is refused by name, and --overwrite removes only the parquet files."""
    paths, out = source(tmp_path), tmp_path / "out"
    encode_corpus(encoder, paths, out, shard_size=4, progress=False)
    manifest = json.loads((out / "_manifest.json").read_text())
    manifest["options"]["engine"] = "ray"
    (out / "_manifest.json").write_text(json.dumps(manifest))
    (out / "data").mkdir()
    (out / "data" / "1_000000_000000.parquet").write_bytes(b"x")
    (out / "data" / "important.csv").write_text("mine")
    with pytest.raises(ValueError, match="holds 'data/important.csv'"):
        encode_corpus(encoder, paths, out, shard_size=4, overwrite=True, progress=False)
    assert (out / "data" / "1_000000_000000.parquet").exists()
    (out / "data" / "important.csv").unlink()
    encode_corpus(encoder, paths, out, shard_size=4, overwrite=True, progress=False)
    assert not (out / "data").exists() and len(load_corpus(out)) == 9


# -- one job per directory ------------------------------------------------------------------------
class WaitForRival:
    """An encoder that, on its first call, waits until the rival job has been answered: the two
    jobs overlap whichever takes the lock first."""

    def __init__(self, encoder, answered):
        self.encoder, self.answered = encoder, answered

    def __getattr__(self, name):
        return getattr(self.encoder, name)

    def encode(self, *args, **kwargs):
        assert self.answered.wait(120)
        return self.encoder.encode(*args, **kwargs)


def test_two_simultaneous_jobs_one_runs_one_is_refused(tmp_path, encoder):
    paths = source(tmp_path)
    for attempt in range(20):
        out, answered, barrier = tmp_path / f"out{attempt}", threading.Event(), threading.Barrier(2)
        outcomes = {}

        def job(prompt):
            barrier.wait()
            try:
                encode_corpus(WaitForRival(encoder, answered), paths, out, shard_size=4, prompt=prompt, progress=False)
                outcomes[prompt] = "ran"
            except JobLocked as exc:
                outcomes[prompt] = str(exc)
                answered.set()
            except BaseException as exc:  # reported by the assertion below
                outcomes[prompt] = repr(exc)
                answered.set()

        threads = [threading.Thread(target=job, args=(p,)) for p in (None, "prompteol")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        ran = [p for p, o in outcomes.items() if o == "ran"]
        refused = [o for o in outcomes.values() if o != "ran"]
        assert len(ran) == 1 and len(refused) == 1, outcomes
        assert f"another corpus job is writing here (pid {os.getpid()} on " in refused[0]
        assert load_corpus(out).manifest["prompt"] == (ran[0] or "")


def test_a_dead_jobs_lock_is_released(tmp_path, encoder):
    paths, out = source(tmp_path), tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(600)",
                               str(out / "_lock")], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"locked\n"
        with pytest.raises(JobLocked, match="another corpus job"):
            encode_corpus(encoder, paths, out, shard_size=4, progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert len(encode_corpus(encoder, paths, out, shard_size=4, progress=False)) == 9


# -- shards the manifest proves -------------------------------------------------------------------
def flip_a_bit(path, rng):
    data = bytearray(path.read_bytes())
    position = rng.randrange(len(data) - 64, len(data))  # in the arrays, past the header
    data[position] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


def test_a_rerun_encodes_a_damaged_or_missing_shard_again(tmp_path, encoder):
    paths = source(tmp_path, n=12)
    whole = encode_corpus(encoder, paths, tmp_path / "whole", shard_size=3, progress=False)
    out = tmp_path / "out"
    encode_corpus(encoder, paths, out, shard_size=3, progress=False)
    rng = random.Random(3)
    flip_a_bit(out / "part-00001.safetensors", rng)
    (out / "part-00002.safetensors").unlink()
    with pytest.raises(ValueError, match="part-00001.safetensors: its SHA-256 differs"):
        load_corpus(out)
    assert verify_corpus(out) == [f"{out}/part-00001.safetensors: its SHA-256 differs from the manifest's (the file changed "
                                  "after it was written)", f"{out}/part-00002.safetensors: missing"]
    with pytest.warns(UserWarning, match="part-00001.safetensors: its SHA-256 differs.*encoding its rows again"):
        again = encode_corpus(encoder, paths, out, shard_size=3, progress=False)
    assert same(again, whole) and again.manifest["last_run"]["rows"] == 6 and verify_corpus(out) == []


def test_changed_weights_and_batch_size_refuse_to_resume(tmp_path, encoder):
    model = tmp_path / "model"
    shutil.copytree(encoder.name, model)
    paths, out = source(tmp_path), tmp_path / "out"
    encode_corpus(str(model), paths, out, shard_size=4, progress=False)
    with pytest.raises(ValueError, match="different batch_size \\(None, now 2\\)"):
        encode_corpus(str(model), paths, out, shard_size=4, batch_size=2, progress=False)
    weights = next(model.glob("*.safetensors"))
    flip_a_bit(weights, random.Random(1))  # same size, same header: only the bytes changed
    with pytest.raises(ValueError, match=f"different weights \\({weights.name} changed\\)"):
        encode_corpus(str(model), paths, out, shard_size=4, progress=False)


@pytest.mark.parametrize("seed", range(6))
def test_a_tampered_corpus_never_returns_a_wrong_row(tmp_path, encoder, seed):
    """Corrupt, delete, truncate or swap shard files and manifest entries at random: load_corpus
    either returns exactly the rows of the job or raises."""
    paths = source(tmp_path, n=14, seed=seed)
    out = tmp_path / "out"
    truth = encode_corpus(encoder, paths, out, shard_size=3, progress=False)
    truth = (list(truth.ids), truth.hs.clone(), truth.rw.clone())
    rng = random.Random(seed)
    for trial in range(12):
        shutil.rmtree(tmp_path / "t", ignore_errors=True)
        shutil.copytree(out, tmp_path / "t")
        t = tmp_path / "t"
        manifest = json.loads((t / "_manifest.json").read_text())
        shards = sorted(t.glob("part-*"))
        for _ in range(rng.randint(1, 2)):
            action = rng.choice(["flip", "inf", "delete", "truncate", "swap_files", "swap_entries", "drop_entry",
                                 "edit_rows", "copy_over"])
            a, b = rng.sample(shards, 2)
            i, j = rng.sample(range(len(manifest["shards"])), 2)
            if action == "flip":
                flip_a_bit(a, rng)
            elif action == "inf":
                data = bytearray(a.read_bytes())
                data[-4:] = np.array([np.inf], np.float32).tobytes()
                a.write_bytes(bytes(data))
            elif action == "delete" and a.exists():
                a.unlink()
            elif action == "truncate" and a.exists():
                a.write_bytes(a.read_bytes()[: rng.randrange(a.stat().st_size)])
            elif action == "swap_files" and a.exists() and b.exists():
                tmp = a.read_bytes()
                a.write_bytes(b.read_bytes())
                b.write_bytes(tmp)
            elif action == "swap_entries":
                entries = manifest["shards"]
                entries[i], entries[j] = entries[j], entries[i]
            elif action == "drop_entry":
                del manifest["shards"][i]
            elif action == "edit_rows":
                manifest["shards"][i]["rows"] -= 1
            elif action == "copy_over" and a.exists():
                shutil.copyfile(a, b)
        (t / "_manifest.json").write_text(json.dumps(manifest))
        try:
            corpus = load_corpus(t)
        except ValueError:
            continue
        assert corpus.ids == truth[0] and torch.equal(corpus.hs, truth[1]) and torch.equal(corpus.rw, truth[2]), trial


def test_moee_verify(tmp_path, encoder, capsys):
    paths, out = source(tmp_path), tmp_path / "out"
    encode_corpus(encoder, paths, out, shard_size=4, progress=False)
    assert main(["verify", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"{out}: 3 shards, 9 rows, every shard matches its manifest entry"
    flip_a_bit(out / "part-00000.safetensors", random.Random(0))
    assert main(["verify", str(out)]) == 1
    assert "part-00000.safetensors: its SHA-256 differs" in capsys.readouterr().err


# -- layout and open files --------------------------------------------------------------------
def test_a_parquet_job_reads_as_one_dataset(tmp_path, encoder):
    import pandas as pd
    import pyarrow.dataset as ds

    paths, out = source(tmp_path, n=10), tmp_path / "out"
    corpus = encode_corpus(encoder, paths, out, shard_size=4, format="parquet", progress=False)
    frame = pd.read_parquet(out)
    assert list(frame["id"]) == corpus.ids
    assert torch.equal(torch.from_numpy(np.stack(frame["hs"].to_list())), corpus.hs)
    assert ds.dataset(str(out), format="parquet").to_table().num_rows == 10


LOAD_UNDER_LIMIT = """
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
from moee_fast import load_corpus
corpus = load_corpus(sys.argv[1])
hs, rw = corpus.hs, corpus.rw
rows = sum(len(ids) for ids, _ in corpus)
print(len(corpus), rows, float(hs.sum()), float(rw.sum()))
"""


def test_2000_shards_open_under_256_files(tmp_path):
    out, rng = tmp_path / "out", np.random.default_rng(0)
    out.mkdir()
    entries, hs_all = [], []
    for index in range(2000):
        hs, rw = torch.from_numpy(rng.standard_normal((1, 4), np.float32)), torch.from_numpy(rng.random((1, 2, 3), np.float32))
        record = write_shard(str(out / shard_name(index, "safetensors")), [f"r{index}"], hs, rw)
        entries.append({"file": shard_name(index, "safetensors"), "start": index, "input_rows": 1, "rows": 1,
                        "shape": [1, 4, 2, 3], "dtype": "float32", **record})
        hs_all.append(hs)
    manifest = {"format": "moee-fast-corpus/1", "model": "m", "prompt": "", "rw_source": "scores", "dtype": "torch.float32",
                "options": {"shard_size": 1}, "shape": [4, 2, 3], "shards": entries, "total_rows": 2000, "complete": True}
    (out / "_manifest.json").write_text(json.dumps(manifest))
    result = subprocess.run([sys.executable, "-c", LOAD_UNDER_LIMIT, str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    n, rows, hs_sum, _ = result.stdout.split()
    assert int(n) == int(rows) == 2000 and abs(float(hs_sum) - float(torch.cat(hs_all).sum())) < 1e-2


def test_shard_numbers_never_run_out_of_digits(tmp_path, encoder):
    from moee_fast.corpus.job import job_files

    assert shard_name(100_000, "parquet") == "part-100000.parquet"
    (tmp_path / "_manifest.json").write_text("{}")
    for name in ("part-100000.parquet", "part-1234567.safetensors", "part-0001.parquet"):
        (tmp_path / name).write_bytes(b"")
    ours, foreign = job_files(str(tmp_path), has_manifest=True, ray=False)
    assert ours == ["_manifest.json", "part-100000.parquet", "part-1234567.safetensors"] and foreign == ["part-0001.parquet"]


def test_command_line_counts_and_outputs(tmp_path, encoder, capsys):
    path = tmp_path / "in.txt"
    path.write_text("first\n\nthird\n")
    out = tmp_path / "out"
    args = ["encode", "--model", encoder.name, "--input", str(path), "--output", str(out), "--skip-empty", "--shard-size", "2"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "encoded 2 rows (1 empty rows skipped)" in printed and f"wrote 2 rows to {out}" in printed
    assert main(args) == 0 and "encoded 0 rows in" in capsys.readouterr().out
    for output in ("emb.parquet", ""):
        assert main(["encode", "--input", str(path), "--output", str(tmp_path / output) if output else ""]) == 2
        assert "give a .safetensors file or a directory" in capsys.readouterr().err
    assert not (tmp_path / "emb.parquet").exists()
    mode = (out / "part-00000.safetensors").stat().st_mode & 0o777
    assert mode == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_an_empty_job_has_the_models_shape(tmp_path, encoder):
    (tmp_path / "empty.txt").write_text("")
    corpus = encode_corpus(encoder, [str(tmp_path / "empty.txt")], tmp_path / "out", progress=False)
    assert len(corpus) == 0 and corpus.hs.shape == (0, 64) and corpus.rw.shape == (0, 3, 8)
    assert corpus.manifest["total_rows"] == 0 and verify_corpus(tmp_path / "out") == []
