import json
import os
import shutil
import stat

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


def test_one_text_is_singular_and_the_file_follows_the_umask(demo_cache, tmp_path, capsys):
    source, out_file = tmp_path / "one.txt", tmp_path / "one.safetensors"
    source.write_text("a single text\n")
    assert main(["encode", "--input", str(source), "--output", str(out_file)]) == 0
    assert capsys.readouterr().out.startswith("encoded 1 text (")
    mask = os.umask(0)
    os.umask(mask)
    assert out_file.stat().st_mode & 0o777 == 0o666 & ~mask  # readable as any file the user writes


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
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO("\r\n".join(texts).encode())))
        source = "-"
    out_file = tmp_path / "out.safetensors"
    prompt = 'This sentence : "{text}" means in one word:"'
    assert main(["encode", "--input", str(source), "--output", str(out_file), "--prompt", prompt]) == 0
    loaded = MoEEmbeddings.load(out_file)
    from moee_fast.demo import demo_checkpoint

    direct = MoEEncoder.from_pretrained(demo_checkpoint(), device="cpu").encode(texts, prompt=prompt)
    assert relative_error(loaded.hs, direct.hs).max() <= 1e-6
    assert loaded.metadata["prompt"] == prompt


def test_bad_jsonl_names_the_line(demo_cache, tmp_path, capsys):
    source = tmp_path / "bad.jsonl"
    source.write_text('{"text": "ok"}\n{"title": "no text"}\n')
    assert main(["encode", "--input", str(source), "--output", str(tmp_path / "o.safetensors")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "bad.jsonl:2" in err[-1] and "Traceback" not in "".join(err)


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: the checks under test must come before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(MoEEncoder, "from_pretrained", classmethod(refuse))


def run_cli(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def test_outputs_are_never_clobbered(demo_cache, tmp_path, capsys, no_model_load):
    source = tmp_path / "in.txt"
    source.write_text("one\ntwo\n")
    existing = tmp_path / "old.safetensors"
    existing.write_bytes(b"precious")
    link = tmp_path / "link.safetensors"
    link.symlink_to(existing)
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    cases = [
        (existing, "output exists; pass --overwrite"),
        (link, "is a symlink"),
        (fifo, "not a regular file"),
        (tmp_path / "missing" / "x.safetensors", "no directory"),
    ]
    for output, message in cases:
        code, line = run_cli(["encode", "--input", str(source), "--output", str(output)], capsys)
        assert code == 1 and message in line and str(output) in line
    for output, message in [(link, "is a symlink"), (fifo, "not a regular file")]:
        code, line = run_cli(["encode", "--input", str(source), "--output", str(output), "--overwrite"], capsys)
        assert code == 1 and message in line
    shutil.copy(source, tmp_path / "in.safetensors")
    code, line = run_cli(["encode", "--input", str(tmp_path / "in.safetensors"), "--output", str(tmp_path / "in.safetensors"), "--overwrite"], capsys)
    assert code == 1  # .safetensors is not a text input: refused by name before anything is written
    assert existing.read_bytes() == b"precious" and os.path.islink(link) and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert source.read_text() == "one\ntwo\n"
    code, line = run_cli(["encode", "--input", str(source), "--output", os.devnull], capsys)
    assert code == 1 and line.startswith(f"moee: {os.devnull}: output is not a regular file or directory") and "never to a device" in line
    code, line = run_cli(["encode", "--input", str(source), "--output", str(existing)], capsys)
    assert "--overwrite to replace" in line and "overwrite=True" not in line  # the CLI names its flag only


def test_output_equal_to_input_is_refused(tmp_path):
    from moee_fast.files import check_output_file

    source = tmp_path / "in.txt"
    source.write_text("one\n")
    with pytest.raises(ValueError, match="output is also an input"):
        check_output_file(str(source), overwrite=True, inputs=[str(tmp_path / "." / "in.txt")])
    assert source.read_text() == "one\n"


def test_usage_errors_exit_2_in_one_line_before_the_model_loads(demo_cache, tmp_path, capsys, no_model_load):
    source = tmp_path / "in.txt"
    source.write_text("one\n")
    base = ["encode", "--input", str(source), "--output", str(tmp_path / "out")]
    for extra, message in [
        (["--batch-size", "1.5"], "--batch-size: '1.5' is not an integer"),
        (["--max-length", "0"], "--max-length: 0 must be at least 1"),
        (["--prompt", "no placeholder"], "neither a preset"),
        (["--dtype", "float33"], "unknown dtype"),
        (["--format", "csv"], "invalid choice"),
        (["--devices", "gpu7"], "gpu7"),
    ]:
        code, line = run_cli(base + extra, capsys)
        assert code == (1 if extra[0] == "--devices" else 2) and message in line, (extra, line)
    code, line = run_cli(["encode", "--input", str(source), "--output", str(tmp_path / "o.safetensors"), "--format", "parquet"], capsys)
    assert code == 2 and "directory" in line
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "o.safetensors")


def test_ctrl_c_prints_one_line_and_exits_130(demo_cache, tmp_path, capsys, monkeypatch):
    source = tmp_path / "in.txt"
    source.write_text("one\ntwo\n")

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(MoEEncoder, "encode", interrupted)
    code, line = run_cli(["encode", "--input", str(source), "--output", str(tmp_path / "o.safetensors")], capsys)
    assert code == 130 and line == "moee: interrupted"
    code, line = run_cli(["encode", "--input", str(source), "--output", str(tmp_path / "dir")], capsys)
    assert code == 130 and line == "moee: interrupted after 0 of 2 rows; run the same command again to resume"
    with pytest.raises(KeyboardInterrupt):
        main(["encode", "--input", str(source), "--output", str(tmp_path / "o.safetensors"), "--debug"])
    assert sorted(os.listdir(tmp_path)) == ["dir", "in.txt"] and sorted(os.listdir(tmp_path / "dir")) == ["_lock", "_manifest.json"]


def test_unexpected_errors_show_a_traceback_only_with_debug(demo_cache, tmp_path, capsys, monkeypatch):
    source = tmp_path / "in.txt"
    source.write_text("one\n")

    def broken(self, *args, **kwargs):
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(MoEEncoder, "encode", broken)
    argv = ["encode", "--input", str(source), "--output", str(tmp_path / "o.safetensors")]
    code, line = run_cli(argv, capsys)
    assert code == 1 and line == "moee: RuntimeError: kernel failed (--debug shows the traceback)"
    with pytest.raises(RuntimeError, match="kernel failed"):
        main(argv + ["--debug"])


def test_interrupted_save_leaves_no_file(tmp_path, monkeypatch):
    import safetensors.torch

    emb = MoEEmbeddings(torch.randn(3, 5), torch.rand(3, 2, 4))
    real_save = safetensors.torch.save_file

    def save_then_interrupt(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata)
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        emb.save(tmp_path / "e.safetensors")
    assert os.listdir(tmp_path) == []


def test_garbage_embeddings_files_name_the_file(tmp_path):
    emb = MoEEmbeddings(torch.randn(3, 5), torch.rand(3, 2, 4))
    good = tmp_path / "good.safetensors"
    emb.save(good)
    data = good.read_bytes()
    cases = {
        "truncated.safetensors": data[: len(data) - 7],
        "short.safetensors": data[:5],
        "garbage.safetensors": b"\xff" * 64,
        "badjson.safetensors": (20).to_bytes(8, "little") + b"{not json at all....",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=rf"{name}: .*(truncated|not a safetensors)"):
            MoEEmbeddings.load(tmp_path / name)
    with pytest.raises(FileExistsError, match="good.safetensors"):
        emb.save(good)
    emb.save(good, overwrite=True)
    assert torch.equal(MoEEmbeddings.load(good).hs, emb.hs)


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


def test_mteb_refuses_unknown_tasks_and_uncached_datasets_offline(tmp_path, monkeypatch, capsys, no_model_load):
    pytest.importorskip("mteb")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    with pytest.raises(SystemExit) as exc:
        main(["mteb", "--tasks", "NoSuchTask", "--output-dir", str(tmp_path)])
    message = str(exc.value)
    assert message.startswith("moee mteb: unknown task: 'NoSuchTask'") and "KeyError" not in message
    with pytest.raises(SystemExit) as exc:
        main(["mteb", "--tasks", "STSBenchmark", "--output-dir", str(tmp_path)])
    message = str(exc.value)
    assert message.startswith("moee mteb: offline (HF_HUB_OFFLINE is set)") and "STSBenchmark (mteb/stsbenchmark-sts)" in message
    assert "\n" not in message


def test_hub_id_offline_fails_at_once_saying_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    with pytest.raises(OSError, match=r"^offline \(HF_HUB_OFFLINE is set\): 'someorg/some-moe' is not a local directory"):
        MoEEncoder.from_pretrained("someorg/some-moe", device="cpu")


def test_demo_is_a_public_name(demo_cache, tmp_path, monkeypatch):
    from moee_fast.demo import demo_checkpoint

    monkeypatch.chdir(tmp_path)  # no local folder named "demo" here
    enc = MoEEncoder.from_pretrained("demo", device="cpu")
    direct = MoEEncoder.from_pretrained(demo_checkpoint(), device="cpu")
    texts = ["A man is playing a guitar.", "x"]
    got, want = enc.encode(texts), direct.encode(texts)
    assert torch.equal(got.hs, want.hs) and torch.equal(got.rw, want.rw)
    assert os.environ["MOEE_FAST_CACHE"] in demo_checkpoint()


def test_serve_with_the_vllm_engine_refuses_a_device_before_loading(tmp_path, no_model_load):
    with pytest.raises(SystemExit, match="--engine vllm places the model itself; leave out --device"):
        main(["serve", "--engine", "vllm", "--device", "cpu", "--model", str(tmp_path)])
