"""Build script for cptfast: the Python packages plus the C++/CUDA extension ``cptfast._C``.

The extension is compiled against the torch that is already installed, so torch must be
installed first and the build run without isolation:

    pip install torch==2.13.0+cpu        # or any CUDA build of torch
    pip install --no-build-isolation -e .

``CPTFAST_CUDA=0|1`` forces the CUDA sources off or on; by default they are built when torch is
a CUDA build and nvcc is found.
"""

import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# SASS for the GPUs we tune for (A100, H100) and the PTX of the newest, which the driver compiles
# for any later GPU (Blackwell and on) when the extension is first loaded there.
NVCC_GENCODE = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                "-gencode=arch=compute_90,code=compute_90"]


def _want_cuda(torch_cuda: str | None, cuda_home: str | None) -> bool:
    forced = os.environ.get("CPTFAST_CUDA")
    if forced not in (None, "", "0", "1"):
        raise SystemExit(f"CPTFAST_CUDA must be 0 or 1, got {forced!r}")
    have_toolchain = torch_cuda is not None and (cuda_home is not None or shutil.which("nvcc"))
    if forced == "1" and not have_toolchain:
        raise SystemExit(
            "CPTFAST_CUDA=1 but the installed torch is a CPU build or nvcc was not found "
            f"(torch.version.cuda={torch_cuda!r}, CUDA_HOME={cuda_home!r}); install a CUDA build "
            "of torch and the CUDA toolkit, or unset CPTFAST_CUDA"
        )
    return bool(have_toolchain) if forced in (None, "") else forced == "1"


def _extension_and_cmdclass():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        raise SystemExit(
            "cptfast compiles its C++ extension against your installed torch, and none was found "
            "in the build environment. Install torch first (CPU: `pip install torch==2.13.0+cpu "
            "--index-url https://download.pytorch.org/whl/cpu`), then build with "
            "`pip install --no-build-isolation .` so the build sees it."
        ) from None

    def rel(paths):
        return sorted(os.path.relpath(p, ROOT) for p in paths)

    cpp_sources = rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
    cuda_sources = rel(glob.glob(os.path.join(ROOT, "csrc", "*.cu")))
    use_cuda = bool(cuda_sources) and _want_cuda(torch.version.cuda, cpp_extension.CUDA_HOME)

    cxx_flags = ["-O3", "-std=c++17", "-fvisibility=hidden"]
    kwargs = dict(
        name="cptfast._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=[("CPTFAST_WITH_CUDA", "1" if use_cuda else "0")],
    )
    if use_cuda:
        nvcc_flags = ["-O3", "-std=c++17", *NVCC_GENCODE]
        ext = cpp_extension.CUDAExtension(
            sources=cpp_sources + cuda_sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, **kwargs)
    else:
        ext = cpp_extension.CppExtension(
            sources=cpp_sources, extra_compile_args={"cxx": cxx_flags}, **kwargs)
    build_ext = cpp_extension.BuildExtension.with_options(
        use_ninja=shutil.which("ninja") is not None)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extension_and_cmdclass()

setup(
    packages=["cptfast", "cptfast.data", "cptfast.kernels", "cptfast.training"],
    # Triton kernels live in the top-level kernels/ folder but install as cptfast.kernels.
    package_dir={"cptfast": "cptfast", "cptfast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
