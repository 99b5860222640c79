"""Scores between MoEE embeddings for each variant, top-k search, and tuning MoEE(sum)'s alpha.

"sum" is the paper's MoEE(sum): cos_HS + alpha * cos_RW, computed by `ops.combined_cosine`.
Every other variant scores by the plain cosine of its vectors (`MoEEmbeddings.vectors`), through
the same fused ops with an empty second stream, so top-k never holds [Nq, Nc] for any variant.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import ops
from .checks import DEFAULT_PRECISION, check_alpha, check_positive_int, check_precision, check_variant
from .embeddings import MoEEmbeddings, unit_rows

DEFAULT_ALPHAS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)


def _check_pair(
    a: MoEEmbeddings, b: MoEEmbeddings, variant: str, alpha: float, names=("a", "b"), precision=DEFAULT_PRECISION
) -> float:
    for name, x in zip(names, (a, b)):
        if not isinstance(x, MoEEmbeddings):
            raise TypeError(f"{name} must be MoEEmbeddings, got {type(x).__name__}")
    check_variant(variant)
    check_precision(precision)
    a.check_compatible(b, names)
    return check_alpha(alpha)


def cosine_matrix(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """float32 [Nx, Ny] cosines between rows; a zero row has cosine 0 with everything."""
    return unit_rows(x.float()) @ unit_rows(y.float()).T


def cosine_pairwise(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """float32 [N] cosine of x[i] and y[i]."""
    return (unit_rows(x.float()) * unit_rows(y.float())).sum(dim=1)


def _streams(e: MoEEmbeddings, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The two streams the fused ops score: (hs, rw) for "sum"; otherwise the variant's vectors and
    an empty second stream, whose cosine counts 0."""
    if variant == "sum":
        return e.hs, e.rw
    vectors = e.vectors(variant)
    return vectors, vectors.new_empty(len(e), 0)


def similarity(
    a: MoEEmbeddings, b: MoEEmbeddings, variant: str = "sum", alpha: float = 1.0, precision: str = DEFAULT_PRECISION
) -> torch.Tensor:
    """float32 [Na, Nb] scores of every a against every b.

    "sum": cos_HS + alpha * cos_RW exactly (in [-1 - alpha, 1 + alpha]); other variants: the
    cosine of their vectors (alpha is ignored). precision: how fp32 is multiplied on CUDA
    (`ops.combined_cosine`).
    """
    alpha = _check_pair(a, b, variant, alpha, precision=precision)
    return ops.combined_cosine(*_streams(a, variant), *_streams(b, variant), alpha=alpha, precision=precision)


def similarity_pairwise(a: MoEEmbeddings, b: MoEEmbeddings, variant: str = "sum", alpha: float = 1.0) -> torch.Tensor:
    """float32 [N] score of a[i] against b[i], as `similarity` would give it."""
    alpha = _check_pair(a, b, variant, alpha)
    if len(a) != len(b):
        raise ValueError(f"similarity_pairwise needs as many a as b, got {len(a)} and {len(b)}")
    if variant == "sum":
        return cosine_pairwise(a.hs, b.hs) + alpha * cosine_pairwise(a.rw.flatten(1), b.rw.flatten(1))
    return cosine_pairwise(a.vectors(variant), b.vectors(variant))


def search(
    queries: MoEEmbeddings,
    corpus: MoEEmbeddings,
    k: int,
    variant: str = "sum",
    alpha: float = 1.0,
    precision: str = DEFAULT_PRECISION,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best corpus rows for each query: (scores float32 [Nq, k'] descending, indices int64
    [Nq, k']) with k' = min(k, len(corpus)); k is any integer >= 1 (numpy integers too). Scores
    are those of `similarity`, through `ops.topk_combined_cosine`, which never holds the whole
    [Nq, Nc] score matrix. A NaN score (a row holding NaN or inf) ranks last and comes back
    as NaN; every index is a real corpus row, on every backend."""
    alpha = _check_pair(queries, corpus, variant, alpha, ("queries", "corpus"), precision)
    k = min(check_positive_int("k", k), len(corpus))
    if k == 0 or len(queries) == 0:
        return torch.empty(len(queries), k), torch.empty(len(queries), k, dtype=torch.int64)
    streams = (*_streams(queries, variant), *_streams(corpus, variant))
    return ops.topk_combined_cosine(*streams, k, alpha=alpha, precision=precision)


# -------------------------------------------------------------------------------- tuning alpha
@dataclass
class AlphaTable:
    """Metric of MoEE(sum) at each alpha tried, from `tune_alpha`."""

    alphas: list[float]
    scores: list[float]
    metric: str

    @property
    def best_alpha(self) -> float:
        return self.alphas[int(np.nanargmax(self.scores))]

    @property
    def best_score(self) -> float:
        return float(np.nanmax(self.scores))

    def __str__(self) -> str:
        lines = [f"{'alpha':>8}  {self.metric}"]
        for alpha, score in zip(self.alphas, self.scores):
            mark = "  <- best" if alpha == self.best_alpha else ""
            lines.append(f"{alpha:>8.3g}  {score:.4f}{mark}")
        return "\n".join(lines)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 0, ties sharing their average rank (as Spearman's correlation needs)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    _, tie_group, tie_count = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(tie_group, weights=ranks) / tie_count)[tie_group]


def pearson(scores: np.ndarray, gold: np.ndarray) -> float:
    return float(np.corrcoef(np.asarray(scores, dtype=np.float64), np.asarray(gold, dtype=np.float64))[0, 1])


def spearman(scores: np.ndarray, gold: np.ndarray) -> float:
    return pearson(_ranks(np.asarray(scores)), _ranks(np.asarray(gold)))


_METRICS = {"spearman": spearman, "pearson": pearson}


def tune_alpha(
    a: MoEEmbeddings,
    b: MoEEmbeddings,
    gold: Sequence[float],
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    metric: str | Callable[[np.ndarray, np.ndarray], float] = "spearman",
) -> AlphaTable:
    """Grid-search MoEE(sum)'s alpha on labelled pairs (a[i], b[i]) with gold scores `gold[i]`
    (an STS-style dev split): the metric of cos_HS + alpha * cos_RW against gold at each alpha.

    metric: "spearman", "pearson", or a callable (pair scores [N], gold [N]) -> float to maximise.
    """
    if callable(metric):
        metric_name, metric_fn = getattr(metric, "__name__", "metric"), metric
    elif metric in _METRICS:
        metric_name, metric_fn = metric, _METRICS[metric]
    else:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(_METRICS)} or pass a callable")
    alphas = [check_alpha(alpha) for alpha in alphas]
    if not alphas:
        raise ValueError("tune_alpha needs at least one alpha")
    gold = np.asarray(gold, dtype=np.float64)
    if gold.shape != (len(a),):
        raise ValueError(f"gold must hold one score per pair ({len(a)}), got shape {gold.shape}")
    if not np.isfinite(gold).all():
        raise ValueError(f"gold[{int(np.flatnonzero(~np.isfinite(gold))[0])}] is not a finite number")
    if len(gold) < 2 or np.ptp(gold) == 0:
        raise ValueError("gold scores must differ (at least two distinct values): a constant gold ranks nothing")
    cos_hs = similarity_pairwise(a, b, "hs").double().numpy()
    cos_rw = similarity_pairwise(a, b, "rw").double().numpy()
    scores = [_metric_unless_constant(metric_fn, cos_hs + alpha * cos_rw, gold) for alpha in alphas]
    if np.isnan(scores).all():
        raise ValueError("the pair scores are constant at every alpha tried (identical pairs?): no alpha ranks them")
    return AlphaTable(alphas, scores, metric_name)


def _metric_unless_constant(metric_fn, pair_scores: np.ndarray, gold: np.ndarray) -> float:
    """NaN (never the best) where the pair scores are constant up to fp32 rounding: there a
    correlation is undefined, or only ranks rounding noise."""
    if np.ptp(pair_scores) <= 1e-6 * max(1.0, float(np.abs(pair_scores).max())):
        return math.nan
    return float(metric_fn(pair_scores, gold))
