"""`cptfast doctor`: the environment, and the GPU-readiness report that works without a GPU —
every shipped Triton kernel configuration compiled ahead of time for sm_80 and sm_90, with its
registers, spills and shared memory. Exit status 1 if a configuration fails or spills."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil


def environment() -> list[tuple[str, str]]:
    import torch

    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    rows = [("python", platform.python_version()), ("platform", platform.platform()),
            ("cptfast", version("cptfast")), ("torch", torch.__version__),
            ("triton", version("triton")), ("transformers", version("transformers")),
            ("flash-attn", version("flash-attn")),
            ("CUDA (torch build)", str(torch.version.cuda)),
            ("nvcc", shutil.which("nvcc") or "not on PATH"),
            ("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "unset"))]
    try:
        from cptfast._ext import extension
        rows.append(("extension cptfast._C", "built, with CUDA" if extension().has_cuda
                     else "built, CPU only"))
    except ImportError as error:
        rows.append(("extension cptfast._C", f"missing: {error}"))
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            rows.append((f"cuda:{index}", f"{props.name}, sm_{props.major}{props.minor}, "
                                          f"{props.total_memory / 2**30:.0f} GiB"))
    else:
        rows.append(("devices", "no CUDA device: the CPU paths run; Triton kernels are checked "
                                "ahead of time below"))
    return rows


def run(compile_kernels: bool = True) -> int:
    for name, value in environment():
        print(f"{name:<22} {value}")
    if not compile_kernels:
        return 0
    from cptfast.aot import ARCHITECTURES, MAX_SHARED_BYTES, compile_all

    print(f"\nahead-of-time compilation of every shipped kernel configuration for "
          f"{', '.join(f'sm_{a}' for a in ARCHITECTURES)}:")
    try:
        kernels = compile_all()
    except Exception as error:  # the report must say why, not crash
        print(f"FAILED: {error}")
        return 1
    bad = [k for k in kernels if k.stack_bytes or k.local_bytes
           or k.shared_bytes > MAX_SHARED_BYTES[k.arch]]
    for kernel in kernels:
        print(("  SPILLS " if kernel in bad else "  ") + kernel.line())
    print(f"\n{len(kernels)} configurations, {len(bad)} with spills or too much shared memory")
    return 1 if bad else 0
