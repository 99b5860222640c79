"""A built-in tiny MoE checkpoint for trying moee-fast offline.

UNTRAINED: random weights (seeded, so deterministic) in the real OLMoE layout, with a small
byte-level BPE tokenizer trained on the sample texts below. Its embeddings exercise the whole
pipeline and carry no meaning. It is written to the user's cache on first use.
"""

from __future__ import annotations

import os
import shutil
import tempfile

DEMO_NAME = "demo-olmoe-untrained-v1"
DEMO_LABEL = "built-in demo MoE (untrained, random weights)"

SAMPLE_TEXTS = [
    "A man is playing a guitar on the street.",
    "Someone plays an instrument outdoors.",
    "The stock market fell sharply after the announcement.",
    "Investors sold shares when the news broke.",
    "A cat sleeps in a patch of afternoon sun.",
    "Mixture-of-Experts models route each token to a few experts.",
    "Routing weights carry high-level semantics; hidden states carry the rest.",
    "How do I reset my password?",
    "¿Dónde está la estación de tren? 🚉",
    "東京は日本の首都です。",
]


def cache_dir() -> str:
    root = os.environ.get("MOEE_FAST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "moee_fast"
    )
    return root


def build_tokenizer(corpus: list[str], vocab_size: int = 512, bos: bool = True):
    """A byte-level BPE tokenizer (any unicode text, emoji included, encodes) trained on `corpus`;
    with `bos`, every encoding starts with `<s>` as Llama/Mixtral tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<s>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>", pad_token="<pad>"
    )


def build_demo_checkpoint(path: str) -> str:
    """Write the demo checkpoint (config, safetensors weights, tokenizer) to `path`."""
    import torch
    from transformers import OlmoeConfig, OlmoeForCausalLM

    tokenizer = build_tokenizer(SAMPLE_TEXTS * 4, vocab_size=400)
    config = OlmoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=16,
        num_experts_per_tok=4,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    from .checkpoint import quiet_transformers

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = OlmoeForCausalLM(config)
    with quiet_transformers():
        model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    with open(os.path.join(path, "README.md"), "w") as f:
        f.write(f"# {DEMO_LABEL}\n\n{__doc__}")
    return path


def is_demo_checkpoint(path: str) -> bool:
    """Whether `path` is a demo checkpoint (its README, written by build_demo_checkpoint, says so)."""
    try:
        with open(os.path.join(os.fspath(path), "README.md"), encoding="utf-8") as f:
            return f.readline().strip() == f"# {DEMO_LABEL}"
    except OSError:
        return False


def demo_checkpoint() -> str:
    """Path of the demo checkpoint in the user's cache, built there on first use."""
    target = os.path.join(cache_dir(), DEMO_NAME)
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    os.makedirs(cache_dir(), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=DEMO_NAME + ".", dir=cache_dir())
    try:
        build_demo_checkpoint(staging)
        try:
            os.replace(staging, target)  # atomic: a concurrent first use sees all or nothing
        except OSError:
            if not os.path.isfile(os.path.join(target, "config.json")):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
