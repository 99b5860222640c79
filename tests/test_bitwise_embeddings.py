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

# SHA-256 of (hs bytes, rw bytes) of the fixed corpus, float32 little-endian, on CPU. Retaken when
# the routers' GEMM moved from BLAS to the C++ linear op, whose rows depend on nothing but their
# own token (moee_fast/fastpath/linears.py): a deliberate change of the last bits.
EXPECTED = {
    "olmoe": (
        "13133f94f23545df0c2dceb52cc6087214928741d2d6544d0f4b6726e973557a",
        "41858b19583af86de51076640695ee9d4e6a065f85ca8d10da365fcc1b32b67d",
    ),
    "mixtral": (
        "5fc3ae8911579a6bcfadacbadef51b9ce9f34d7ec93dbb87fbc3aca0b77fbd91",
        "4f8f27dba74e2d688bd442c3fbc67cfe66219e5136ebd1d091a4d0fd921f1ce4",
    ),
    "qwen2_moe": (
        "b0ff89d9816404db420404a22f29fa51be4f69a788139e56d0fc4283995b2e41",
        "d026e5c543313d90f0191663d1dc92e3cb3f3428fb11625e32589e24c2bfcc6e",
    ),
    "qwen3_moe": (
        "3e7bb00742119d25ea7e3e8293c55bba3b23adc1e2f2d3a2ec6d1440f5725ed9",
        "08cb995363cc413e4a55dce24204070a1c3f93a404543941d5c85c04d91061f2",
    ),
    "deepseek_v2": (
        "10537ec1616e80b86d79336685301094ca385cedb0342a5694b3de15ac6bf65f",
        "ca4d50e7df55e1cd1254bbeeb34ecc8124f2929fd9426994c519d1b1bae5c7c1",
    ),
    "deepseek": (
        "84aa69c9ba6e7b29c6cca9f54bdb62ac240a89b7d226d2afe42d67df791e39a9",
        "15684c5be4233596874f0b3b4bcc539d16c95a8aa508f948516ff077415edbe6",
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
