"""The Ray Data path on a local Ray (2 CPUs, fractional actors) against the single-process job."""

import pytest
import torch

from moee_fast import MoEEncoder, encode_corpus, load_corpus
from conftest import random_texts
from test_corpus import write_inputs

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_job_equals_the_single_process_job(tmp_path, checkpoint, local_ray):
    from moee_fast.ray import encode_corpus_ray

    olmoe = checkpoint("olmoe")
    paths = write_inputs(tmp_path, random_texts(21, seed=21, max_words=30))
    single = encode_corpus(MoEEncoder.from_pretrained(olmoe, device="cpu"), paths, tmp_path / "local", shard_size=4, progress=False)
    stats = encode_corpus_ray(olmoe, paths, str(tmp_path / "ray"), shard_size=4, num_cpus=0.5)
    assert stats["rows"] == 21
    on_ray = load_corpus(tmp_path / "ray")
    assert on_ray.ids == single.ids
    assert torch.allclose(on_ray.hs, single.hs, rtol=1e-5, atol=1e-6) and torch.allclose(on_ray.rw, single.rw, rtol=1e-5, atol=1e-6)
    again = encode_corpus_ray(olmoe, paths, str(tmp_path / "ray"), shard_size=4, num_cpus=0.5)
    assert again["rows"] == 0  # finished: nothing appended
    with pytest.raises(ValueError, match="different prompt"):
        encode_corpus_ray(olmoe, paths, str(tmp_path / "ray"), shard_size=4, prompt="prompteol")


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
    paths = write_inputs(tmp_path, random_texts(6, seed=6, max_words=20))
    base = ["encode", "--model", olmoe, "--input", *paths, "--shard-size", "4"]
    assert main(base + ["--output", str(tmp_path / "local")]) == 0
    assert main(base + ["--output", str(tmp_path / "ray"), "--engine", "ray"]) == 0
    assert "wrote 6 rows" in capsys.readouterr().out
    local, on_ray = load_corpus(tmp_path / "local"), load_corpus(tmp_path / "ray")
    assert on_ray.ids == local.ids and torch.allclose(on_ray.hs, local.hs, rtol=1e-5, atol=1e-6)
    assert main(base + ["--output", str(tmp_path / "ray2"), "--engine", "ray", "--input", "-"]) == 1
