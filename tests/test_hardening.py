"""Hostile and careless input: checkpoint code never runs, texts beyond the model's context are
refused unless truncated, and every bad checkpoint, text or argument fails early with an error
that names it."""

import json
import math
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import random_texts, relative_error, save_checkpoint
from deepseek_reference import write_checkpoint
from moee_fast import MoEEmbeddings, MoEEncoder, supported_families, tune_alpha
from moee_fast.cli import main



def marker_code(directory) -> str:
    """Code that, executed (transformers runs a copy from its module cache), leaves a MARKER
    file in the checkpoint directory: the proof that checkpoint code ran."""
    return f"import pathlib\npathlib.Path({os.path.join(os.fspath(directory), 'MARKER')!r}).write_text('ran')\n"


def copy_checkpoint(source: str, target) -> str:
    shutil.copytree(source, target)
    return str(target)


def edit_json(path: str, **changes) -> None:
    with open(path) as f:
        data = json.load(f)
    data.update(changes)
    with open(path, "w") as f:
        json.dump(data, f)


def load_in_subprocess(path: str, stdin: str = "y\n" * 4) -> subprocess.CompletedProcess:
    """from_pretrained + one encode in a fresh interpreter whose stdin answers "y" to any prompt."""
    code = "import sys\nfrom moee_fast import MoEEncoder\nMoEEncoder.from_pretrained(sys.argv[1]).encode(['hi'])\n"
    return subprocess.run([sys.executable, "-c", code, path], input=stdin, capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------------ 1. checkpoint code
def test_unknown_model_type_with_auto_map_is_refused_without_prompt_or_running_its_code(tmp_path):
    path = tmp_path / "custom"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "model_type": "evilmoe", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"},
    }))
    (path / "configuration_evil.py").write_text(marker_code(path) + "from transformers import PretrainedConfig as EvilConfig\n")
    (path / "modeling_evil.py").write_text(marker_code(path))

    result = load_in_subprocess(str(path))
    assert not (path / "MARKER").exists()
    assert result.returncode != 0
    assert "custom code" not in result.stdout + result.stderr  # transformers' prompt never shows
    assert "'evilmoe'" in result.stderr and "never runs" in result.stderr
    assert all(family in result.stderr for family in supported_families())


@pytest.mark.parametrize("carrier", ["model", "tokenizer"])
def test_known_model_type_never_runs_the_checkpoints_own_classes(checkpoint, tmp_path, carrier):
    """A supported model type whose config or tokenizer config also maps to shipped code: the
    built-in classes load, the shipped files never run."""
    path = copy_checkpoint(checkpoint("olmoe"), tmp_path / "ckpt")
    if carrier == "model":
        edit_json(os.path.join(path, "config.json"),
                  auto_map={"AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"})
        for name in ("configuration_evil.py", "modeling_evil.py"):
            with open(os.path.join(path, name), "w") as f:
                f.write(marker_code(path) + "from transformers import OlmoeConfig as EvilConfig, OlmoeModel as EvilModel\n")
    else:
        edit_json(os.path.join(path, "tokenizer_config.json"), tokenizer_class="EvilTokenizer",
                  auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]})
        with open(os.path.join(path, "tokenization_evil.py"), "w") as f:
            f.write(marker_code(path) + "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")

    result = load_in_subprocess(path)
    assert not os.path.exists(os.path.join(path, "MARKER"))
    assert result.returncode == 0, result.stderr


def test_trust_remote_code_false_is_accepted(checkpoint):
    enc = MoEEncoder.from_pretrained(checkpoint("olmoe"), device="cpu", trust_remote_code=False)
    assert enc.encode(["a text"]).hs.isfinite().all()


# ------------------------------------------------------------------------ 4. context length
@pytest.fixture(scope="module")
def short_context(tmp_path_factory, tokenizer_corpus):
    """An OLMoE checkpoint with 24 positions."""
    return save_checkpoint(tmp_path_factory.mktemp("short-context"), "olmoe", tokenizer_corpus, max_position_embeddings=24)


def test_text_beyond_the_context_is_refused_naming_index_length_and_limit(short_context):
    enc = MoEEncoder.from_pretrained(short_context, device="cpu")
    texts = random_texts(6, seed=5, max_words=60)
    lengths = [len(enc.tokenizer(t)["input_ids"]) for t in texts]
    first_long = next(i for i, n in enumerate(lengths) if n > 24)
    with pytest.raises(ValueError, match=rf"texts\[{first_long}\] is {lengths[first_long]} tokens.*context of 24 positions"):
        enc.encode(texts)
    # A prompt counts: a text that fits alone no longer fits inside a long template.
    shortest = texts[lengths.index(min(lengths))]
    enc.encode([shortest])
    with pytest.raises(ValueError, match=r"texts\[0\] is \d+ tokens"):
        enc.encode([shortest], prompt=" ".join(["the"] * 30) + " {text}")


def test_max_length_truncates_to_the_context_and_beyond_it_is_an_error(short_context):
    enc = MoEEncoder.from_pretrained(short_context, device="cpu")
    texts = random_texts(6, seed=5, max_words=60)
    with pytest.warns(UserWarning, match="truncated to max_length=24"):
        out = enc.encode(texts, max_length=24)
    assert out.hs.isfinite().all() and out.rw.isfinite().all()
    with pytest.raises(ValueError, match="max_length=25 exceeds this model's context of 24"):
        enc.encode(texts, max_length=25)


def test_cli_max_length_reaches_the_encoder(short_context, tmp_path):
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(random_texts(4, seed=9, max_words=60)) + "\n")
    out_file = tmp_path / "emb.safetensors"
    args = ["encode", "--model", short_context, "--device", "cpu", "--input", str(source), "--output", str(out_file)]
    with pytest.warns(UserWarning, match="truncated"):
        assert main(args + ["--max-length", "24"]) == 0
    assert len(MoEEmbeddings.load(str(out_file))) == 4


# ------------------------------------------------------------------------ 7. misleading errors
def test_checkpoint_without_tokenizer_files_is_named_at_load(checkpoint, tmp_path):
    path = copy_checkpoint(checkpoint("olmoe"), tmp_path / "no-tokenizer")
    for name in os.listdir(path):
        if name.startswith(("tokenizer", "special_tokens")):
            os.remove(os.path.join(path, name))
    with pytest.raises(ValueError, match=r"tokenizer is empty.*tokenizer\.json"):
        MoEEncoder.from_pretrained(path, device="cpu")


def damage(path: str, how: str) -> None:
    if how == "truncated":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) * 2 // 3)
    else:
        with open(path, "wb") as f:
            f.write(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())


@pytest.mark.parametrize("how", ["truncated", "garbage"])
@pytest.mark.parametrize("family", ["olmoe", "deepseek"])
def test_unreadable_weight_file_is_named(checkpoint, tokenizer_corpus, tmp_path, family, how):
    if family == "deepseek":  # moee-fast's native loader, two shards
        path = write_checkpoint(tmp_path / "ckpt", tokenizer_corpus)
        file = "model-00002-of-00002.safetensors"
    else:  # transformers' loader
        path, file = copy_checkpoint(checkpoint(family), tmp_path / "ckpt"), "model.safetensors"
    damage(os.path.join(path, file), how)
    with pytest.raises(ValueError, match=rf"weight file .*{file} is not a readable safetensors file"):
        MoEEncoder.from_pretrained(path, device="cpu")
    if family == "deepseek":
        from moee_fast.loading.models import load_deepseek

        with pytest.raises(ValueError, match=rf"{file} is not a readable safetensors file"):
            load_deepseek(path)


def test_unreadable_weight_file_from_the_hub_cache_is_named(checkpoint, tmp_path):
    """A Hub id whose cached snapshot holds a garbage weight file (no network: the cache only)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--acme--tiny-moe"
    snapshot = copy_checkpoint(checkpoint("olmoe"), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    hub = dict(cache_dir=str(tmp_path / "cache"), local_files_only=True, device="cpu")
    assert MoEEncoder.from_pretrained("acme/tiny-moe", **hub).encode(["a text"]).hs.isfinite().all()
    damage(os.path.join(snapshot, "model.safetensors"), "garbage")
    with pytest.raises(ValueError, match=rf"weight file .*{commit}.model\.safetensors is not a readable safetensors file"):
        MoEEncoder.from_pretrained("acme/tiny-moe", **hub)


def test_pickle_weights_load_only_when_allowed(checkpoint, tmp_path):
    """transformers' loader as the native one: a .bin can run code when unpickled."""
    source = checkpoint("olmoe")
    path = copy_checkpoint(source, tmp_path / "ckpt")
    torch.save(load_file(os.path.join(path, "model.safetensors")), os.path.join(path, "pytorch_model.bin"))
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(ValueError, match=r"only pickle weights \(pytorch_model.bin.*allow_pickle=True"):
        MoEEncoder.from_pretrained(path, device="cpu")
    texts = random_texts(4, seed=8)
    out = MoEEncoder.from_pretrained(path, device="cpu", allow_pickle=True).encode(texts)
    expected = MoEEncoder.from_pretrained(source, device="cpu").encode(texts)
    assert torch.equal(out.hs, expected.hs) and torch.equal(out.rw, expected.rw)


@pytest.mark.parametrize("poison", [math.nan, math.inf])
def test_non_finite_embeddings_name_their_rows(checkpoint, tmp_path, poison):
    path = copy_checkpoint(checkpoint("olmoe"), tmp_path / "ckpt")
    enc = MoEEncoder.from_pretrained(path, device="cpu")
    texts = ["a model routes", "the cluster", "semantics embedding", "a query"]
    ids = [enc.tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    token = ids[1][-1]
    assert all(token not in ids[i] for i in (0, 2, 3))
    weights = load_file(os.path.join(path, "model.safetensors"))
    weights["model.embed_tokens.weight"][token] = poison  # a corrupted row of the embedding table
    save_file(weights, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})

    enc = MoEEncoder.from_pretrained(path, device="cpu")
    for batch_size in (1, None):
        with pytest.raises(ValueError, match=r"non-finite .* for texts\[1\]: ") as error:
            enc.encode(texts, batch_size=batch_size)
        assert "texts[0]" not in str(error.value) and "texts[2]" not in str(error.value)
    clean = enc.encode([texts[0], texts[2]])
    assert clean.hs.isfinite().all() and clean.rw.isfinite().all()


def test_lone_surrogate_is_named_before_tokenizing(checkpoint, monkeypatch):
    enc = MoEEncoder.from_pretrained(checkpoint("olmoe"), device="cpu")
    monkeypatch.setattr(enc, "tokenizer", None)  # the check must come first
    with pytest.raises(ValueError, match=r"texts\[2\] holds a lone surrogate '\\udc80' at character 3"):
        enc.encode(["fine", "also fine 🙂", "bad\udc80 text"])


@pytest.mark.parametrize("gold", [[3.0] * 6, [1.0, math.nan, 2.0, 3.0, 4.0, 5.0], [1.0]])
def test_tune_alpha_refuses_gold_it_cannot_rank_against(gold):
    torch.manual_seed(0)
    n = len(gold)
    a, b = (MoEEmbeddings(torch.randn(n, 8), torch.rand(n, 2, 4)) for _ in range(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no NaN warnings on the way
        with pytest.raises(ValueError, match="gold"):
            tune_alpha(a, b, gold)


def test_tune_alpha_with_constant_pair_scores_is_a_clear_error():
    a = MoEEmbeddings(torch.randn(5, 8), torch.rand(5, 2, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="constant"):
            tune_alpha(a, a, [1.0, 2.0, 3.0, 4.0, 5.0])


@pytest.mark.parametrize("name", ["batch_size", "max_length"])
@pytest.mark.parametrize("value", [1.5, "2", 0, -3, True, 2.0])
def test_batch_size_and_max_length_must_be_positive_integers(checkpoint, name, value):
    enc = MoEEncoder.from_pretrained(checkpoint("olmoe"), device="cpu")
    with pytest.raises(ValueError, match=rf"{name} must be an integer >= 1 or None, got {value!r}"):
        enc.encode(["a text", "another"], **{name: value})


def test_integer_like_arguments_are_accepted(checkpoint):
    enc = MoEEncoder.from_pretrained(checkpoint("olmoe"), device="cpu")
    texts = random_texts(5, seed=2)
    expected = enc.encode(texts)
    out = enc.encode(texts, batch_size=np.int64(2), max_length=np.int32(1024))
    assert relative_error(out.hs, expected.hs).max() <= 1e-5 and relative_error(out.rw, expected.rw).max() <= 1e-5


def test_finite_check_scans_rows_when_a_sum_overflows_or_is_not_finite():
    from moee_fast.checks import check_finite_rows

    hs, rw = torch.full((3, 4), 3e38), torch.rand(3, 2, 2)
    check_finite_rows(hs, rw, [5, 6, 7])  # the sums overflow, every value is finite
    hs[1, 2], rw[2, 1, 0] = math.nan, -math.inf
    with pytest.raises(ValueError, match=r"embeddings for texts\[6\], texts\[7\]: "):
        check_finite_rows(hs, rw, [5, 6, 7])
