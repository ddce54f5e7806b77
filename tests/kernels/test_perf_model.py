"""The static performance model (cptfast.perf_model) against kernels whose speed is known, and
its parts against hand-counted SASS."""

import pytest

from cptfast import perf_model
from cptfast.aot import ARCHITECTURES, calibration_records, shipped_records

REQUIRED = ("kernel", "config", "head_dim", "arch", "registers", "spill_bytes", "shared_bytes",
            "tensor_ops", "bound_fraction", "duplicated_fraction", "occupancy")


@pytest.fixture(scope="module")
def calibration():
    return {(r["kernel"].split("[")[1].rstrip("]"), r["arch"]): r
            for r in calibration_records()}


@pytest.mark.parametrize("arch", [f"sm_{a}" for a in ARCHITECTURES])
def test_model_ranks_the_calibration_kernels(calibration, arch):
    good = calibration[("bf16,128x128x64,stages=4", arch)]
    bad = calibration[("bf16,16x16x16,stages=1", arch)]
    copy = calibration[("bf16", arch)]
    # The tutorial tiling is cuBLAS-class: tensor-bound, no duplicated work.
    assert good["kind"] == "tensor" and good["limiter"] == "tensor"
    assert good["bound_fraction"] >= 0.8 and good["duplicated_fraction"] == 0
    # 16 x 16 tiles: the tensor cores idle behind the loads and shared-memory traffic.
    assert bad["kind"] == "tensor" and bad["limiter"] != "tensor"
    assert 0 < bad["bound_fraction"] <= 0.35
    assert good["bound_fraction"] >= 3 * bad["bound_fraction"]
    # A copy has no tensor work: judged by memory, which is what limits it.
    assert copy["kind"] == "memory" and copy["limiter"] == "memory"
    assert copy["tensor_ops"] == {} and copy["bound_fraction"] >= 0.8
    if arch == "sm_90":
        assert any(op.startswith("HGMMA.64x128x16") for op in good["tensor_ops"])
    else:
        assert set(good["tensor_ops"]) == {"HMMA.16816.F32.BF16"}


def test_shipped_records_have_the_documented_fields():
    records = shipped_records("attention_forward[bf16,D=128,sm_")  # each arch its own tiles
    assert {r["arch"] for r in records} == {"sm_80", "sm_90"}
    for record in records:
        assert all(key in record for key in REQUIRED), set(REQUIRED) - set(record)
        assert record["head_dim"] == 128 and record["kind"] == "tensor"
        assert record["config"]["BLOCK_D"] == 128 and record["spill_bytes"] == 0
        assert 0 < record["bound_fraction"] <= 1 and 0 <= record["duplicated_fraction"] < 1
        assert 0 < record["occupancy"] <= 1 and record["peer_fraction"] > 0.5
        assert record["peer"].startswith("FlashAttention")


# Issue 17's bars for attention (bf16, D = 128) as the static model reads them: on sm_90 the
# forward at 0.60 of peak at least, dq and dk/dv at 0.55, all on wgmma; on both architectures
# no tensor work done twice (on sm_80: warps split along queries only, no key-split layout).
# A property of the compiled code, not a timing.
ATTENTION_BARS = {"attention_forward": 0.60, "attention_backward_dq": 0.55,
                  "attention_backward_dkdv": 0.55}


@pytest.fixture(scope="module")
def attention_bf16_d128():
    return [r for kernel in ATTENTION_BARS for r in shipped_records(f"{kernel}[bf16,D=128")
            if "softcap" not in r["kernel"]]


@pytest.mark.parametrize("kernel", sorted(ATTENTION_BARS))
def test_attention_reaches_its_bars(attention_bf16_d128, kernel):
    records = [r for r in attention_bf16_d128 if r["kernel"].startswith(kernel + "[")]
    assert {r["arch"] for r in records} == {"sm_80", "sm_90"}
    for record in records:
        assert record["spill_bytes"] == 0 and record["duplicated_fraction"] == 0, record
        if record["arch"] == "sm_90":
            assert record["bound_fraction"] >= ATTENTION_BARS[kernel], record
            assert all(op.startswith("HGMMA") for op in record["tensor_ops"]), record


# Hand-written SASS: a prologue, a loop of 10 instructions (one never runs: @!PT), an exit.
SASS = """
        Function : toy_kernel
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
        /*0020*/                   HGMMA.64x64x16.F32.BF16 gdesc[UR4], RZ, !UPT ;
        /*0030*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0040*/                   FFMA R2, R3, R4, R2 ;
        /*0050*/                   MUFU.EX2 R5, R6 ;
        /*0060*/                   LDS.128 R8, [R0] ;
        /*0070*/                   LDG.E.U16 R9, desc[UR6][R2.64] ;
        /*0080*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR6][R4.64] ;
        /*0090*/              @!PT LDS.128 R8, [R0] ;
        /*00a0*/                   SHFL.BFLY PT, R7, R6, 0x1, 0x1f ;
        /*00b0*/               @P0 BRA 0x20 ;
        /*00c0*/                   EXIT ;
"""


def test_parser_counts_the_hot_loop_by_class():
    instructions = perf_model.parse_sass(SASS)
    assert len(instructions) == 12  # the @!PT one is dropped
    [body] = perf_model.loops(instructions)
    assert [i.address for i in (body[0], body[-1])] == [0x20, 0xB0]
    counts = perf_model.count(body, num_warps=8)
    classes = counts["classes"]
    assert (classes["tensor"], classes["fp32"], classes["mufu"], classes["shared"],
            classes["global"], classes["async"], classes["shuffle"], classes["other"]) == \
        (2, 1, 1, 1, 1, 1, 1, 1)
    # HGMMA is issued once per warpgroup (8 warps = 2 of them), HMMA once per warp.
    assert counts["tensor_flops"]["16bit"] == 2 * 64 * 64 * 16 * 2 + 2 * 16 * 8 * 16 * 8
    assert counts["shared_bytes_per_warp"] == 32 * 16 + 32 * 16  # LDS.128 and LDGSTS.128
    assert counts["global_bytes_per_warp"] == 32 * 2 + 32 * 16   # LDG.U16 and LDGSTS.128


def test_occupancy_from_registers_and_shared_memory():
    h100 = perf_model.ARCHS[90]
    # 128 registers x 256 threads = 32768: two CTAs of 8 warps fill 16 of 64 warp slots.
    assert perf_model.occupancy(h100, 8, 128, 0) == {
        "ctas_per_sm": 2, "limited_by": "registers", "occupancy": 0.25}
    # 100 KiB of shared memory per CTA (+1 KiB reserved): two fit in 228 KiB.
    assert perf_model.occupancy(h100, 4, 32, 100 * 1024)["ctas_per_sm"] == 2
    # Registers round up to 256 per warp: 33 registers x 32 lanes = 1056 -> 1280.
    assert perf_model.occupancy(h100, 1, 33, 0)["ctas_per_sm"] == 32  # the CTA limit first
    assert perf_model.occupancy(h100, 32, 33, 0)["ctas_per_sm"] == 65536 // (1280 * 32)
