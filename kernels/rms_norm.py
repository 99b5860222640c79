"""RMSNorm of each row in one pass, optionally after adding a residual (written back as the new
residual stream), rounding as the families' modules do: normalise in fp32, round to the input
dtype, then multiply by the weight and round again."""

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x, residual, weight, out, residual_out, n_cols, eps, stride_x, stride_residual, stride_out,
                     stride_residual_out, ADD_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    values = tl.load(x + row * stride_x + cols, mask=ok, other=0.0)
    if ADD_RESIDUAL:  # the sum is rounded to the stream's dtype, as `residual + x` is
        values = (values.to(tl.float32) + tl.load(residual + row * stride_residual + cols, mask=ok, other=0.0).to(tl.float32))
        values = values.to(residual_out.dtype.element_ty)
        tl.store(residual_out + row * stride_residual_out + cols, values, mask=ok)
    h = values.to(tl.float32)
    normed = h * tl.rsqrt(tl.sum(h * h, axis=0) / n_cols + eps)
    scaled = normed.to(out.dtype.element_ty).to(tl.float32) * tl.load(weight + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out + row * stride_out + cols, scaled.to(out.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor,
             residual: torch.Tensor | None = None, residual_out: torch.Tensor | None = None) -> torch.Tensor:
    """x, residual, out, residual_out: [rows, H] with unit inner strides; weight: [H]. out =
    weight * rms_norm(x (+ residual)); residual_out receives x + residual."""
    n_rows, n_cols = x.shape
    if n_rows:
        _rms_norm_kernel[(n_rows,)](
            x, residual, weight, out, residual_out, n_cols, eps, x.stride(0),
            0 if residual is None else residual.stride(0), out.stride(0), 0 if residual_out is None else residual_out.stride(0),
            ADD_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(n_cols), num_warps=4 if n_cols <= 4096 else 8)
    return out
