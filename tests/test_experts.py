"""The moee_sorted experts path (fused C++ op and Python fallback) against a float64 loop over
tokens and their top-k experts."""

import pytest
import torch

from moee_fast import MoEEncoder, ops
from moee_fast.fastpath import experts
from conftest import random_texts, relative_error
from kernel_references import experts_inputs, float64_experts

needs_cpp = pytest.mark.skipif("cpp" not in ops.available_backends(), reason="C++ extension not built")

SHAPES = [  # (T, H, I, E, k)
    (1, 64, 32, 8, 1),
    (1, 96, 48, 64, 8),
    (7, 64, 48, 8, 2),
    (7, 96, 32, 60, 8),
    (333, 64, 32, 64, 8),
    (333, 96, 48, 60, 2),
    (333, 64, 48, 8, 1),
    (333, 96, 32, 8, 8),
    # Widths that are not multiples of the kernels' 8-lane vectors or 6-row tiles, and reductions
    # longer than one 256-wide block (hidden 300 into gate/up, intermediate 260 into down).
    (50, 37, 13, 4, 2),
    (40, 300, 260, 4, 2),
    (333, 20, 7, 8, 8),
]


@needs_cpp
@pytest.mark.parametrize("shape", SHAPES)
def test_cpp_op_matches_float64_loop(shape):
    module, hidden, index, weights = experts_inputs(*shape)
    out = torch.full_like(hidden, torch.nan)
    torch.ops.moee_fast.moe_experts.out(hidden, index, weights, module.gate_up_proj, module.down_proj, out=out)
    assert relative_error(out, float64_experts(module, hidden, index, weights)).max() <= 1e-5


@needs_cpp
@pytest.mark.parametrize("shape", SHAPES[:4])
def test_forward_runs_the_cpp_op(shape, monkeypatch):
    module, hidden, index, weights = experts_inputs(*shape, seed=5)

    def not_this_path(*args):
        raise AssertionError("the fp32 CPU standard layout must run the C++ op")

    monkeypatch.setattr(experts, "sorted_experts_python", not_this_path)
    with torch.inference_mode():  # as the encoder runs it: the op's worker threads must follow
        out = experts.sorted_experts_forward(module, hidden, index, weights)
    assert relative_error(out, float64_experts(module, hidden, index, weights)).max() <= 1e-5


@pytest.mark.parametrize("shape", SHAPES)
def test_python_path_matches_float64_loop(shape, monkeypatch):
    module, hidden, index, weights = experts_inputs(*shape, seed=9)
    monkeypatch.setattr(experts, "_use_cpp", lambda *args: False)
    out = experts.sorted_experts_forward(module, hidden, index, weights)
    assert relative_error(out, float64_experts(module, hidden, index, weights)).max() <= 1e-5


def test_other_dtypes_and_custom_gates_take_the_python_path(monkeypatch):
    from transformers.models.olmoe.modeling_olmoe import OlmoeExperts

    module, hidden, index, weights = experts_inputs(7, 64, 32, 8, 2)
    assert experts._use_cpp(module, hidden) == ("cpp" in ops.available_backends())
    assert not experts._use_cpp(module.double(), hidden.double())
    module.float()
    module.config.hidden_act = "gelu"
    assert not experts._use_cpp(module, hidden)
    module.config.hidden_act = "silu"
    monkeypatch.setattr(OlmoeExperts, "_apply_gate", lambda self, gate_up: gate_up.chunk(2, -1)[1])
    assert not experts._use_cpp(module, hidden)


@needs_cpp
def test_weights_in_another_dtype_and_int32_indices():
    module, hidden, index, weights = experts_inputs(333, 64, 32, 60, 8, seed=3)
    expected = float64_experts(module, hidden, index, weights.bfloat16())
    out = torch.ops.moee_fast.moe_experts(hidden, index.int(), weights.bfloat16(), module.gate_up_proj, module.down_proj)
    assert relative_error(out, expected).max() <= 1e-5


@needs_cpp
def test_a_token_does_not_depend_on_its_batch():
    """Each token sums its k expert rows in slot order, whatever else is routed with it."""
    module, hidden, index, weights = experts_inputs(333, 96, 48, 64, 8, seed=4)
    op = torch.ops.moee_fast.moe_experts
    full = op(hidden, index, weights, module.gate_up_proj, module.down_proj)
    for rows in (slice(0, 1), slice(100, 107), slice(5, 333, 3)):
        alone = op(hidden[rows], index[rows], weights[rows], module.gate_up_proj, module.down_proj)
        assert relative_error(alone, full[rows]).max() <= 1e-6


@needs_cpp
def test_bad_arguments_are_refused():
    module, hidden, index, weights = experts_inputs(7, 64, 32, 8, 2)
    op = torch.ops.moee_fast.moe_experts
    bad = index.clone()
    bad[3, 1] = 8
    with pytest.raises(RuntimeError, match="expert index 8 out of range"):
        op(hidden, bad, weights, module.gate_up_proj, module.down_proj)
    with pytest.raises(RuntimeError, match="down_proj must be"):
        op(hidden, index, weights, module.gate_up_proj, module.down_proj[:, :, :-1])
    with pytest.raises(RuntimeError, match="float32"):
        op(hidden.double(), index, weights, module.gate_up_proj, module.down_proj)
    assert op(hidden[:0], index[:0], weights[:0], module.gate_up_proj, module.down_proj).shape == (0, 64)


def test_encoder_matches_grouped_mm(checkpoint, monkeypatch):
    path = checkpoint("olmoe")
    if "cpp" in ops.available_backends():  # then the encoder must run the C++ op, not the fallback
        monkeypatch.setattr(experts, "sorted_experts_python", None)
    texts = random_texts(12, seed=21, max_words=60)
    enc = MoEEncoder.from_pretrained(path, device="cpu")
    assert enc.model.config._experts_implementation == experts.NAME
    expected = MoEEncoder.from_pretrained(path, device="cpu", experts_implementation="grouped_mm").encode(texts)
    out = enc.encode(texts)
    assert relative_error(out.hs, expected.hs).max() <= 1e-5
    assert relative_error(out.rw, expected.rw).max() <= 1e-5
