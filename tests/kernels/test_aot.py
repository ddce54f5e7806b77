"""What ships is what runs: every shipped Triton kernel configuration is the launch a wrapper
makes, specialised by Triton's own runtime rules; it compiles ahead of time for sm_80 and sm_90
(no GPU needed) and does not spill; every configuration a launch_config can return ships."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from cptfast.aot import (MAX_SHARED_BYTES, compile_all, launch_configs,
                         missing_configs, shipped_table)

SHIPPED = shipped_table()  # (computed in a process without the interpreter)


@pytest.fixture(scope="module")
def compiled():
    return {(k.name, k.arch): k for k in compile_all()}


@pytest.mark.parametrize("name,arch", [(entry["name"], arch) for entry in SHIPPED
                                       for arch in entry["archs"]])
def test_shipped_config_compiles_without_spills(compiled, name, arch):
    kernel = compiled[(name, arch)]
    print(kernel.line())
    assert kernel.stack_bytes == 0 and kernel.local_bytes == 0, kernel.line()
    assert 0 < kernel.registers <= 255
    assert kernel.shared_bytes <= MAX_SHARED_BYTES[arch], "the launch would fail on the GPU"
    assert f".target sm_{arch}" in kernel.ptx
    half_precision = "[bf16" in name or "[fp16" in name
    tensor_core_kernel = name.startswith(("fused_linear_ce", "attention"))
    if tensor_core_kernel and half_precision and arch == 90:
        assert "wgmma" in kernel.ptx, "this kernel should use Hopper tensor cores (wgmma)"
        if name.startswith("attention_forward"):  # both QK^T and PV
            assert kernel.ptx.count("wgmma.mma_async") >= 2, kernel.line()


def test_every_launch_config_ships():
    assert missing_configs(SHIPPED) == []
    # The check can fail: drop the shipped variants of one configuration and it is named.
    kernel = "rope_kernel"  # head dim 16 (BLOCK_HALF 8): the demo model's
    kept = [e for e in SHIPPED if not (e["kernel"] == kernel
                                       and e["constants"]["BLOCK_HALF"] == 8)]
    expected = [f"{kernel} {c} sm_{a}" for k, c, a in launch_configs()
                if k == kernel and c["BLOCK_HALF"] == 8]
    assert expected and missing_configs(kept) == expected
    # An architecture's tiles must ship for it: the attention forwards at D = 128 compiled for
    # sm_90 only leave every sm_80 configuration at D = 128 missing.
    arch_only = [dict(e, archs=[90]) if e["name"].startswith("attention_forward[")
                 and "D=128" in e["name"] else e for e in SHIPPED]
    assert [m for m in missing_configs(arch_only) if m.startswith("attention_forward")] == [
        f"attention_forward_kernel {c} sm_80" for k, c, a in launch_configs()
        if k == "attention_forward_kernel" and a == 80 and c["BLOCK_D"] == 128]


def test_names_are_unique_and_say_the_dtype():
    names = [entry["name"] for entry in SHIPPED]
    assert len(names) == len(set(names))
    assert all(any(f"[{d}," in n or f"[{d}]" in n for d in ("bf16", "fp16", "fp32"))
               for n in names)


# A user's calls through the public API (cptfast.ops, Triton forced) on real, contiguous CPU
# tensors at representative shapes, with Triton's launch recorded instead of run; each launch
# specialised for sm_90 by Triton's runtime rules. Runs without the interpreter.
RUNTIME_CALLS = textwrap.dedent("""
    import dataclasses, json, torch
    import cptfast
    from cptfast import ops
    from cptfast.aot import recorded_launches, specialize
    torch.manual_seed(0)
    bf16 = torch.bfloat16
    def ce():
        logits = torch.randn(16, 32000, dtype=bf16, requires_grad=True)
        cptfast.cross_entropy(logits, torch.randint(0, 32000, (16,))).backward()
    def ce_softcap_fp32():
        logits = torch.randn(16, 50257, requires_grad=True)  # GPT-2: not a multiple of 16
        cptfast.cross_entropy(logits, torch.randint(0, 50257, (16,)), softcap=30.0).backward()
    def fused_loss():  # training (chunked: cuBLAS + the cross-entropy kernel), then eval (tiles)
        hidden = torch.randn(64, 2048, dtype=bf16, requires_grad=True)
        weight = torch.randn(2048, 2048, dtype=bf16, requires_grad=True)
        labels = torch.randint(0, 2048, (64,))
        cptfast.fused_linear_cross_entropy(hidden, weight, labels).backward()
        with torch.no_grad():
            cptfast.fused_linear_cross_entropy(hidden, weight, labels)
    def attention(head_dim, dtype=bf16, **options):
        q = torch.randn(96, 32, head_dim, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(96, 8, head_dim, dtype=dtype, requires_grad=True) for _ in "kv")
        cu_seqlens = torch.tensor([0, 1, 40, 96], dtype=torch.int32)
        cptfast.varlen_attention(q, k, v, cu_seqlens, 56, **options).sum().backward()
    def rope(heads, head_dim, dtype=bf16):
        q = torch.randn(24, heads, head_dim, dtype=dtype, requires_grad=True)
        k = torch.randn(24, heads, head_dim, dtype=dtype, requires_grad=True)
        angles = torch.randn(24, head_dim)
        q2, k2 = ops.apply_rotary_(q * 1, k * 1, angles.cos(), angles.sin())
        (q2.sum() + k2.sum()).backward()
    calls = {"ce": ce, "ce_softcap_fp32": ce_softcap_fp32, "fused_loss": fused_loss,
             "attention_d128": lambda: attention(128),
             "attention_d64_fp16_window": lambda: attention(64, torch.float16, window=256,
                                                            softcap=50.0),
             "attention_d256": lambda: attention(256),
             "rope_d16_h1": lambda: rope(1, 16),
             "rope_d128_h32": lambda: rope(32, 128, torch.float32)}
    out = {}
    for name, call in calls.items():
        with recorded_launches() as launches:
            call()
        out[name] = [dataclasses.asdict(specialize(launch, 90)[0]) for launch in launches]
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def runtime_launches():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CPTFAST_BACKEND"] = "triton"
    done = subprocess.run([sys.executable, "-c", RUNTIME_CALLS], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


def shipped_entry(spec: dict) -> dict | None:
    """The shipped configuration with exactly this runtime specialisation, if any."""
    for entry in SHIPPED:
        if (entry["kernel"] == spec["kernel"] and entry["signature"] == dict(spec["signature"])
                and entry["constants"] == dict(spec["constants"])
                and entry["divisible"] == list(spec["divisible"])
                and (entry["num_warps"], entry["num_stages"])
                == (spec["num_warps"], spec["num_stages"])):
            return entry
    return None


@pytest.mark.parametrize("call", ["ce", "ce_softcap_fp32", "fused_loss", "attention_d128",
                                  "attention_d64_fp16_window", "attention_d256", "rope_d16_h1",
                                  "rope_d128_h32"])
def test_aot_variant_equals_the_runtime_one(runtime_launches, call):
    launches = runtime_launches[call]
    expected = {"ce": 1, "ce_softcap_fp32": 1, "fused_loss": 2, "attention_d128": 3,
                "attention_d64_fp16_window": 3, "attention_d256": 4, "rope_d16_h1": 2,
                "rope_d128_h32": 2}[call]
    assert len(launches) >= expected
    for spec in launches:
        assert shipped_entry(spec) is not None, (
            f"{call}: Triton's runtime would compile a variant the doctor does not check: {spec}")


def test_runtime_specialisation_is_not_the_hand_typed_one(runtime_launches):
    # What the hand-typed signatures got wrong: unit strides and heads == 1 are constants,
    # sizes that are multiples of 16 are marked divisible.
    tile = next(s for s in runtime_launches["fused_loss"]
                if s["kernel"] == "fused_linear_cross_entropy_forward_kernel")
    constants = dict(tile["constants"])
    assert constants["stride_hh"] == 1 and constants["stride_wh"] == 1
    assert {"vocab", "hidden_size", "stride_hn", "stride_wv", "n_rows"} <= set(tile["divisible"])
    rope = runtime_launches["rope_d16_h1"][0]
    assert dict(rope["constants"])["heads"] == 1
    ce = runtime_launches["ce"][0]
    assert {"vocab", "row_stride"} <= set(ce["divisible"])
