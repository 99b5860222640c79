import json

import pytest
import torch

from moee_fast import MoEEmbeddings, MoEEncoder
from moee_fast.cli import main
from conftest import relative_error


@pytest.fixture
def demo_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MOEE_FAST_CACHE", str(tmp_path_factory.getbasetemp() / "moee-cache"))


def test_encode_defaults_to_the_demo_model_and_samples(demo_cache, tmp_path, capsys):
    out_file = tmp_path / "e.safetensors"
    assert main(["encode", "--output", str(out_file)]) == 0
    printed = capsys.readouterr().out
    assert "texts/s" in printed and "tokens/s" in printed
    loaded = MoEEmbeddings.load(out_file)
    assert loaded.hs.shape[0] == loaded.rw.shape[0] == 10
    assert "untrained" in loaded.metadata["model"]


@pytest.mark.parametrize("kind", ["txt", "jsonl", "stdin"])
def test_encode_reads_txt_jsonl_and_stdin(demo_cache, tmp_path, monkeypatch, kind):
    import io

    texts = ["first text", "zweiter Text 🙂", "third"]
    source = tmp_path / f"in.{kind}"
    if kind == "txt":
        source.write_text("\n".join(texts) + "\n")
    elif kind == "jsonl":
        source.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)) + "\n")
    else:
        monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(texts)))
        source = "-"
    out_file = tmp_path / "out.safetensors"
    prompt = 'This sentence : "{text}" means in one word:"'
    assert main(["encode", "--input", str(source), "--output", str(out_file), "--prompt", prompt]) == 0
    loaded = MoEEmbeddings.load(out_file)
    from moee_fast.demo import demo_checkpoint

    direct = MoEEncoder.from_pretrained(demo_checkpoint(), device="cpu").encode(texts, prompt=prompt)
    assert relative_error(loaded.hs, direct.hs).max() <= 1e-6
    assert loaded.metadata["prompt"] == prompt


def test_bad_jsonl_names_the_line(demo_cache, tmp_path):
    source = tmp_path / "bad.jsonl"
    source.write_text('{"text": "ok"}\n{"title": "no text"}\n')
    with pytest.raises(SystemExit, match="bad.jsonl:2"):
        main(["encode", "--input", str(source)])


def test_embeddings_file_roundtrip_and_errors(tmp_path):
    emb = MoEEmbeddings(torch.randn(3, 5), torch.rand(3, 2, 4), {"model": "m"})
    emb.save(tmp_path / "x.safetensors")
    back = MoEEmbeddings.load(tmp_path / "x.safetensors")
    assert torch.equal(back.hs, emb.hs) and torch.equal(back.rw, emb.rw) and back.metadata == {"model": "m"}
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        MoEEmbeddings.load(tmp_path / "nope.safetensors")
    from safetensors.torch import save_file

    save_file({"hs": torch.zeros(1, 2)}, str(tmp_path / "half.safetensors"))
    with pytest.raises(ValueError, match="half.safetensors.*rw"):
        MoEEmbeddings.load(tmp_path / "half.safetensors")
