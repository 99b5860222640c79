"""Rotary position embedding applied in place to q and k ([tokens, heads, D] views of any
strides): x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1), computed in fp32 and
rounded once. cos, sin: [tokens, D] rows (the halves repeated, as the families build them)."""

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_kernel(x, cos, sin, n_heads, stride_token, stride_head, stride_cos, stride_sin,
                   HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    ok = (heads < n_heads)[:, None] & (dims < HALF)[None, :]
    first = x + token * stride_token + heads[:, None].to(tl.int64) * stride_head + dims[None, :]
    x1 = tl.load(first, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=ok, other=0.0).to(tl.float32)
    c1 = tl.load(cos + token * stride_cos + dims, mask=dims < HALF, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos + token * stride_cos + HALF + dims, mask=dims < HALF, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin + token * stride_sin + dims, mask=dims < HALF, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin + token * stride_sin + HALF + dims, mask=dims < HALF, other=0.0).to(tl.float32)[None, :]
    tl.store(first, (x1 * c1 - x2 * s1).to(x.dtype.element_ty), mask=ok)
    tl.store(first + HALF, (x2 * c2 + x1 * s2).to(x.dtype.element_ty), mask=ok)


def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [tokens, heads, D] with unit stride along D (D even); cos, sin: [tokens, D] with unit
    inner stride. Rotates x in place and returns it."""
    n_tokens, n_heads, dim = x.shape
    block_d = triton.next_power_of_2(dim // 2)
    block_h = max(1, min(triton.next_power_of_2(n_heads), 2048 // block_d))
    if n_tokens:
        _rotary_kernel[(n_tokens, triton.cdiv(n_heads, block_h))](
            x, cos, sin, n_heads, x.stride(0), x.stride(1), cos.stride(0), sin.stride(0),
            HALF=dim // 2, BLOCK_H=block_h, BLOCK_D=block_d)
    return x
