"""4-bit weights decoded in torch, in fp32: the one decoder of every 4-bit weight run on CPU.

bitsandbytes (0.50) decodes some shapes wrongly on CPU (its dequantize_4bit gives a [40, 48]
NF4 weight about five times the error of a correct round trip; widths that are multiples of 64
seem spared), and its packed CPU kernel computes in bf16 whatever compute dtype was asked for.
This decoder reads bitsandbytes' own bytes and statistics (a `QuantState`) and nothing else.
"""

from __future__ import annotations

import torch


def decode_4bit(packed: torch.Tensor, state) -> torch.Tensor:
    """The fp32 [rows, cols] weight that `packed` (uint8, two 4-bit codes per byte, high nibble
    first, any shape) and its bitsandbytes QuantState `state` hold: each code looked up in
    `state.code`, times its block's absmax (itself decoded from its 8-bit code, its nested
    block's scale and the offset under double quantization)."""
    size = state.shape.numel()
    absmax = state.absmax
    if state.state2 is not None:
        nested = state.state2.absmax.repeat_interleave(state.state2.blocksize)[: absmax.numel()]
        absmax = state.state2.code[absmax.long()] * nested + state.offset
    code = state.code.float()
    byte = torch.arange(256, device=code.device)
    pairs = torch.stack([code[byte >> 4], code[byte & 15]], dim=1)  # byte -> its two values
    values = pairs[packed.reshape(-1).long()].view(-1)[:size]
    padded = absmax.numel() * state.blocksize
    if padded != size:
        values = torch.cat([values, values.new_zeros(padded - size)])
    return (values.view(-1, state.blocksize) * absmax.float()[:, None]).view(-1)[:size].view(state.shape)
