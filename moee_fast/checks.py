"""Argument checks and numeric constants shared by every module, each with one meaning."""

from __future__ import annotations

import math
import numbers
import operator

# Added to a row norm before dividing (as torch's cosine_similarity does): a zero vector has
# cosine 0 with everything, never NaN. The torch reference, the C++ op and the Triton kernel use it.
NORM_EPS = 1e-8

# hs: HS alone; rw: RW flattened to [N, L*E]; concat: [hs; rw]; sum: [hs/|hs|, sqrt(alpha) rw/|rw|],
# whose dot product is cos_HS + alpha cos_RW, the paper's MoEE(sum) score.
VARIANTS = ("hs", "rw", "concat", "sum")

# "scores": RW as the paper defines it (the family's scoring function of the router logits, fp32);
# "logits": the raw router logits, as some published evaluations used.
RW_SOURCES = ("scores", "logits")

# How the Triton kernels multiply fp32 embeddings on CUDA (bf16/fp16 ones always run on tensor cores).
# Max abs error of a cosine against float64, bounded by tests/test_ops.py's tensor-core emulation:
# "ieee": CUDA cores at the fp32 rate, within 1e-6; "tf32x3" (default): tensor cores, each operand
# split into two TF32 parts and three products summed, within 1e-6 as well; "tf32": one TF32
# product, within 1e-3. The C++ and torch backends always compute in full fp32.
PRECISIONS = ("tf32x3", "ieee", "tf32")
DEFAULT_PRECISION = "tf32x3"


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


def check_precision(precision) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def check_rw_source(rw_source) -> str:
    if rw_source not in RW_SOURCES:
        raise ValueError(f"rw_source must be one of {', '.join(RW_SOURCES)}, got {rw_source!r}")
    return rw_source


def as_integer(value) -> int | None:
    """value as an int when it is integer-like (int, numpy integer, 0-d integer tensor), else None;
    a bool is not an integer here."""
    if isinstance(value, bool) or "bool" in str(getattr(value, "dtype", "")):  # numpy and torch bools too
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_positive_int(name: str, value, allow_none: bool = False) -> int | None:
    """An integer >= 1 (numpy integers and 0-d integer tensors too; never a bool, float or string)."""
    if value is None and allow_none:
        return None
    integer = as_integer(value)
    if integer is None or integer < 1:
        raise ValueError(f"{name} must be an integer >= 1{' or None' if allow_none else ''}, got {value!r}")
    return integer
