"""Shared fixtures: tiny random checkpoints built from the real configs of each family, saved
with save_pretrained (per-expert weight layout, as the published checkpoints have) and
reloaded through moee-fast's public API."""

import os

# Triton kernels run in its CPU interpreter here; this must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402
import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from moee_fast.demo import build_tokenizer  # noqa: E402

WORDS = (
    "the a model routes every token to experts while hidden states carry meaning and routing "
    "weights carry topics naïve café résumé Zürich 東京 日本語 🙂 🚀 👩‍🔬 — «quoted» don't 3.14 "
    "semantics embedding sentence passage query document retrieval cluster"
).split()

TINY = dict(vocab_size=None, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)


def family_config(family: str, vocab_size: int):
    """A tiny config of `family` with the real model's structure (shared experts, dense layers)."""
    from transformers import (
        DeepseekV2Config,
        MixtralConfig,
        OlmoeConfig,
        Qwen2MoeConfig,
        Qwen3MoeConfig,
    )

    base = dict(TINY, vocab_size=vocab_size)
    if family == "mixtral":
        return MixtralConfig(**base, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2)
    if family == "olmoe":
        return OlmoeConfig(**dict(base, num_key_value_heads=4), intermediate_size=32, num_experts=8, num_experts_per_tok=2)
    if family == "qwen2_moe":
        # Qwen1.5-MoE: a shared expert with a sigmoid gate, attention q/k/v biases; layer 1 dense.
        return Qwen2MoeConfig(
            **base, intermediate_size=80, moe_intermediate_size=24, shared_expert_intermediate_size=48,
            num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=False,
        )
    if family == "qwen3_moe":
        return Qwen3MoeConfig(**base, head_dim=16, intermediate_size=80, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2)
    if family == "deepseek_v2":
        return DeepseekV2Config(
            **dict(base, num_key_value_heads=4), intermediate_size=80, moe_intermediate_size=24, n_routed_experts=8, n_shared_experts=1,
            num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
            qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1,
        )
    raise ValueError(family)


def random_texts(n: int, seed: int, max_words: int = 120) -> list[str]:
    """Mixed-length texts (one word to long passages), unicode and emoji included."""
    rng = random.Random(seed)
    lengths = [1, 2, max_words] + [rng.choice([rng.randint(1, 12), rng.randint(20, max_words)]) for _ in range(n - 3)]
    return [" ".join(rng.choice(WORDS) for _ in range(k)) for k in lengths]


@pytest.fixture(scope="session")
def tokenizer_corpus():
    return random_texts(200, seed=1234)


def save_checkpoint(path, family: str, corpus, bos: bool = True, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer(corpus, vocab_size=600, bos=bos)
    config = family_config(family, len(tokenizer))
    config.pad_token_id, config.bos_token_id, config.eos_token_id = (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, tokenizer_corpus):
    """checkpoint(family, bos=True, **config_overrides) -> path of a saved tiny checkpoint, built
    once per session."""
    built = {}

    def make(family: str, bos: bool = True, **overrides):
        key = (family, bos, tuple(sorted(overrides.items())))
        if key not in built:
            path = tmp_path_factory.mktemp(f"{family}-{'bos' if bos else 'nobos'}")
            built[key] = save_checkpoint(path, family, tokenizer_corpus, bos=bos, **overrides)
        return built[key]

    return make


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Per-row ‖actual − expected‖ / ‖expected‖ (NaN anywhere gives NaN, which fails any bound)."""
    actual, expected = actual.double().flatten(1), expected.double().flatten(1)
    return (actual - expected).norm(dim=1) / expected.norm(dim=1)


def reference_embeddings(path: str, texts: list[str], prompt: str | None = None):
    """HS and RW from transformers' causal-LM eager forward, each text alone: the last position
    of the final hidden state and fp32 softmax of every recorded router logit row."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    hs, rw = [], []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text if prompt is None else prompt.replace("{text}", text), return_tensors="pt")["input_ids"]
            out = model(ids, output_hidden_states=True, output_router_logits=True)
            hs.append(out.hidden_states[-1][0, -1])
            rw.append(torch.stack([torch.softmax(logits[-1].float(), dim=-1) for logits in out.router_logits]))
    return torch.stack(hs), torch.stack(rw)


def write_corpus_files(directory, texts):
    """The texts spread over a .txt, a .jsonl and a .parquet file in `directory` (the corpus
    readers' three formats); returns their paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    third = len(texts) // 3
    (directory / "a.txt").write_text("\n".join(texts[:third]) + "\n", encoding="utf-8")
    (directory / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[third : 2 * third]))
    pq.write_table(pa.table({"text": texts[2 * third :]}), directory / "c.parquet")
    return [str(directory / name) for name in ("a.txt", "b.jsonl", "c.parquet")]


# ---------------------------------------------------------------------------------------------
# Quantized weights (test_quant*.py): bitsandbytes' own parameters, decoded here in float64 from
# their bytes, reading neither bitsandbytes' nor moee-fast's decoder.

# The NF4 code of the QLoRA paper (Dettmers et al. 2023, appendix E).
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)


def bitsandbytes_parameter(weight: torch.Tensor, method: str, double_quant: bool = True):
    """What a Linear4bit ("nf4", "fp4") or Linear8bitLt ("int8") built from `weight` holds."""
    import bitsandbytes as bnb

    if method == "int8":
        return bnb.nn.Int8Params(weight.detach().clone().float(), requires_grad=False, has_fp16_weights=False).to("cpu")
    return bnb.nn.Params4bit(weight.detach().clone().float(), requires_grad=False, quant_type=method,
                             compress_statistics=double_quant).to("cpu")


def assert_slot_is_bitsandbytes_own(matrices, index: int, weight: torch.Tensor) -> None:
    """The packed bytes and statistics of slot `index` of a QuantizedMatrices equal those of
    bitsandbytes' own parameter made from `weight`, bit for bit."""
    param = bitsandbytes_parameter(weight, matrices.method, matrices.double_quant)
    if matrices.method == "int8":
        assert torch.equal(matrices.data[index], param.data) and torch.equal(matrices.scale[index], param.SCB)
        return
    state = param.quant_state
    assert torch.equal(matrices.data[index], param.data.view(-1)) and torch.equal(matrices.code, state.code)
    assert torch.equal(matrices.absmax[index], state.absmax)
    if matrices.double_quant:
        assert torch.equal(matrices.offset[index], state.offset) and torch.equal(matrices.nested_absmax[index], state.state2.absmax)
        assert torch.equal(matrices.nested_code, state.state2.code)


def decode_reference(data: torch.Tensor, state) -> torch.Tensor:
    """Quantized bytes decoded in float64: int8 rows times their scale (`state`, one per row) /
    127; NF4 codes (two per byte, high nibble first) looked up in NF4_CODE, times their block's
    absmax (a bitsandbytes QuantState `state`; under double quantization the absmax is decoded
    from its 8-bit code, its 256-block scale and the offset)."""
    if isinstance(state, torch.Tensor):
        return data.double() * state.double()[:, None] / 127
    assert state.quant_type == "nf4"
    size = state.shape.numel()
    packed = data.reshape(-1).long()
    codes = torch.stack([packed >> 4, packed & 15], dim=-1).reshape(-1)[:size]
    absmax = state.absmax.double()
    if state.state2 is not None:
        scale = state.state2.absmax.double().repeat_interleave(state.state2.blocksize)[: absmax.numel()]
        absmax = state.state2.code.double()[state.absmax.long()] * scale + state.offset.double()
    values = torch.tensor(NF4_CODE, dtype=torch.float64)[codes] * absmax.repeat_interleave(state.blocksize)[:size]
    return values.reshape(state.shape)


def bitsandbytes_roundtrip(weight: torch.Tensor, method: str) -> torch.Tensor:
    """`weight` as bitsandbytes quantizes it ("nf4": NF4 with double quantization; "int8"),
    decoded by decode_reference."""
    param = bitsandbytes_parameter(weight, method)
    return decode_reference(param.data, param.SCB if method == "int8" else param.quant_state)


def expected_quantized_bytes(experts: int, hidden: int, inter: int, method: str) -> int:
    """Bytes of a layer's quantized gate, up and down matrices: int8 a byte per weight and a float
    scale per row; NF4 half a byte per weight, a byte per 64-block, a float per 256 blocks and an
    offset per matrix, and the two code tables per kind."""
    weights = 3 * experts * hidden * inter
    if method == "int8":
        return weights + 4 * experts * (2 * inter + hidden)
    blocks = -(-hidden * inter // 64)
    return -(-hidden * inter // 2) * 3 * experts + 3 * experts * (blocks + 4 * -(-blocks // 256) + 4) + 3 * 4 * (16 + 256)


# ---------------------------------------------------------------------------------------------
# The suite writes only under temporary directories or ignored paths: a run that changes the work
# tree (a tracked file rewritten, an untracked file left) fails, naming what changed.
def _work_tree_state():
    import subprocess

    root = os.path.dirname(os.path.abspath(__file__))
    try:
        proc = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=root,
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:  # not a git checkout (an unpacked sdist): nothing to compare
        return None
    lines = set(proc.stdout.splitlines())
    digests = {}
    for line in lines:  # a file already modified before the run may be modified again by it
        path = os.path.join(root, os.pardir, line[3:].split(" -> ")[-1])
        if os.path.isfile(path):
            with open(path, "rb") as handle:
                digests[line] = hash(handle.read())
    return lines, digests


_TREE_BEFORE = {}


def pytest_sessionstart(session):
    _TREE_BEFORE["state"] = _work_tree_state()


def pytest_sessionfinish(session, exitstatus):
    before = _TREE_BEFORE.get("state")
    after = _work_tree_state() if before is not None else None
    if before is None or after is None or after == before:
        return
    changed = sorted((after[0] ^ before[0]) | {line for line in after[1] if after[1][line] != before[1].get(line)})
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    message = "the test suite changed the work tree (tests must write under tmp_path):\n  " + "\n  ".join(changed)
    if reporter is not None:
        reporter.write_line(message, red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
