"""Every code block of README.md and docs/*.md runs as written, offline: Python blocks on the
built-in demo model, `moee ...` lines through the CLI. The one documented swap: every Hub id
below (HUB_IDS) becomes the demo checkpoint's directory. A block that needs what a test run
does not have (a GPU, the network, vLLM's environment, a running server) is compiled only
(`bash -n` for shell), for the reason COMPILE_ONLY gives."""

from __future__ import annotations

import gzip
import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
HUB_IDS = ("allenai/OLMoE-1B-7B-0924",)
FENCE = re.compile(r"^( *)```(\w*)\n(.*?)^\1```", flags=re.S | re.M)

# A marker in a block -> why it cannot run in a test (it is compiled instead).
COMPILE_ONLY = {
    "from vllm": "needs vLLM's own environment (tests/test_vllm.py runs these there)",
    "mteb.evaluate": "MTEB downloads each task's dataset from the network",
    "OpenAI(": "needs a running `moee serve` (tests/test_serve.py runs it against one)",
}
# A shell command starting so -> why it is only syntax-checked.
SHELL_NOT_RUN = {
    "pip ": "installs packages (network)",
    "python3 -m venv": "creates an environment and installs packages (network)",
    "export ": "sets the environment of the reader's shell",
    "curl ": "needs a running `moee serve` (tests/test_serve.py runs it against one)",
    "pytest ": "runs a benchmark (minutes)",
    "MOEE_FAST_BENCH": "runs a benchmark (minutes)",
    "python -m benchmarks": "runs a benchmark or a GPU report",
    "benchmarks/": "builds a benchmark's environment",
    "moee serve": "a server runs until stopped (tests/test_serve*.py start it)",
    "moee mteb": "MTEB downloads each task's dataset from the network",
}
# Options of a `moee` line that need what a test run lacks.
CLI_NOT_RUN = {
    "--engine": "runs on Ray or vLLM (tests/test_ray.py, tests/test_vllm.py)",
    "--devices": "places workers on several GPUs",
    "--quantize": "bitsandbytes quantization (tests/test_quant.py)",
    "...": "an abbreviated command line",
}
# Pages whose every block needs what a test lacks (see the tables above), or that have none.
PAGES_WITHOUT_RUNNABLE = {"benchmarks.md", "mteb.md", "serving.md", "vllm.md", "troubleshooting.md", "internals.md", "fused-ops.md"}
# Input files the CLI examples read, written into the test's folder before they run.
SAMPLE_INPUTS = {
    "texts.txt": "A man is playing a guitar.\nSomeone plays an instrument.\n",
    "texts.jsonl": '{"text": "A man is playing a guitar."}\n{"text": "Someone plays an instrument."}\n',
    "msmarco/part-0.jsonl.gz": '{"doc_id": 7, "text": "Routers send tokens to experts."}\n{"doc_id": 9, "text": "A cat."}\n',
}


def blocks(page: Path) -> list[tuple[str, str]]:
    """(language, code) of each fenced block, in page order."""
    return [(lang, code) for _, lang, code in FENCE.findall(page.read_text(encoding="utf-8"))]


def shell_commands(code: str) -> list[str]:
    """A shell block's commands: continuation lines joined, comments dropped."""
    joined = code.replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def reason_not_run(text: str, table: dict[str, str]) -> str | None:
    return next((why for marker, why in table.items() if marker in text), None)


@pytest.fixture
def demo(tmp_path_factory, monkeypatch):
    """The demo checkpoint, in a cache of the test's own; the Hub unreachable, as offline."""
    monkeypatch.setenv("MOEE_FAST_CACHE", str(tmp_path_factory.getbasetemp() / "moee-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from moee_fast.demo import demo_checkpoint

    return demo_checkpoint()


def swap_hub_ids(code: str, demo: str) -> str:
    for hub_id in HUB_IDS:
        code = code.replace(hub_id, demo)
    return code


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_page_examples_run(page, demo, tmp_path, monkeypatch, capsys):
    from moee_fast import MoEEncoder
    from moee_fast.cli import main

    monkeypatch.chdir(tmp_path)
    for name, text in SAMPLE_INPUTS.items():
        path = tmp_path / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
    # Pages after README continue its quick start: `enc` is the encoder it made.
    namespace: dict = {"enc": MoEEncoder.from_pretrained("demo", device="cpu")}
    ran = 0
    for index, (lang, code) in enumerate(blocks(page)):
        where = f"{page.name} block {index}"
        code = swap_hub_ids(code, demo)
        if lang in ("python", "py"):
            compiled = compile(code, where, "exec")
            if reason_not_run(code, COMPILE_ONLY) is None:
                exec(compiled, namespace)
                ran += 1
        elif lang in ("bash", "sh", "shell"):
            subprocess.run(["bash", "-n"], input=code, text=True, check=True)
            for command in shell_commands(code):
                if reason_not_run(command, SHELL_NOT_RUN) or reason_not_run(command, CLI_NOT_RUN):
                    continue
                if command.startswith("moee "):
                    argv = shlex.split(command)[1:]
                    status = main(argv)
                    assert status == 0, f"{where}: `{command}` exited {status}: {capsys.readouterr().err[-2000:]}"
                else:  # plain shell, such as writing an input file
                    subprocess.run(["bash", "-ec", command], check=True, cwd=tmp_path)
                ran += 1
    assert ran or page.name in PAGES_WITHOUT_RUNNABLE, f"{page.name}: no block ran"


def test_readme_quick_start_results(demo, tmp_path, monkeypatch):
    """The quick start's results have the shapes README states."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    python = [code for lang, code in blocks(ROOT / "README.md") if lang == "python"]
    exec(compile(python[0], "README.md", "exec"), namespace)
    out, one, scores = namespace["out"], namespace["one"], namespace["scores"]
    assert out.hs.shape[0] == 2 and out.rw.shape[0] == 2
    assert one.hs.shape == (1, out.hs.shape[1]) and one.rw.shape == (1, *out.rw.shape[1:])
    assert tuple(scores.shape) == (1, 2)


def test_every_marker_is_used():
    """No stale reason: each marker of the tables still matches some block."""
    text = "\n".join(code for page in PAGES for _, code in blocks(page))
    for table in (COMPILE_ONLY, SHELL_NOT_RUN, CLI_NOT_RUN):
        for marker in table:
            assert marker in text, f"{marker!r} matches no block any more: remove it"


def test_readme_commands_match_ci():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "<!-- ci:test:begin -->" in text and "pytest" in text.split("<!-- ci:test:begin -->")[1]
    assert "&& moee encode\n" in text
    assert len(text.splitlines()) <= 260, "README is an introduction: reference material goes under docs/"


def test_links_between_pages_resolve():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:\s]+\.(?:md|cff)|LICENSE)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            assert (page.parent / target).exists(), f"{page.name} links to a missing {target}"
