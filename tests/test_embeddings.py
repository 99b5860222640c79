import json
import math

import numpy as np
import pytest
import torch

from moee_fast import MoEEmbeddings, Standardizer, similarity
from moee_fast.embeddings import VARIANTS


def random_embeddings(n=7, hidden=12, layers=3, experts=5, seed=0) -> MoEEmbeddings:
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, hidden, generator=g) * 3 + 1
    rw = torch.softmax(torch.randn(n, layers, experts, generator=g), dim=-1)
    return MoEEmbeddings(hs, rw, {"model": "m"})


def unit64(x):
    x = x.double()
    return x / x.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0, 4.0])
def test_variants_match_float64_formulas(alpha):
    e = random_embeddings()
    hs, rw = e.hs.double(), e.rw.double().reshape(len(e), -1)
    expected = {
        "hs": hs,
        "rw": rw,
        "concat": torch.cat([hs, rw], dim=1),
        "sum": torch.cat([unit64(hs), math.sqrt(alpha) * unit64(rw)], dim=1),
    }
    for variant in VARIANTS:
        vectors = e.vectors(variant, alpha=alpha)
        assert vectors.dtype == torch.float32 and vectors.shape == expected[variant].shape
        torch.testing.assert_close(vectors.double(), expected[variant], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 2.5])
def test_sum_vectors_cosine_is_the_sum_score_over_one_plus_alpha(alpha):
    a, b = random_embeddings(seed=1), random_embeddings(n=4, seed=2)
    va, vb = a.vectors("sum", alpha), b.vectors("sum", alpha)
    cosine = unit64(va) @ unit64(vb).T
    cos_hs = unit64(a.hs) @ unit64(b.hs).T
    cos_rw = unit64(a.rw.flatten(1)) @ unit64(b.rw.flatten(1)).T
    torch.testing.assert_close((1 + alpha) * cosine, cos_hs + alpha * cos_rw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((1 + alpha) * cosine, similarity(a, b, "sum", alpha).double(), rtol=1e-5, atol=1e-5)
    # The dot product of "sum" vectors is the score itself.
    torch.testing.assert_close((va @ vb.T).double(), cos_hs + alpha * cos_rw, rtol=1e-5, atol=1e-5)


def test_bad_variant_and_alpha():
    e = random_embeddings()
    with pytest.raises(ValueError, match="hs, rw, concat, sum"):
        e.vectors("mean")
    for alpha in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="alpha"):
            e.vectors("sum", alpha=alpha)


def test_fitted_standardizer_z_scores_and_round_trips(tmp_path):
    corpus, other = random_embeddings(n=20, seed=3), random_embeddings(n=5, seed=4)
    stats = corpus.fit_standardizer()
    z = corpus.standardized(stats)
    assert z is not corpus and torch.equal(corpus.hs, random_embeddings(n=20, seed=3).hs)  # input untouched
    torch.testing.assert_close(z.hs.mean(0), torch.zeros(12), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.rw.std(0), torch.ones(3, 5), atol=1e-4, rtol=0)
    expected = (other.rw.double() - corpus.rw.double().mean(0)) / (corpus.rw.double().std(0) + 1e-8)
    torch.testing.assert_close(other.standardized(stats).rw.double(), expected, rtol=1e-5, atol=1e-5)
    assert z.metadata["standardized"] == "fitted" and z.metadata["model"] == "m"

    restored = Standardizer.from_dict(json.loads(json.dumps(stats.to_dict())))
    torch.testing.assert_close(other.standardized(restored).hs, other.standardized(stats).hs)
    stats.save(tmp_path / "stats.json")
    torch.testing.assert_close(Standardizer.load(tmp_path / "stats.json").rw_std, stats.rw_std)

    with pytest.raises(ValueError, match=r"\(12, 4, 5\).*standardizer has \(12, 3, 5\)"):
        random_embeddings(layers=4).standardized(stats)
    with pytest.raises(ValueError, match="at least 2"):
        corpus[0].fit_standardizer()


def test_per_batch_standardization_is_the_authors_batchwise_z_score():
    e = random_embeddings(n=10, seed=5)
    z = e.standardized_per_batch(batch_size=4)  # batches of 4, 4 and 2 rows
    for rows in (slice(0, 4), slice(4, 8), slice(8, 10)):
        hs = e.hs[rows].double()
        torch.testing.assert_close(z.hs[rows].double(), (hs - hs.mean(0)) / (hs.std(0) + 1e-8), rtol=1e-5, atol=1e-5)
        rw = e.rw[rows].double()
        torch.testing.assert_close(z.rw[rows].double(), (rw - rw.mean(0)) / (rw.std(0) + 1e-8), rtol=1e-5, atol=1e-4)
    # A lone last row has no spread: their code turns its NaNs into zeros.
    lone = e.standardized_per_batch(batch_size=9)
    assert torch.equal(lone.hs[9], torch.zeros(12)) and torch.isfinite(lone.rw).all()
    assert z.metadata["standardized"] == "per_batch:4"
    with pytest.raises(ValueError):
        e.standardized_per_batch(0)


def test_existing_api_still_holds(tmp_path):
    e = random_embeddings()
    e.save(tmp_path / "e.safetensors")
    loaded = MoEEmbeddings.load(tmp_path / "e.safetensors")
    assert torch.equal(loaded.hs, e.hs) and torch.equal(loaded.rw, e.rw) and loaded.metadata == e.metadata
    both = MoEEmbeddings.cat([e, e[2]])
    assert len(both) == 8 and torch.equal(both.vectors("concat")[7], e.vectors("concat")[2])
    assert e.shape_key == (12, 3, 5) and MoEEmbeddings.empty(12, 3, 5).vectors("sum").shape == (0, 27)


def test_indexing_one_row_slices_and_index_tensors():
    e = random_embeddings(n=3)
    for index, row in ((0, 0), (2, 2), (-1, 2), (-3, 0), (np.int64(1), 1), (torch.tensor(1), 1)):
        one = e[index]
        assert len(one) == 1 and one.metadata == e.metadata
        assert torch.equal(one.hs, e.hs[row : row + 1]) and torch.equal(one.rw, e.rw[row : row + 1])
    assert torch.equal(e[1:].hs, e.hs[1:]) and len(e[5:]) == 0  # slices clip, as Python's do
    assert torch.equal(e[torch.tensor([2, 0])].rw, e.rw[[2, 0]])
    assert torch.equal(e[torch.tensor([True, False, True])].hs, e.hs[[0, 2]])


@pytest.mark.parametrize("index", [3, 5, -4, np.int64(3)])
def test_indexing_past_the_end_raises_index_error(index):
    with pytest.raises(IndexError, match=f"index {int(index)} is out of range for 3 embeddings"):
        random_embeddings(n=3)[index]
