"""moee-fast against the CPU engines a user could run instead: vLLM's CPU build (pooling runner,
last token) and llama.cpp (llama-cpp-python, a GGUF converted from the same checkpoint by
llama.cpp's own converter), on the same texts and the same token ids, rounds alternated in one run.

Run: pytest benchmarks/bench_peers.py   (not part of CI: the peers live in their own venvs)
Create the peers' venvs first with benchmarks/peers/create_venvs.sh; a peer whose venv is absent
or broken is skipped, with the reason in the results. Each peer runs in its own process
(benchmarks/peers/worker.py) with its own Python, one process at a time; ours runs in this one.
Reported per family: texts/s and CPU-seconds per round, the per-round ratio of our texts/s to each
peer's and its median, each path's HS against a float64 transformers forward of each text alone,
and each path's GFLOP/s as a share of the cores' FMA peak (sampled before and after the rounds):
the ceiling that bounds any ratio between engines doing the same arithmetic. Written to
benchmarks/results/cpu_peers_<date>.md with the load average before and after.

Environment: MOEE_FAST_PEER_FAMILIES (default olmoe,qwen2_moe), MOEE_FAST_PEER_TEXTS (texts per
round, default 400), MOEE_FAST_PEER_ROUNDS (3), MOEE_FAST_PEER_THREADS (2), MOEE_FAST_PEER_REFERENCE
(texts checked against float64, default 48), MOEE_FAST_BENCH_TEXTS (a real text file),
MOEE_FAST_PEER_VENVS (where create_venvs.sh put the venvs). `--quick` (or MOEE_FAST_BENCH_QUICK=1):
olmoe, 48 texts, one round, 8 reference texts, unless those variables say otherwise; written to
cpu_peers_quick_<date>.md. The file is rewritten as each family ends.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks.corpus import load_corpus, synthetic_corpus
from benchmarks.helpers import (
    fma_peak_gflops,
    markdown_table,
    max_row_relative_error,
    quick,
    quick_note,
    results_dir,
    results_stem,
)
from benchmarks.models import build_checkpoint, embedding_flops

HERE = Path(__file__).parent / "peers"
QUICK = quick()  # the quick mode's defaults: one family, a small corpus, one round
FAMILIES = [f.strip() for f in os.environ.get("MOEE_FAST_PEER_FAMILIES", "olmoe" if QUICK else "olmoe,qwen2_moe").split(",") if f.strip()]
N_TEXTS = int(os.environ.get("MOEE_FAST_PEER_TEXTS", "48" if QUICK else "400"))
ROUNDS = int(os.environ.get("MOEE_FAST_PEER_ROUNDS", "1" if QUICK else "3"))
THREADS = int(os.environ.get("MOEE_FAST_PEER_THREADS", "2"))
N_REFERENCE = int(os.environ.get("MOEE_FAST_PEER_REFERENCE", "8" if QUICK else "48"))
VENVS = Path(os.environ.get("MOEE_FAST_PEER_VENVS", Path.home() / ".cache" / "moee-fast-peers"))
PEERS = {"vllm": "vllm-cpu", "llamacpp": "llamacpp"}  # engine -> venv folder
IMPORTS = {"vllm": "import vllm", "llamacpp": "import llama_cpp"}
SECTIONS: list[list[str]] = []


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peer_python(engine: str) -> tuple[Path | None, str]:
    """(the peer venv's python, "") or (None, why it is skipped)."""
    python = VENVS / PEERS[engine] / "bin" / "python"
    if not python.exists():
        return None, f"no {PEERS[engine]} venv in the peers' folder (benchmarks/peers/create_venvs.sh {PEERS[engine]})"
    probe = subprocess.run([str(python), "-c", IMPORTS[engine]], capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        return None, f"`{IMPORTS[engine]}` fails in the {PEERS[engine]} venv: {probe.stderr.strip().splitlines()[-1:]}"
    if engine == "llamacpp" and not (VENVS / "llamacpp" / "src" / "llama.cpp" / "convert_hf_to_gguf.py").exists():
        return None, "llama.cpp's source tree (its converter) is missing beside the venv"
    return python, ""


def peer_environment() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), VLLM_ENABLE_V1_MULTIPROCESSING="0",
               VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"), TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)  # the peer imports its own packages only
    env.pop("VIRTUAL_ENV", None)
    return env


class Peer:
    """A peer engine in its own process, its model loaded once, timed one round at a time."""

    def __init__(self, engine: str, python: Path, model: str, max_len: int, workdir: Path):
        self.engine, self.workdir = engine, workdir
        self.process = subprocess.Popen(
            [str(python), str(HERE / "worker.py")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=open(workdir / f"{engine}.log", "w"), text=True, env=peer_environment(), cwd=workdir,
        )
        try:
            self.load_seconds = self._ask(dict(engine=engine, model=model, threads=THREADS, max_len=max_len))["load_seconds"]
        except BaseException:
            self.process.kill()
            raise

    def _ask(self, request: dict) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            log = (self.workdir / f"{self.engine}.log").read_text()[-3000:]
            raise RuntimeError(f"{self.engine} worker exited ({self.process.wait()}):\n{log}")
        return json.loads(line)

    def run(self, ids_path: Path, warmup: bool = False) -> tuple[dict, torch.Tensor | None]:
        out = self.workdir / f"{self.engine}_hs.npy"
        reply = self._ask(dict(ids=str(ids_path), out=str(out), warmup=warmup))
        if warmup:
            return reply, None
        import numpy as np

        return reply, torch.from_numpy(np.load(out))

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=120)


def gguf_of(checkpoint: str, workdir: Path) -> str:
    """The checkpoint converted to an F32 GGUF by llama.cpp's converter (once per checkpoint)."""
    out = Path(checkpoint) / "model-f32.gguf"
    if not out.exists():
        tree = VENVS / "llamacpp" / "src" / "llama.cpp"
        subprocess.run([sys.executable, str(HERE / "convert_gguf.py"), str(tree), checkpoint, "--outfile", str(out),
                        "--outtype", "f32"], check=True, capture_output=True, cwd=workdir)
    return str(out)


def float64_reference(checkpoint: str, ids: list[list[int]]) -> torch.Tensor:
    """HS of each text run alone through transformers' own eager forward in float64."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float64, attn_implementation="eager",
                                                 experts_implementation="eager",
                                                 use_kernels=False).eval()
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    with torch.no_grad():
        rows = [base(input_ids=torch.tensor([seq])).last_hidden_state[0, -1] for seq in ids]
    return torch.stack(rows)


def _texts(tokenizer) -> list[str]:
    path = os.environ.get("MOEE_FAST_BENCH_TEXTS")
    return load_corpus(path, limit=N_TEXTS) if path else synthetic_corpus(tokenizer, N_TEXTS, seed=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_peers(family, bench_dir, tmp_path):
    from moee_fast import MoEEncoder

    torch.set_num_threads(THREADS)
    checkpoint = build_checkpoint(family, bench_dir)
    enc = MoEEncoder.from_pretrained(checkpoint, device="cpu")
    texts = _texts(enc.tokenizer)
    ids = enc.tokenizer(texts, add_special_tokens=True)["input_ids"]  # what enc.encode runs, given to every peer
    ids_path = tmp_path / "ids.json"
    ids_path.write_text(json.dumps(ids))
    max_len = max(len(s) for s in ids) + 8

    skipped, peers = {}, {}
    for engine in PEERS:
        python, reason = peer_python(engine)
        if python is None:
            skipped[engine] = reason
            continue
        try:
            model = gguf_of(checkpoint, tmp_path) if engine == "llamacpp" else checkpoint
            peers[engine] = Peer(engine, python, model, max_len, tmp_path)
            peers[engine].run(ids_path, warmup=True)
        except Exception as error:  # noqa: BLE001  (any failure to start skips that peer, with its message)
            detail = getattr(error, "stderr", b"") or b""
            skipped[engine] = f"failed to start: {str(error)[-400:]} {detail.decode(errors='replace')[-400:]}".strip()
            if engine in peers:
                peers.pop(engine).process.kill()

    enc.encode(texts[:16])  # warm-up
    rounds: dict[str, list[dict]] = {"moee-fast": [], **{e: [] for e in peers}}
    hs: dict[str, torch.Tensor] = {}
    lengths = [len(seq) for seq in ids]
    # What each path computes: ours skips the last layer's queries and MLP but at each text's last
    # token; the peers run every layer on every token (llama.cpp's LM head not counted).
    flops = {path: embedding_flops(enc.model, lengths, every_layer_every_token=path != "moee-fast") for path in rounds}
    peaks = [fma_peak_gflops(THREADS)]
    load_before = os.getloadavg()
    try:
        for r in range(ROUNDS):
            order = ["moee-fast", *peers]
            order = order[r % len(order):] + order[: r % len(order)]  # each path first in turn
            for path in order:
                if path == "moee-fast":
                    cpu, wall = cpu_seconds(), time.perf_counter()
                    hs[path] = enc.encode(texts).hs
                    rounds[path].append(dict(seconds=time.perf_counter() - wall, cpu_seconds=cpu_seconds() - cpu))
                else:
                    reply, hs[path] = peers[path].run(ids_path)
                    rounds[path].append(reply)
    finally:
        for peer in peers.values():
            peer.close()
    load_after = os.getloadavg()
    peaks.append(fma_peak_gflops(THREADS))

    n_ref = min(N_REFERENCE, len(ids))
    reference = float64_reference(checkpoint, ids[:n_ref])
    errors = {path: max_row_relative_error(h[:n_ref].double(), reference) for path, h in hs.items()}
    SECTIONS.append(_section(family, len(texts), sum(lengths), rounds, errors, n_ref, skipped, load_before, load_after,
                             flops, peaks))
    _write_results()  # after each family: a stopped run keeps the families that ended
    for path, error in errors.items():
        assert error <= 1e-4, f"{family}: {path}'s HS differs from the float64 forward by {error:.1e}"
    if not peers:
        pytest.skip("; ".join(f"{e}: {why}" for e, why in skipped.items()))


def _section(family, n_texts, n_tokens, rounds, errors, n_ref, skipped, load_before, load_after, flops, peaks) -> list[str]:
    ours = rounds["moee-fast"]
    peak = statistics.mean(peaks) if None not in peaks else None
    cells = []
    for path, timed in rounds.items():
        ratios = [n_texts / o["seconds"] / (n_texts / t["seconds"]) for o, t in zip(ours, timed)]
        cpu_ratios = [t["cpu_seconds"] / o["cpu_seconds"] for o, t in zip(ours, timed)]
        gflops = flops[path] / statistics.median(t["seconds"] for t in timed) / 1e9
        cells.append([
            path, " / ".join(f"{n_texts / t['seconds']:.1f}" for t in timed),
            " / ".join(f"{t['cpu_seconds']:.2f}" for t in timed),
            "-" if path == "moee-fast" else " / ".join(f"{x:.2f}x" for x in ratios),
            "-" if path == "moee-fast" else f"{statistics.median(ratios):.2f}x",
            "-" if path == "moee-fast" else f"{statistics.median(cpu_ratios):.2f}x",
            f"{gflops:.0f}" + ("" if peak is None else f" ({gflops / peak:.0%})"),
            f"{errors[path]:.1e}",
        ])
    lines = [f"## {family}: {n_texts} texts, {n_tokens} tokens, {THREADS} threads each, {len(ours)} rounds alternated",
             f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}", ""]
    lines += markdown_table(["path", "texts/s per round", "CPU-seconds per round", "ours / peer texts/s per round",
                             "median ratio", "median CPU-seconds ratio (peer / ours)",
                             "GFLOP/s computed, median round (% of FMA peak)",
                             f"max HS rel. error vs float64 ({n_ref} texts)"], cells)
    if peak is not None:
        # Our texts/s if the whole encode ran at the FMA peak, against each peer's median round.
        ceiling = peak * 1e9 / flops["moee-fast"] * n_texts
        bounds = ", ".join(f"{ceiling / statistics.median(n_texts / t['seconds'] for t in timed):.2f}x {path}'s"
                           for path, timed in rounds.items() if path != "moee-fast")
        lines += ["", f"FMA peak of {THREADS} cores: {' / '.join(f'{p:.0f}' for p in peaks)} GFLOP/s (before / after "
                  f"the rounds). Our encode computes {flops['moee-fast'] / 1e9:.0f} GFLOP per round; at that peak it "
                  f"would run {ceiling:.1f} texts/s" + (f", at most {bounds} texts/s." if bounds else ".")]
    lines += [f"- {engine} skipped: {why}" for engine, why in skipped.items()]
    return lines + [""]


def _write_results() -> Path:
    stamp = datetime.date.today().isoformat()
    header = [f"# CPU encode against peer engines, {stamp}", "", *quick_note(QUICK),
              f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}. Paths: moee-fast "
              "(this checkout); vllm = vLLM's CPU build, pooling runner, LAST pooling unnormalised, fp32, prefix "
              "caching off; llamacpp = llama-cpp-python, F32 GGUF from llama.cpp's converter, LAST pooling, F32 KV "
              "cache. Same token ids everywhere; one process runs at a time. Ratios: our texts/s over the peer's in "
              "the same round.", ""]
    folder = results_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{results_stem('cpu_peers', QUICK)}.md"
    path.write_text("\n".join(header + [line for section in SECTIONS for line in section]) + "\n")
    return path
