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


@pytest.mark.parametrize("k", [np.int64(2), np.int32(2), torch.tensor(2), 2])
def test_search_takes_any_integer_k(k):
    queries, corpus = random_embeddings(3, seed=7), random_embeddings(8, seed=8)
    values, indices = search(queries, corpus, k=k)
    assert values.shape == indices.shape == (3, 2)
    torch.testing.assert_close(values.double(), expected_scores(queries, corpus, "sum", 1.0).topk(2, dim=1).values,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [True, 2.0, np.float64(2), "2", torch.tensor(2.0), -1])
def test_search_refuses_k_that_is_not_a_positive_integer(k):
    queries, corpus = random_embeddings(3), random_embeddings(8)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        search(queries, corpus, k=k)


@pytest.mark.parametrize("variant", VARIANTS)
def test_search_ranks_a_nan_row_last_and_never_returns_index_minus_one(variant):
    queries, corpus = random_embeddings(3, seed=9), random_embeddings(5, seed=10)
    corpus.hs[1, 0] = float("nan")
    corpus.rw[1, 0, 0] = float("nan")
    queries.hs[2, 3] = float("nan")
    queries.rw[2, 1, 1] = float("nan")
    values, indices = search(queries, corpus, k=5, variant=variant)
    assert ((indices >= 0) & (indices < 5)).all() and all(len(set(row.tolist())) == 5 for row in indices)
    assert values[2].isnan().all()
    assert (indices[:2, -1] == 1).all() and values[:2, -1].isnan().all() and not values[:2, :-1].isnan().any()
    expected = expected_scores(queries[:2], corpus[[0, 2, 3, 4]], variant, 1.0)
    torch.testing.assert_close(values[:2, :-1].double(), expected.topk(4, dim=1).values, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("precision", ["tf32x3", "ieee", "tf32"])
def test_every_precision_is_accepted_and_a_bad_one_refused(precision):
    a, b = random_embeddings(4, seed=11), random_embeddings(6, seed=12)
    expected = expected_scores(a, b, "sum", 1.0)
    # On CPU every backend computes in fp32; the precision option changes only the CUDA kernels.
    torch.testing.assert_close(similarity(a, b, precision=precision).double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(search(a, b, k=2, precision=precision)[0].double(), expected.topk(2, dim=1).values,
                               rtol=1e-5, atol=1e-5)
    for variant in VARIANTS:
        with pytest.raises(ValueError, match="precision must be one of tf32x3, ieee, tf32"):
            similarity(a, b, variant=variant, precision="fp64")
        with pytest.raises(ValueError, match="precision must be one of"):
            search(a, b, k=1, variant=variant, precision="TF32")
