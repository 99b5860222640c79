"""One peer engine, run by that peer's own Python (its venv; see create_venvs.sh) and driven by
bench_peers.py over stdin/stdout, one JSON object a line:

    -> {"engine": "vllm" | "llamacpp", "model": path, "threads": 2}      (first line: load)
    <- {"ready": true, "load_seconds": ...}
    -> {"ids": "path.json", "out": "path.npy"}                          (one timed round)
    <- {"seconds": ..., "cpu_seconds": ...}                              (HS [B, H] fp32 in out)

Each round embeds the given token ids (no tokenizer: both sides run identical ids) and returns
each text's final hidden state after the last norm at its last token, unnormalised. Only the
standard library, numpy and the engine are imported here.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

import numpy as np


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime + usage.ru_stime


def load_vllm(model: str, threads: int, max_len: int):
    from vllm import LLM

    try:
        from vllm.config import PoolerConfig
    except ImportError:
        from vllm.config.pooler import PoolerConfig
    # Last token, no normalisation: the final norm's output at each text's last token (HS).
    try:
        pooler = PoolerConfig(pooling_type="LAST", use_activation=False)
    except (TypeError, ValueError):  # releases that named it `normalize`
        pooler = PoolerConfig(pooling_type="LAST", normalize=False)
    kwargs = dict(model=model, runner="pooling", convert="embed", dtype="float32", enable_prefix_caching=False,
                  max_model_len=max_len, skip_tokenizer_init=False, enforce_eager=False, seed=0)
    try:
        llm = LLM(pooler_config=pooler, **kwargs)
    except TypeError:  # releases before the pooler_config argument
        llm = LLM(override_pooler_config=pooler, **kwargs)

    def embed(ids):
        from vllm.inputs import TokensPrompt

        outputs = llm.embed([TokensPrompt(prompt_token_ids=list(t)) for t in ids], use_tqdm=False)
        return np.stack([np.asarray(o.outputs.embedding, dtype=np.float32) for o in outputs])

    return embed


def load_llamacpp(model: str, threads: int, max_len: int):
    import llama_cpp

    # Texts packed into batches of up to `batch` tokens (and the context's most sequences), as
    # Llama.embed packs them, but fed token ids: Llama.embed takes text only. An F32 KV cache keeps
    # the attention in fp32 like the other paths (the default F16 cache rounds keys and values).
    batch = max(max_len, 4096)
    llm = llama_cpp.Llama(
        model_path=model, embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_LAST, n_ctx=batch,
        n_batch=batch, n_ubatch=batch, n_threads=threads, n_threads_batch=threads, type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32, verbose=False,
    )
    n_embd, n_seq_max = llm.n_embd(), llm.context_params.n_seq_max

    def run(group, rows):
        llm._ctx.kv_cache_clear()
        for seq, tokens in enumerate(group):
            llm._batch.add_sequence(list(tokens), seq, True)  # every token an output, as Llama.embed marks them
        llm._ctx.decode(llm._batch)
        llm._batch.reset()
        rows += [llama_cpp.llama_get_embeddings_seq(llm._ctx.ctx, seq)[:n_embd] for seq in range(len(group))]

    def embed(ids):
        rows, group, tokens = [], [], 0
        for seq in ids:
            if group and (tokens + len(seq) > batch or len(group) >= n_seq_max):
                run(group, rows)
                group, tokens = [], 0
            group.append(seq)
            tokens += len(seq)
        if group:
            run(group, rows)
        llm._ctx.kv_cache_clear()
        return np.asarray(rows, dtype=np.float32)

    return embed


def main() -> None:
    # The engines log to stdout: keep the protocol on a private copy of it, and send fd 1 to stderr.
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    setup = json.loads(sys.stdin.readline())
    threads = int(setup["threads"])
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    start = time.perf_counter()
    load = {"vllm": load_vllm, "llamacpp": load_llamacpp}[setup["engine"]]
    embed = load(setup["model"], threads, int(setup["max_len"]))
    print(json.dumps({"ready": True, "load_seconds": time.perf_counter() - start}), file=channel, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        with open(request["ids"]) as f:
            ids = json.load(f)
        if request.get("warmup"):
            embed(ids)
            print(json.dumps({"warm": True}), file=channel, flush=True)
            continue
        cpu, wall = cpu_seconds(), time.perf_counter()
        hs = embed(ids)
        wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
        np.save(request["out"], hs)
        print(json.dumps({"seconds": wall, "cpu_seconds": cpu}), file=channel, flush=True)


if __name__ == "__main__":
    main()
