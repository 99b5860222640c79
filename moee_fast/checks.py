"""Argument checks and numeric constants shared by every module, each with one meaning."""

from __future__ import annotations

import math
import numbers

# Added to a row norm before dividing (as torch's cosine_similarity does): a zero vector has
# cosine 0 with everything, never NaN. The torch reference, the C++ op and the Triton kernel use it.
NORM_EPS = 1e-8

# hs: HS alone; rw: RW flattened to [N, L*E]; concat: [hs; rw]; sum: [hs/|hs|, sqrt(alpha) rw/|rw|],
# whose dot product is cos_HS + alpha cos_RW, the paper's MoEE(sum) score.
VARIANTS = ("hs", "rw", "concat", "sum")

# "scores": RW as the paper defines it (the family's scoring function of the router logits, fp32);
# "logits": the raw router logits, as some published evaluations used.
RW_SOURCES = ("scores", "logits")


def check_variant(variant) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    return variant


def check_alpha(alpha) -> float:
    """alpha weighs cos_RW in MoEE(sum): a finite number >= 0 (a 0-d tensor or numpy scalar too)."""
    if hasattr(alpha, "item") and getattr(alpha, "ndim", 0) == 0:
        alpha = alpha.item()
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha weighs cos_RW in MoEE(sum) and must be a finite number >= 0, got {alpha!r}")
    return float(alpha)


def check_rw_source(rw_source) -> str:
    if rw_source not in RW_SOURCES:
        raise ValueError(f"rw_source must be one of {', '.join(RW_SOURCES)}, got {rw_source!r}")
    return rw_source


def check_positive_int(name: str, value, allow_none: bool = False) -> int | None:
    """An integer >= 1 (numpy integers too; never a bool, float or string)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1{' or None' if allow_none else ''}, got {value!r}")
    return int(value)
