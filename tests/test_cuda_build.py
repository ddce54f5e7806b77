"""CUDA code compiles for the GPUs we ship to (sm_80, sm_90) wherever nvcc is installed.

Nothing compiled here can run without a GPU; the logic it shares with the CPU build lives in
host/device headers that the CPU tests exercise.
"""

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc")
SOURCES = sorted((ROOT / "csrc").glob("*.cu")) + sorted((ROOT / "tests" / "csrc").glob("*.cu"))


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_cuda_sources_compile(tmp_path, source, arch):
    compute = arch.replace("sm_", "compute_")
    result = subprocess.run(
        [NVCC, "-std=c++17", "-O3", f"-I{ROOT / 'csrc'}", f"-gencode=arch={compute},code={arch}",
         "-Werror=all-warnings", "-c", str(source), "-o", str(tmp_path / "out.o")],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out.o").stat().st_size > 0


def test_bindings_compile_with_the_cuda_branch():
    # The CUDA-only part of bindings.cpp is never built on a CPU machine; check it compiles.
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    includes = [f"-I{p}" for p in [ROOT / "csrc", sysconfig.get_paths()["include"], *include_paths()]]
    result = subprocess.run(
        [compiler, "-std=c++17", "-fsyntax-only", "-DCPTFAST_WITH_CUDA=1", *includes,
         str(ROOT / "csrc" / "bindings.cpp")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def setup_gencode() -> list[str]:
    """setup.py's NVCC_GENCODE, read from its source (importing setup.py would run setup())."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "NVCC_GENCODE":
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py defines no NVCC_GENCODE")


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
def test_the_extension_carries_sass_for_a100_h100_and_ptx_for_later_gpus(tmp_path):
    from cptfast.aot import cuobjdump as triton_cuobjdump

    cuobjdump = shutil.which("cuobjdump") or str(triton_cuobjdump())  # the triton wheel has one
    source = ROOT / "csrc" / "expand_batch.cu"
    result = subprocess.run([NVCC, "-std=c++17", "-O3", f"-I{ROOT / 'csrc'}", *setup_gencode(),
                             "-c", str(source), "-o", str(tmp_path / "out.o")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    elf = subprocess.run([cuobjdump, "--list-elf", str(tmp_path / "out.o")],
                         capture_output=True, text=True).stdout
    ptx = subprocess.run([cuobjdump, "--list-ptx", str(tmp_path / "out.o")],
                         capture_output=True, text=True).stdout
    assert "sm_80" in elf and "sm_90" in elf, elf
    assert "sm_90" in ptx or "compute_90" in ptx, ptx  # the PTX the driver JITs on newer GPUs
