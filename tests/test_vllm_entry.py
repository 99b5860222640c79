"""The vLLM engine behind moee-fast's own entry points, where vllm is absent (the engines
themselves are tested in tests/test_vllm.py, in vLLM's environment)."""

import importlib.util

import pytest

from moee_fast.vllm import VLLMEncoder
from moee_fast.cli import main

needs_no_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")


@needs_no_vllm
def test_vllm_encoder_without_vllm_says_what_to_install(checkpoint):
    with pytest.raises(ImportError, match=r"moee-fast\[vllm\]"):
        VLLMEncoder.from_pretrained(checkpoint("olmoe"))


def test_cli_vllm_engine_writes_one_file_only(tmp_path, capsys):
    assert main(["encode", "--engine", "vllm", "--output", str(tmp_path / "out")]) == 2
    assert "--engine vllm writes one .safetensors file" in capsys.readouterr().err
    assert main(["encode", "--engine", "vllm", "--quantize", "nf4", "--output", str(tmp_path / "o.safetensors")]) == 2


def test_plugin_entry_point_is_declared():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    assert project["project"]["entry-points"]["vllm.general_plugins"] == {"moee": "moee_fast.vllm:register"}
    assert "vllm" in project["project"]["optional-dependencies"]
