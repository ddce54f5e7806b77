"""Ahead-of-time compilation of the shipped Triton kernel configurations for real GPUs,
without a GPU: `triton.compile` for sm_80 and sm_90, then registers, stack (spills), local and
shared memory read from the cubin with the cuobjdump inside the triton wheel. Used by the tests
(shipped configs must not spill) and by `cptfast doctor`.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

ARCHITECTURES = (80, 90)
# Most shared memory one block may use (opt-in maximum): A100 (sm_80) and H100 (sm_90).
MAX_SHARED_BYTES = {80: 166912, 90: 232448}
_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


@dataclass
class CompiledKernel:
    name: str
    arch: int
    registers: int
    stack_bytes: int   # spills land on the stack
    local_bytes: int
    shared_bytes: int  # shared memory a launch needs (Triton's dynamic allocation)
    ptx: str

    def line(self) -> str:
        return (f"{self.name:<56} sm_{self.arch}: {self.registers:>3} registers, "
                f"{self.stack_bytes} B stack, {self.local_bytes} B local, "
                f"{self.shared_bytes} B shared")


def shipped_specs() -> list[dict]:
    """Every shipped configuration of every kernel module."""
    from cptfast.kernels import attention, cross_entropy, fused_linear_cross_entropy, rope
    return (cross_entropy.aot_specs() + fused_linear_cross_entropy.aot_specs()
            + attention.aot_specs() + rope.aot_specs())


def cuobjdump() -> Path:
    import triton
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        raise FileNotFoundError(f"{path}: cuobjdump not found in the triton wheel")
    return path


def compile_triton(spec: dict, arch: int):
    """What ``triton.compile`` returns for one shipped configuration on sm_``arch`` (its
    ``asm`` holds the ttir, ttgir, llir, ptx and cubin)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # Argument names Triton may assume are multiples of 16 (it specializes on that at run
    # time); by default the pointers, which torch allocates 16-byte aligned.
    aligned = spec.get("aligned", [n for n, t in spec["signature"].items() if t.startswith("*")])
    attrs = {(spec["fn"].arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    source = ASTSource(fn=spec["fn"], signature=spec["signature"],
                       constexprs=spec["constexprs"], attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": spec["num_warps"],
                                   "num_stages": spec.get("num_stages", 3)})


def compile_spec(spec: dict, arch: int) -> CompiledKernel:
    compiled = compile_triton(spec, arch)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        report = subprocess.run([str(cuobjdump()), "--dump-resource-usage", cubin.name],
                                capture_output=True, text=True, check=True).stdout
    found = _USAGE.search(report)
    if found is None:
        raise RuntimeError(f"no resource usage for {spec['name']} in:\n{report}")
    registers, stack, static_shared, local = map(int, found.groups())
    shared = max(static_shared, compiled.metadata.shared)
    return CompiledKernel(spec["name"], arch, registers, stack, local, shared,
                          compiled.asm["ptx"])


def compile_all(architectures=ARCHITECTURES) -> list[CompiledKernel]:
    """Compile every shipped configuration for every architecture, in a fresh process when the
    current one runs Triton's interpreter (whose kernels cannot be compiled)."""
    import json
    import os
    import sys

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return [compile_spec(spec, arch) for spec in shipped_specs() for arch in architectures]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    output = subprocess.run(
        [sys.executable, "-m", "cptfast.aot", *map(str, architectures)], env=env,
        capture_output=True, text=True, check=False)
    if output.returncode != 0:
        raise RuntimeError(f"ahead-of-time compilation failed:\n{output.stderr[-4000:]}")
    return [CompiledKernel(**entry) for entry in json.loads(output.stdout)]


if __name__ == "__main__":
    import dataclasses
    import json
    import sys

    archs = [int(a) for a in sys.argv[1:]] or list(ARCHITECTURES)
    print(json.dumps([dataclasses.asdict(k) for k in compile_all(archs)]))
from cptfast.perf_model import analyze  # noqa: E402,F401
