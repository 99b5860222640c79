"""The Triton kernels compile for a Hopper GPU (sm_90) with no GPU present, on the paths a CUDA run takes.

The interpreter never compiles anything, so this is the only CPU-side check that the GPU path builds:
Triton lowers each kernel to PTX and ptxas assembles it for sm_90, in a fresh process without
TRITON_INTERPRET. It checks that fp32 "tf32x3"/"tf32" and bf16 cosines use tensor-core MMA
instructions and "ieee" does not, that every fused-MoE GEMM (dense, int8 and 4-bit weights)
does, and that ptxas reports no register spills.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(r"""
    import json, re, subprocess, tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource
    from moee_fast.kernels import combined_cosine, fused_moe, gather_router_softmax, moe_align, moe_gemm, moe_sum, rms_norm, rotary

    def compile_report(kernel, types, constants, num_warps, num_stages=3):
        names = [p.name for p in kernel.params]
        signature = {name: types.get(name, "i64") for name in names}
        signature.update({name: "constexpr" for name in constants})
        source = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(n),): v for n, v in constants.items()})
        ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages}).asm["ptx"]
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
            f.write(ptx)
            f.flush()
            log = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", f.name, "-o", "/dev/null"],
                                 capture_output=True, text=True, check=True).stderr
        return {"tensor_cores": bool(re.search(r"\b(w?gmma|mma)\.", ptx)),
                "registers": int(re.search(r"Used (\d+) registers", log).group(1)),
                "spill_bytes": sum(int(n) for n in re.findall(r"(\d+) bytes spill", log))}

    # The weight formats of moe_gemm: dense (no statistics), int8 rows, double-quantized 4-bit blocks.
    no_statistics = dict(b_scale=None, b_up_scale=None, b_nested=None, b_up_nested=None, b_offset=None,
                         b_up_offset=None, code=None, nested_code=None)
    QUANTIZED_FLAGS = {
        "dense": dict(no_statistics, FORMAT=moe_gemm.DENSE, NESTED=False, QBLOCK=1),
        "int8": dict(b_nested=None, b_up_nested=None, b_offset=None, b_up_offset=None, code=None, nested_code=None,
                     FORMAT=moe_gemm.INT8_ROWS, NESTED=False, QBLOCK=1),
        "nf4": dict(FORMAT=moe_gemm.BLOCKWISE_4BIT, NESTED=True, QBLOCK=64),
    }
    QUANTIZED_TYPES = {
        "int8": {"b": "*i8", "b_up": "*i8", "b_scale": "*fp32", "b_up_scale": "*fp32"},
        "nf4": {"b": "*u8", "b_up": "*u8", "b_scale": "*u8", "b_up_scale": "*u8", "code": "*fp32", "nested_code": "*fp32",
                **{p: "*fp32" for p in ("b_nested", "b_up_nested", "b_offset", "b_up_offset")}},
    }
    # A sample weight of each kind, for the launcher's choice of tiles.
    WEIGHT_KINDS = {"dense": None, "int8": moe_gemm.Int8Rows(None, None),
                    "nf4": moe_gemm.Blockwise4Bit(None, None, None, (1, 1), 64)}
    pointers = ["a_hs", "b_hs", "a_rw", "b_rw"]
    norms = ["a_hs_inv_norm", "b_hs_inv_norm", "a_rw_inv_norm", "b_rw_inv_norm", "out"]
    cases = {}
    for element, precision in (("fp32", "tf32x3"), ("fp32", "ieee"), ("fp32", "tf32"), ("bf16", None)):
        block_a, block_b, block_k, num_warps = combined_cosine._tile_config(element == "bf16")  # what the launcher runs
        types = {**{p: "*" + element for p in pointers}, **{p: "*fp32" for p in norms},
                 "alpha": "fp32", "block_offset_b": "i32", "block_offset_a": "i32"}
        constants = dict(BLOCK_A=block_a, BLOCK_B=block_b, BLOCK_K=block_k, HS_PRECISION=precision,
                         RW_PRECISION=precision, HS_UPCAST=False, RW_UPCAST=False, NAN_AS_NEG_INF=True)
        cases[f"combined_cosine {element} {precision or ''}".strip()] = compile_report(
            combined_cosine._combined_cosine_kernel, types, constants, num_warps, combined_cosine.NUM_STAGES)
    for n_experts in (8, 60, 64, 160, 256):
        block_b, block_e = gather_router_softmax._block_sizes(4096, n_experts)
        types = {"first_logits": "*bf16", "pointer_table": "*i64", "stride_table": "*i64", "rows": "*i64",
                 "out": "*fp32", "block_offset": "i32", "layer_offset": "i32"}
        for from_table in (True, False):  # False: the encoder's per-layer call, no pointer table
            constants = dict(FROM_TABLE=from_table, BLOCK_B=block_b, BLOCK_E=block_e)
            if not from_table:
                constants.update(pointer_table=None, stride_table=None)
            cases[f"gather_router_softmax E={n_experts}{'' if from_table else ' one layer'}"] = compile_report(
                gather_router_softmax._gather_router_softmax_kernel, types, constants, 4)
    # Fused MoE: every variant the experts path launches, with every tiling the shipped table holds.
    for element in ("bf16", "fp16"):
        shipped = {json.dumps(c, sort_keys=True) for rows in fused_moe.config_table().values() for _, c in rows}
        shipped |= {json.dumps(c, sort_keys=True) for c in (fused_moe.DEFAULT_CONFIG, fused_moe.SMALL_BATCH_CONFIG)}
        for tiles_name in sorted(shipped):
            tiles = json.loads(tiles_name)
            options = (tiles.pop("num_warps"), tiles.pop("num_stages"))
            for step, flags in (("gate_up", dict(GATED=True, GATHER_A=True, SCATTER_C=False, WEIGHTED=True)),
                                ("down", dict(GATED=False, GATHER_A=False, SCATTER_C=True, WEIGHTED=True)),
                                ("shared down", dict(GATED=False, GATHER_A=False, SCATTER_C=True, WEIGHTED=False))):
                for weights in ("dense", "int8", "nf4"):
                    if weights != "dense" and step == "shared down":
                        continue  # quantized layers run routed experts only
                    launched = fused_moe.tiles_for_weights(dict(tiles, num_warps=0, num_stages=0), WEIGHT_KINDS[weights])
                    launched = {key: value for key, value in launched.items() if key in tiles}
                    step_flags = dict(flags, UPCAST=False, stride_bk=1, NESTED_BLOCK=256, **launched, **QUANTIZED_FLAGS[weights])
                    if step == "gate_up":  # the gate_up launch passes no weights
                        step_flags.update(WEIGHTED=False, pair_weights=None)
                    if not step_flags["WEIGHTED"]:
                        step_flags["pair_weights"] = None
                    types = {**{p: "*" + element for p in ("a", "c")}, "sorted_pairs": "*i32",
                             "expert_of_block": "*i32", "padded_total": "*i32", "pair_weights": "*fp32",
                             **QUANTIZED_TYPES.get(weights, {p: "*" + element for p in ("b", "b_up")}),
                             **{p: "i32" for p in ("n_cols", "k_dim", "n_pairs", "top_k", "max_blocks")}}
                    name = f"moe_gemm {step} {element} {tiles_name}" + ("" if weights == "dense" else f" {weights}")
                    cases[name] = compile_report(moe_gemm._moe_gemm_kernel, types, step_flags, *options)
        types = {"rows": "*" + element, "shared": "*" + element, "out": "*" + element}
        cases[f"moe_sum {element}"] = compile_report(moe_sum._moe_sum_kernel, types, dict(TOP_K=8, HAS_SHARED=True, BLOCK_N=1024), 4)
    types = {"expert_of_pair": "*i64", "counts": "*i32", "rank_of_pair": "*i32", "padded_start": "*i32",
             "sorted_pairs": "*i32", "padded_total": "*i32", "expert_of_block": "*i32", "n_pairs": "i32", "n_experts": "i32",
             "max_blocks": "i32"}
    cases["moe_align count"] = compile_report(moe_align._count_kernel, types, dict(BLOCK=1024), 4)
    cases["moe_align offsets E=160"] = compile_report(moe_align._offsets_kernel, types, dict(BLOCK_M=64, BLOCK_E=256, BLOCK_BLOCKS=16), 8)
    cases["moe_align scatter"] = compile_report(moe_align._scatter_kernel, types, dict(BLOCK=1024), 4)
    for element in ("bf16", "fp16"):
        for width in (2048, 4096):
            for residual in (False, True):
                types = {p: "*" + element for p in ("x", "residual", "weight", "out", "residual_out")}
                flags = dict(ADD_RESIDUAL=residual, BLOCK=width, stride_residual=0, stride_residual_out=0)
                if not residual:
                    flags.update(residual=None, residual_out=None)
                else:
                    flags = dict(ADD_RESIDUAL=True, BLOCK=width)
                cases[f"rms_norm {element} H={width}{' + residual' if residual else ''}"] = compile_report(
                    rms_norm._rms_norm_kernel, {**types, "eps": "fp32"}, flags, 4 if width <= 4096 else 8)
        types = {"x": "*" + element, "cos": "*" + element, "sin": "*" + element, "n_heads": "i32"}
        cases[f"rotary {element} D=128"] = compile_report(rotary._rotary_kernel, types, dict(HALF=64, BLOCK_H=16, BLOCK_D=64), 4)
    print(json.dumps(cases))
""")


@pytest.fixture(scope="module")
def sm90_reports():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=1200)
    if result.returncode != 0 and "ptxas" in result.stderr and "No such file" in result.stderr:
        pytest.skip("this triton install has no ptxas to assemble for sm_90")
    assert result.returncode == 0, result.stderr[-3000:]
    reports = json.loads(result.stdout.strip().splitlines()[-1])
    print(json.dumps(reports, indent=1))
    return reports


def test_cosine_kernels_use_tensor_cores_except_at_ieee_precision(sm90_reports):
    assert sm90_reports["combined_cosine fp32 tf32x3"]["tensor_cores"]
    assert sm90_reports["combined_cosine fp32 tf32"]["tensor_cores"]
    assert sm90_reports["combined_cosine bf16"]["tensor_cores"]
    assert not sm90_reports["combined_cosine fp32 ieee"]["tensor_cores"]


def test_fused_moe_gemms_use_tensor_cores(sm90_reports):
    gemms = [name for name in sm90_reports if name.startswith("moe_gemm")]
    assert len(gemms) >= 12 + 16 and sum(name.endswith((" int8", " nf4")) for name in gemms) == 16
    for name in gemms:
        assert sm90_reports[name]["tensor_cores"], name


def test_no_kernel_spills_registers_on_sm90(sm90_reports):
    assert len(sm90_reports) >= 14 + 12 + 16 + 2 + 3 + 10 and sum("one layer" in name for name in sm90_reports) == 5
    for name, report in sm90_reports.items():
        assert report["spill_bytes"] == 0, f"{name}: {report}"
        assert 0 < report["registers"] <= 255, f"{name}: {report}"
