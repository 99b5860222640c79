"""Argument checks and numeric constants shared by every module, each with one meaning."""

from __future__ import annotations

import math
import numbers
import operator
import re

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


# How HS and RW are pooled over a text's tokens: the last token's (the paper's MoEE) or the mean over
# every token the model sees (prompt and special tokens included).
POOLINGS = ("last", "mean")


def check_pooling(name: str, pooling) -> str:
    if pooling not in POOLINGS:
        raise ValueError(f"{name} must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    return pooling


def check_layers(name: str, layers, count: int) -> list[int] | None:
    """Layer indices (of `count`) picked by a slice or a list of ints (negatives count from the
    end), in the order given; None -> None (all layers)."""
    if layers is None:
        return None
    if isinstance(layers, slice):
        picked = list(range(count))[layers]
    elif isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise TypeError(f"{name} must be a slice or a list of layer indices, got {layers!r}")
    else:
        picked = [check_layer(f"{name}[{i}]", layer, count) for i, layer in enumerate(layers)]
    if not picked:
        raise ValueError(f"{name} picks no layer of the {count}")
    if len(set(picked)) != len(picked):
        raise ValueError(f"{name} names a layer twice: {picked}")
    return picked


def check_layer(name: str, layer, count: int) -> int:
    """One layer index of `count` (negatives count from the end) as 0 .. count - 1."""
    index = as_integer(layer)
    if index is None or not -count <= index < count:
        raise ValueError(f"{name} must be an integer layer index in [{-count}, {count}), got {layer!r}")
    return index % count


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


# ------------------------------------------------------------------------- texts and embeddings
_SURROGATE = re.compile("[\ud800-\udfff]")


def check_unicode(texts: list[str]) -> None:
    """Every text must be encodable as UTF-8: a lone surrogate (e.g. "\\ud800", left by a bad
    decode) has no bytes the tokenizer could read."""
    for i, text in enumerate(texts):
        found = _SURROGATE.search(text)
        if found:
            raise ValueError(
                f"texts[{i}] holds a lone surrogate {found.group()!r} at character {found.start()}, "
                "which is not valid Unicode text; decode its source with errors='replace' or drop it"
            )


def check_max_length(max_length, context: int | None) -> int | None:
    """max_length: None or an integer >= 1 and at most the model's context."""
    max_length = check_positive_int("max_length", max_length, allow_none=True)
    if max_length is not None and context is not None and max_length > context:
        raise ValueError(f"max_length={max_length} exceeds this model's context of {context} positions (max_position_embeddings)")
    return max_length


def check_context(lengths: list[int], context: int | None) -> None:
    """Refuse texts whose tokens (prompt included) do not fit the model's positions: past them
    the model's output is not an embedding of the text."""
    if context is None:
        return
    too_long = [i for i, length in enumerate(lengths) if length > context]
    if too_long:
        first = too_long[0]
        others = f" ({len(too_long)} texts are too long: {_some_rows(too_long)})" if len(too_long) > 1 else ""
        raise ValueError(
            f"texts[{first}] is {lengths[first]} tokens long with its prompt, beyond this model's context of "
            f"{context} positions (max_position_embeddings){others}; pass max_length (--max-length) to truncate"
        )


def check_finite_rows(hs, rw, indices: list[int]) -> None:
    """HS and RW of one batch (on the CPU, in batch order) must be finite: NaN or Inf means
    corrupted weights or an overflowing dtype, never an embedding."""
    # One sum per tensor is the cheap common case (NaN and Inf propagate into it); only a
    # non-finite sum (or one that overflowed from finite values) needs the per-row scan.
    if bool(hs.sum().isfinite()) and bool(rw.sum().isfinite()):
        return
    finite = hs.isfinite().all(dim=1) & rw.flatten(1).isfinite().all(dim=1)
    if not bool(finite.all()):
        bad = sorted(indices[j] for j in (~finite).nonzero().flatten().tolist())
        raise ValueError(
            f"the model produced non-finite (NaN or Inf) embeddings for {_some_rows(bad)}: its weights may be "
            "corrupted, or the dtype overflows (try dtype=torch.float32)"
        )


def _some_rows(indices: list[int], shown: int = 5) -> str:
    names = ", ".join(f"texts[{i}]" for i in indices[:shown])
    return names + (f" and {len(indices) - shown} more" if len(indices) > shown else "")
