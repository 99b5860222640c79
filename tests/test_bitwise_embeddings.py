"""Embeddings bitwise as recorded: a fixed corpus through every family's seeded tiny checkpoint
gives exactly the bytes it gave when the digests below were taken. Reorganizing the code must not
change a single bit; a change that does so on purpose updates the digests and says why."""

import hashlib

import pytest
import torch

from conftest import random_texts
from deepseek_reference import write_checkpoint
from moee_fast import MoEEncoder

FAMILIES = ["olmoe", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek"]

# SHA-256 of (hs bytes, rw bytes) of the fixed corpus, float32 little-endian, on CPU.
EXPECTED = {
    "olmoe": (
        "da7cf84f9f333916dadec2dfa921fb8a0fa74e17a1ae915fe1efce44040088af",
        "d818bb700c96cc6b134dc80db32c9a9831e395e88b5816f6ab72ae78a311b56b",
    ),
    "mixtral": (
        "9eb39b70b2ad006d36f81a6da958e2ddc4ea78c31e353fe70b646c13b69580bd",
        "c1bd4a6e97b61d269a970f755a8d31a43bc11530d198333587fbe27819a625ea",
    ),
    "qwen2_moe": (
        "edc0fa98fecefbe5e6a3c87b72fca0dda2cdf7291cf19d2c6dd011befe33c045",
        "d43b410be188777e89ad12e1f8ed6baef1a1b18a78beb62d83ff6b9407cd273f",
    ),
    "qwen3_moe": (
        "6eb62dd21a792fa3d2ee528b4591cbe84e8ef287f920cdf20b120d97ea437151",
        "61e64d9a697d1f62c90a1be1fd2371d32b9a5a732c19244692916103bafaef83",
    ),
    "deepseek_v2": (
        "9fcbf2d6e8437acf395d247c6669c7128eedb364a8e5590e52b15d9443ec8bf0",
        "859ba143a775096ea50e9c07e8c8c852edbf66d018c094fb146894dc14f93e73",
    ),
    "deepseek": (
        "df81f9adcc772d2ffb73c8faeee326f3719a8129efb7314041f1f7b4e2b828b6",
        "2b556ab73b0a81850488f51ed632d389f20b16e9601b1f56f9ed1bf817748720",
    ),
}


def fixed_corpus() -> list[str]:
    return random_texts(9, seed=2718, max_words=60)


def embedding_digests(path: str) -> tuple[str, str]:
    enc = MoEEncoder.from_pretrained(path, device="cpu")
    out = enc.encode(fixed_corpus(), batch_size=4, prompt='This sentence : "{text}" means in one word:"')
    assert out.hs.dtype == out.rw.dtype == torch.float32
    assert torch.isfinite(out.hs).all() and torch.isfinite(out.rw).all()
    return tuple(hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest() for x in (out.hs, out.rw))


def checkpoint_of(family: str, checkpoint, tmp_path_factory, tokenizer_corpus) -> str:
    if family == "deepseek":  # the native DeepSeekMoE loader
        return write_checkpoint(tmp_path_factory.mktemp("deepseek-bitwise"), tokenizer_corpus, seed=0)
    return checkpoint(family)


@pytest.mark.parametrize("family", FAMILIES)
def test_embeddings_are_bitwise_as_recorded(family, checkpoint, tmp_path_factory, tokenizer_corpus):
    digests = embedding_digests(checkpoint_of(family, checkpoint, tmp_path_factory, tokenizer_corpus))
    assert digests == EXPECTED[family], f"{family}: embeddings changed ({digests})"
