"""README.md's Python examples run as written, with the Hub model swapped for the offline demo."""

import os
import re


README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")
HUB_MODEL = "allenai/OLMoE-1B-7B-0924"


def python_blocks():
    with open(README, encoding="utf-8") as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_readme_examples_run(monkeypatch, tmp_path):
    from moee_fast.demo import demo_checkpoint

    monkeypatch.chdir(tmp_path)
    demo = demo_checkpoint()
    blocks = python_blocks()
    assert len(blocks) >= 3
    namespace: dict = {}
    for block in blocks:
        code = block.replace(HUB_MODEL, demo)
        if "from vllm" in code:  # run in vLLM's own environment by tests/test_vllm.py
            compile(code, "README.md", "exec")
            continue
        if "mteb.evaluate" in code:
            compile(code, "README.md", "exec")  # needs MTEB's datasets from the network: checked for syntax only
            continue
        exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["out"].hs.shape[0] == 2
    assert tuple(namespace["scores"].shape) == (1, 2)


def test_readme_commands_match_ci():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    assert "<!-- ci:test:begin -->" in text and "pytest" in text.split("<!-- ci:test:begin -->")[1]
    assert "moee encode" in text
