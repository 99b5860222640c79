"""Benchmark corpora: a seeded synthetic mix with the length profile of evaluation suites (three
short texts of 8-40 tokens for every passage of 100-400 tokens), or any real text file."""

from __future__ import annotations

import json
import random

_WORDS = (
    "model expert router token layer hidden state embedding sentence passage query document "
    "retrieval semantic cluster topic weather market river mountain city music science history "
    "because although however therefore which where when while under over between through the "
    "a an of to in on for with by from and or not is are was were be been has have had it this "
    "that these those they we you he she her his their our its new old large small quick slow"
).split()


def synthetic_corpus(tokenizer, n_texts: int, seed: int = 0) -> list[str]:
    """`n_texts` texts, every fourth a passage (100-400 tokens), the rest short (8-40 tokens),
    shuffled; lengths are counted with `tokenizer` (special tokens included)."""
    rng = random.Random(seed)
    targets = [rng.randint(100, 400) if i % 4 == 3 else rng.randint(8, 40) for i in range(n_texts)]
    rng.shuffle(targets)
    sample = " ".join(rng.choice(_WORDS) for _ in range(2000))
    tokens_per_word = len(tokenizer(sample)["input_ids"]) / 2000
    texts = []
    for target in targets:
        words = max(1, round(target / tokens_per_word))
        texts.append(" ".join(rng.choice(_WORDS) for _ in range(words)))
    return texts


def load_corpus(path: str, limit: int | None = None) -> list[str]:
    """Texts from a .txt file (one per line) or a .jsonl file (a "text" field per line)."""
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            texts.append(json.loads(line)["text"] if path.endswith(".jsonl") else line.rstrip("\n"))
            if limit is not None and len(texts) >= limit:
                break
    return texts
