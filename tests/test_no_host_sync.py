"""No host synchronisation in the forward of the CUDA code path.

On the CPU: the ops the CUDA forward runs (fused MoE experts, dense and quantized, RMSNorm, rotary,
the per-layer router gather) run in Triton's interpreter while every call that makes CUDA wait for the device
(.item(), .tolist(), .cpu(), .numpy(), nonzero, bool/int/float of a tensor) made from moee_fast's
own code is recorded; the interpreter's own host copies are not ours and are not counted. On a GPU
(marked `gpu`): a whole encode under torch.cuda.set_sync_debug_mode("error").
"""

import os
import sys
from pathlib import Path

import pytest
import torch

import moee_fast
from moee_fast import ops

PACKAGE = str(Path(moee_fast.__file__).resolve().parent)
SYNCING = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__")


class HostSyncs:
    """Patches the syncing Tensor methods and torch.nonzero; `calls` lists (method, file:line) of
    each call whose caller is a file of moee_fast."""

    def __init__(self):
        self.calls, self._saved = [], {}

    def __enter__(self):
        for name in SYNCING:
            original = getattr(torch.Tensor, name)
            self._saved[(torch.Tensor, name)] = original
            setattr(torch.Tensor, name, self._recording(name, original))
        self._saved[(torch, "nonzero")] = torch.nonzero
        torch.nonzero = self._recording("torch.nonzero", torch.nonzero)
        return self

    def __exit__(self, *exc):
        for (owner, name), original in self._saved.items():
            setattr(owner, name, original)

    def _recording(self, name, original):
        def call(*args, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(PACKAGE):
                self.calls.append((name, f"{caller.f_code.co_filename}:{caller.f_lineno}"))
            return original(*args, **kwargs)

        return call


def test_the_recorder_sees_a_sync_made_from_moee_fast_code():
    with HostSyncs() as syncs:
        from moee_fast.checks import check_finite_rows

        check_finite_rows(torch.ones(2, 3), torch.ones(2, 4), [0, 1])  # bool() of a sum: a sync on CUDA
    assert any(name == "__bool__" for name, _ in syncs.calls)


def quantized_weights(gen):
    """(gate, up, down) of 8 experts, H=40, I=24, as int8 rows and as double-quantized 4-bit blocks."""
    from moee_fast.kernels.moe_gemm import Blockwise4Bit, Int8Rows

    shapes = ((24, 40), (24, 40), (40, 24))
    int8 = [Int8Rows(torch.randint(-127, 128, (8, *shape), generator=gen, dtype=torch.int8), torch.rand(8, shape[0]))
            for shape in shapes]
    blocks = 15  # 960 values in blocks of 64
    nested = (torch.rand(8, 1), torch.linspace(-1, 1, 256), torch.rand(8))
    nf4 = [Blockwise4Bit(torch.randint(0, 256, (8, 480), generator=gen, dtype=torch.uint8),
                         torch.randint(0, 256, (8, blocks), generator=gen, dtype=torch.uint8), torch.linspace(-1, 1, 16),
                         shape, 64, nested) for shape in shapes]
    return int8, nf4


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the Triton ops on CPU tensors in the interpreter")
def test_the_cuda_forward_ops_make_no_host_sync():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(13, 40, generator=gen).to(torch.bfloat16)
    weights, index = torch.softmax(torch.randn(13, 8, generator=gen), -1).topk(2, -1)
    gate_up = torch.randn(8, 48, 40, generator=gen).to(torch.bfloat16)
    down = torch.randn(8, 40, 24, generator=gen).to(torch.bfloat16)
    shared = (gate_up[0, :24], gate_up[0, 24:], down[0], torch.rand(13, 1, generator=gen).to(torch.bfloat16))
    q = torch.randn(1, 13, 4, 16, generator=gen).transpose(1, 2)
    k = torch.randn(1, 13, 2, 16, generator=gen).transpose(1, 2)
    cos, sin = torch.randn(2, 1, 13, 16, generator=gen).unbind(0)
    logits = torch.randn(13, 8, generator=gen)
    rows = torch.tensor([4, 12])
    out = torch.empty(2, 1, 8)
    int8, nf4 = quantized_weights(gen)
    with HostSyncs() as syncs:
        ops.fused_moe_experts(x, index, weights, gate_up, down, shared=shared)
        for quantized in (int8, nf4):
            ops.fused_moe_quantized_experts(x, index, weights, *quantized)
        ops.rms_norm(x, torch.ones(40, dtype=torch.bfloat16), 1e-6, residual=x)
        ops.rotary_(q, k, cos, sin)
        ops.gather_router_softmax([logits], rows, backend="triton", out=out, check_rows=False)
    assert syncs.calls == [], syncs.calls


@pytest.mark.gpu
def test_a_whole_encode_on_cuda_runs_under_sync_debug_mode_error(checkpoint):
    from moee_fast import MoEEncoder

    encoder = MoEEncoder.from_pretrained(checkpoint("olmoe"), device="cuda", dtype=torch.bfloat16)
    texts = ["a short text", "a somewhat longer text about experts and routers " * 8, "x"]
    encoder.encode(texts)  # compiles and autotunes outside the checked call
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = encoder.encode(texts)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out.hs).all() and torch.isfinite(out.rw).all()
