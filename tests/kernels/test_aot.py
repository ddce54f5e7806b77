"""Every shipped Triton kernel configuration compiles ahead of time for sm_80 and sm_90 (no
GPU needed) and does not spill."""

import pytest

from cptfast.aot import ARCHITECTURES, MAX_SHARED_BYTES, compile_all, shipped_specs


@pytest.fixture(scope="module")
def compiled():
    return {(k.name, k.arch): k for k in compile_all()}


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("name", [spec["name"] for spec in shipped_specs()])
def test_shipped_config_compiles_without_spills(compiled, name, arch):
    kernel = compiled[(name, arch)]
    print(kernel.line())
    assert kernel.stack_bytes == 0 and kernel.local_bytes == 0, kernel.line()
    assert 0 < kernel.registers <= 255
    assert kernel.shared_bytes <= MAX_SHARED_BYTES[arch], "the launch would fail on the GPU"
    assert f".target sm_{arch}" in kernel.ptx
    tensor_core_kernel = name.startswith(("fused_linear_ce", "attention"))
    if tensor_core_kernel and arch == 90:
        assert "wgmma" in kernel.ptx, "this kernel should use Hopper tensor cores (wgmma)"
        if name.startswith("attention_forward"):  # both QK^T and PV
            assert kernel.ptx.count("wgmma.mma_async") >= 2, kernel.line()
