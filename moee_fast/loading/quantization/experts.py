"""Routed experts in 4 or 8 bits, stored as the paper's per-expert bitsandbytes linears held them.

transformers 5 keeps each MoE layer's routed experts as two stacked tensors (`gate_up_proj`
[E, 2I, H], `down_proj` [E, H, I]) and its bitsandbytes integration replaces `nn.Linear` modules
only, so the experts (most of an MoE's weights) would stay in the load dtype. Here every
expert's gate, up and down matrix is quantized on its own by bitsandbytes' functional
quantizers, exactly as the `Linear4bit` (NF4) or `Linear8bitLt` (int8) built from that 2-D
weight would store it, into one `QuantizedMatrices` per kind and layer; the stacked tensors are
dropped. The forward runs the per-expert loop of moee_fast.fastpath.experts and dequantizes only
the active experts' matrices, to the dtype of the activations (the load dtype), for their tokens.

Loading: `ExpertsBitsAndBytesConfig` (what quantization/__init__.py builds) selects a transformers
quantizer that turns each experts module into a `QuantizedExperts` before any weight is read and
quantizes each stacked tensor as it arrives, one layer's tensor at a time.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import nn

from ...fastpath.experts import sorted_experts_loop
from .decoding import decode_4bit

NESTED_BLOCKSIZE = 256  # bitsandbytes' blocksize for double-quantizing the 4-bit absmax
EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")


class QuantizedMatrices(nn.Module):
    """`count` matrices of one shape [rows, cols], each quantized on its own by bitsandbytes:
    "nf4"/"fp4" (quantize_4bit, with or without double quantization) or "int8" (row-wise absmax,
    int8_vectorwise_quant of the fp16 weight, as Int8Params stores it). Slot i holds exactly the
    packed bytes and statistics of the bitsandbytes parameter made from matrix i."""

    def __init__(self, count: int, rows: int, cols: int, method: str, blocksize: int = 64, double_quant: bool = True):
        super().__init__()
        self.count, self.rows, self.cols, self.method = count, rows, cols, method
        self.blocksize, self.double_quant = blocksize, double_quant
        self._is_hf_initialized = True  # transformers' loader must not initialize (or re-place) the slots
        self.allocated = False

    def _allocate(self, device: torch.device) -> None:
        """The slots' storage on `device`, made when the first matrix arrives: transformers' loader
        re-creates every buffer that exists on the meta device before loading."""
        def add(name, *shape, dtype):
            self.register_buffer(name, torch.empty(*shape, dtype=dtype, device=device))

        count, size = self.count, self.rows * self.cols
        self.allocated = True
        if self.method == "int8":
            add("data", count, self.rows, self.cols, dtype=torch.int8)
            add("scale", count, self.rows, dtype=torch.float32)
            return
        blocks = math.ceil(size / self.blocksize)
        add("data", count, (size + 1) // 2, dtype=torch.uint8)
        add("code", 16, dtype=torch.float32)
        if not self.double_quant:
            add("absmax", count, blocks, dtype=torch.float32)
            return
        add("absmax", count, blocks, dtype=torch.uint8)
        add("nested_absmax", count, math.ceil(blocks / NESTED_BLOCKSIZE), dtype=torch.float32)
        add("nested_code", 256, dtype=torch.float32)
        add("offset", count, dtype=torch.float32)

    def extra_repr(self) -> str:
        return f"{self.count} x [{self.rows}, {self.cols}], {self.method}"

    @torch.no_grad()
    def store(self, index: int, weight: torch.Tensor) -> None:
        """Quantize the 2-D `weight` into slot `index`."""
        import bitsandbytes.functional as bnbf

        if tuple(weight.shape) != (self.rows, self.cols):
            raise ValueError(f"expert {index}: weight of shape {tuple(weight.shape)}, expected {(self.rows, self.cols)}")
        if not self.allocated:
            self._allocate(weight.device)
        if self.method == "int8":
            data, scale, _ = bnbf.int8_vectorwise_quant(weight.contiguous().to(self.data.device, torch.float16))
            self.data[index], self.scale[index] = data, scale
            return
        packed, state = bnbf.quantize_4bit(weight.contiguous().to(self.data.device), blocksize=self.blocksize,
                                           compress_statistics=self.double_quant, quant_type=self.method)
        self.data[index] = packed.view(-1)
        self.absmax[index] = state.absmax
        self.code.copy_(state.code)
        if self.double_quant:
            self.offset[index] = state.offset
            self.nested_absmax[index] = state.state2.absmax
            self.nested_code.copy_(state.state2.code)

    def quant_state(self, index: int, dtype: torch.dtype):
        """bitsandbytes' QuantState of slot `index` (4-bit only), dequantizing to `dtype`."""
        from bitsandbytes.functional import QuantState

        nested = None
        if self.double_quant:
            nested = QuantState(absmax=self.nested_absmax[index], code=self.nested_code, blocksize=NESTED_BLOCKSIZE,
                                dtype=torch.float32)
        return QuantState(absmax=self.absmax[index], shape=torch.Size((self.rows, self.cols)), code=self.code,
                          blocksize=self.blocksize, quant_type=self.method, dtype=dtype,
                          offset=self.offset[index] if self.double_quant else None, state2=nested)

    def dequantize(self, index: int, dtype: torch.dtype) -> torch.Tensor:
        """Matrix `index` as a [rows, cols] tensor of `dtype`: bitsandbytes' dequantizer on CUDA,
        moee-fast's fp32 decoder elsewhere (decoding.py: bitsandbytes' CPU one is wrong for some
        shapes)."""
        import bitsandbytes.functional as bnbf

        if self.method == "int8":
            return bnbf.int8_vectorwise_dequant(self.data[index], self.scale[index]).to(dtype)
        if self.data.is_cuda:
            return bnbf.dequantize_4bit(self.data[index].view(-1, 1), self.quant_state(index, dtype))
        return decode_4bit(self.data[index], self.quant_state(index, torch.float32)).to(dtype)


class QuantizedExperts(nn.Module):
    """Mixed into an experts module's own class (transformers' stacked experts, or DeepSeekMoE's):
    `gate`, `up` and `down` QuantizedMatrices replace `gate_up_proj` and `down_proj`."""

    runs_own_experts_loop = True  # the fast path's experts part leaves it alone (fastpath/experts.py)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        empty = [name for name in ("gate", "up", "down") if not getattr(self, name).allocated]
        if empty:  # their checkpoint tensors never arrived (transformers lists them as missing keys)
            raise ValueError(f"quantized experts {type(self).__name__}: no weights were loaded for {', '.join(empty)}")

        return sorted_experts_loop(self, hidden_states, top_k_index, top_k_weights,
                                   lambda e: self.dequantized_gate_up(e, hidden_states.dtype),
                                   lambda e: self.down.dequantize(e, hidden_states.dtype))

    def dequantized_gate_up(self, expert: int, dtype: torch.dtype) -> torch.Tensor:
        """[gate; up] of one expert as one [2I, H] tensor (the layout `_apply_gate` splits)."""
        return torch.cat([self.gate.dequantize(expert, dtype), self.up.dequantize(expert, dtype)])

    @torch.no_grad()
    def store_stacked(self, attr: str, stacked: torch.Tensor) -> None:
        """Quantize a stacked `gate_up_proj` [E, 2I, H] or `down_proj` [E, H, I] expert by expert."""
        rows = self.gate.rows
        for expert in range(stacked.shape[0]):
            if attr == "gate_up_proj":
                self.store_expert(attr, (expert, slice(0, rows)), stacked[expert, :rows])
                self.store_expert(attr, (expert, slice(rows, 2 * rows)), stacked[expert, rows:])
            else:
                self.store_expert(attr, (expert,), stacked[expert])

    @torch.no_grad()
    def store_expert(self, attr: str, index: tuple, weight: torch.Tensor) -> None:
        """Quantize one expert's matrix, the slice `index` of the stacked `attr` ((expert, gate or up
        rows) of gate_up_proj, (expert,) of down_proj); the stacked parameter is dropped."""
        if attr == "down_proj":
            matrices = self.down
        else:
            matrices = self.gate if index[1].start == 0 else self.up
        matrices.store(index[0], weight)
        self._parameters.pop(attr, None)


def quantizable_experts(module: nn.Module) -> bool:
    """Stacked SiLU-gated experts in the concatenated [gate; up] layout without bias: the layout
    whose per-expert matrices were the paper's separate gate, up and down linears."""
    weights = [getattr(module, attr, None) for attr in EXPERT_WEIGHTS]
    if not all(isinstance(w, torch.Tensor) and w.dim() == 3 for w in weights):
        return False
    return (getattr(module, "has_gate", True) and getattr(module, "is_concatenated", True)
            and not getattr(module, "has_bias", False) and not getattr(module, "is_transposed", False)
            and not getattr(module, "has_post_expert_norm", False))


@lru_cache(maxsize=None)
def mixed_class(mixin: type, base: type, name: str) -> type:
    """`base` with `mixin`'s methods in front, made once per pair: a module whose class is swapped
    for it keeps its state and its isinstance checks."""
    return type(name, (mixin, base), {})


def make_quantized(module: nn.Module, method: str, blocksize: int = 64, double_quant: bool = True) -> None:
    """Turn a stacked experts module into a QuantizedExperts with empty slots; its stacked
    parameters stay until `store_stacked` replaces them (they are meta while loading)."""
    experts, two_inter, hidden = module.gate_up_proj.shape
    inter = two_inter // 2
    settings = dict(method=method, blocksize=blocksize, double_quant=double_quant)
    module.__class__ = mixed_class(QuantizedExperts, type(module), f"Quantized{type(module).__name__}")
    module._is_hf_initialized = True
    module.gate = QuantizedMatrices(experts, inter, hidden, **settings)
    module.up = QuantizedMatrices(experts, inter, hidden, **settings)
    module.down = QuantizedMatrices(experts, hidden, inter, **settings)


def is_quantized_experts(module: nn.Module) -> bool:
    return isinstance(module, QuantizedExperts)


def quantized_nbytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers, quantized storage included."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
