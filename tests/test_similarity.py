import numpy as np
import pytest
import torch

from moee_fast import MoEEmbeddings, search, similarity, similarity_pairwise, tune_alpha
from moee_fast.embeddings import VARIANTS
from moee_fast.similarity import spearman


def random_embeddings(n, hidden=16, layers=3, experts=6, seed=0) -> MoEEmbeddings:
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, hidden, generator=g) + 0.5
    rw = torch.softmax(2 * torch.randn(n, layers, experts, generator=g), dim=-1)
    return MoEEmbeddings(hs, rw)


def cos64(x, y):
    x, y = x.double().flatten(1), y.double().flatten(1)
    return (x / x.norm(dim=1, keepdim=True)) @ (y / y.norm(dim=1, keepdim=True)).T


def expected_scores(a, b, variant, alpha):
    """float64 reference for every variant, straight from the definitions."""
    if variant == "sum":
        return cos64(a.hs, b.hs) + alpha * cos64(a.rw, b.rw)
    if variant == "hs":
        return cos64(a.hs, b.hs)
    if variant == "rw":
        return cos64(a.rw, b.rw)
    return cos64(torch.cat([a.hs, a.rw.flatten(1)], 1), torch.cat([b.hs, b.rw.flatten(1)], 1))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("alpha", [0.0, 1.0, 2.5])
def test_similarity_matches_float64_definitions(variant, alpha):
    a, b = random_embeddings(9, seed=1), random_embeddings(5, seed=2)
    expected = expected_scores(a, b, variant, alpha)
    scores = similarity(a, b, variant=variant, alpha=alpha)
    assert scores.dtype == torch.float32 and scores.shape == (9, 5)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-5)

    pairs = similarity_pairwise(a[:5], b, variant=variant, alpha=alpha)
    assert pairs.shape == (5,)
    torch.testing.assert_close(pairs.double(), expected[:5].diagonal(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_search_returns_the_best_scores_in_order(variant):
    queries, corpus = random_embeddings(4, seed=3), random_embeddings(30, seed=4)
    values, indices = search(queries, corpus, k=5, variant=variant, alpha=0.7)
    expected = expected_scores(queries, corpus, variant, 0.7)
    best = expected.topk(5, dim=1)
    torch.testing.assert_close(values.double(), best.values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(expected.gather(1, indices), best.values, rtol=1e-5, atol=1e-5)
    values, indices = search(queries, corpus[:3], k=10, variant=variant)  # k beyond the corpus
    assert values.shape == indices.shape == (4, 3)
    with pytest.raises(ValueError, match="k"):
        search(queries, corpus, k=0)


def test_different_models_are_refused_naming_both_shapes():
    a = random_embeddings(3)
    for other in (random_embeddings(3, hidden=8), random_embeddings(3, layers=4), random_embeddings(3, experts=5)):
        for fn in (similarity, similarity_pairwise):
            with pytest.raises(ValueError, match=rf"{a.shape_key}.*{other.shape_key}".replace("(", r"\(").replace(")", r"\)")):
                fn(a, other)
        with pytest.raises(ValueError, match="different models"):
            search(a, other, k=1)


def test_bad_variant_alpha_and_lengths():
    a, b = random_embeddings(3), random_embeddings(4)
    with pytest.raises(ValueError, match="hs, rw, concat, sum"):
        similarity(a, b, variant="max")
    with pytest.raises(ValueError, match="alpha"):
        similarity(a, b, alpha=-1)
    with pytest.raises(ValueError, match="3 and 4"):
        similarity_pairwise(a, b)
    with pytest.raises(TypeError):
        similarity(a.hs, b)


def test_tune_alpha_finds_the_weight_that_made_the_gold_scores():
    a, b = random_embeddings(40, seed=5), random_embeddings(40, seed=6)
    cos_hs = cos64(a.hs, b.hs).diagonal().numpy()
    cos_rw = cos64(a.rw, b.rw).diagonal().numpy()
    gold = cos_hs + 2.0 * cos_rw
    table = tune_alpha(a, b, gold, alphas=[0.0, 0.5, 2.0, 8.0])
    assert table.best_alpha == 2.0 and table.best_score == pytest.approx(1.0)
    assert table.scores[0] < 1 and "<- best" in str(table)
    assert table.scores[0] == pytest.approx(spearman(cos_hs, gold))

    mse = lambda scores, gold: -float(np.mean((scores - gold) ** 2))  # noqa: E731
    assert tune_alpha(a, b, gold, alphas=[1.0, 2.0], metric=mse).best_alpha == 2.0
    with pytest.raises(ValueError, match="spearman, pearson"):
        tune_alpha(a, b, gold, metric="ndcg")
    with pytest.raises(ValueError, match="alpha"):
        tune_alpha(a, b, gold, alphas=[-1.0])


def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 5, 50).astype(float), rng.normal(size=50)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic)
