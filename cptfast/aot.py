"""Ahead-of-time compilation of the shipped Triton kernel configurations for real GPUs,
without a GPU, exactly as Triton's runtime would build them for our launches.

What ships is not typed by hand. ``shipped_kernels`` calls each kernel's own launch wrapper
(cptfast.kernels.*) at representative shapes on ``meta`` tensors (shapes and strides, no
memory) with Triton's launch recorded instead of run (``recorded_launches``). Each recorded
launch is specialised by Triton's own runtime rules — the binder ``JITFunction.run`` builds
(``create_function_from_signature``) and ``JITFunction._pack_args``, for the CUDA backend of the
target: integer arguments equal to 1 become constants, pointers and integers that are multiples
of 16 are marked divisible — and compiled with ``triton.compile`` for sm_80 and sm_90 (the
calls are recorded once per architecture, since attention picks its tiles per architecture; a
launch only one of them makes is compiled for that one and named after it). Then
registers, stack (spills), local and shared memory are read from the cubin with the cuobjdump
inside the triton wheel, and ``analyze`` (cptfast.perf_model) reads a static bound from its
SASS. Used by the tests (shipped configs must not spill; the AOT variant equals the runtime
one) and by ``cptfast doctor``.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import re
import subprocess
from dataclasses import dataclass, field

from cptfast.perf_model import analyze, cuobjdump, peer, resource_usage, useful_flops  # noqa: F401

ARCHITECTURES = (80, 90)
# Most shared memory one block may use (opt-in maximum): A100 (sm_80) and H100 (sm_90).
MAX_SHARED_BYTES = {80: 166912, 90: 232448}


@dataclass
class Launch:
    """One launch a wrapper made: ``fn[grid](*args, **kwargs)``."""
    fn: object  # the triton JITFunction
    grid: object
    args: tuple
    kwargs: dict


@contextlib.contextmanager
def recorded_launches():
    """Inside the block, Triton kernel launches are recorded in the yielded list, not run
    (so a wrapper can be called on meta or CPU tensors without a GPU; its outputs are left
    unwritten)."""
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []
    run = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, grid, args, dict(kwargs)))

    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = run


@dataclass(frozen=True)
class Specialization:
    """What Triton's runtime compiles for one launch on one architecture."""
    kernel: str          # the JITFunction's name
    signature: tuple     # (argument, type) pairs; "constexpr" for constants
    constants: tuple     # (argument, value): constexprs and arguments specialised to a constant
    divisible: tuple     # arguments marked multiples of 16 (tt.divisibility)
    num_warps: int
    num_stages: int


def specialize(launch: Launch, arch: int):
    """(Specialization, and the ASTSource / options triton.compile takes) of ``launch`` for
    sm_``arch``, by the rules of Triton's ``JITFunction.run``."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn, kwargs = launch.fn, dict(launch.kwargs)
    # The options JITFunction.run adds before binding.
    kwargs.setdefault("debug", fn.debug or knobs.runtime.debug)
    kwargs.setdefault("instrumentation_mode", knobs.compilation.instrumentation_mode)
    if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):
        kwargs.setdefault("fpsan_homomorphic_casts", knobs.compilation.fpsan_homomorphic_casts)
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound,
                                                          specialization, options)
    names = [p.name for p in fn.params]
    spec = Specialization(
        kernel=fn.__name__,
        signature=tuple(signature.items()),
        constants=tuple((names[path[0]], value) for path, value in sorted(constexprs.items())),
        divisible=tuple(names[path[0]] for path, value in sorted(attrs.items())
                        if ["tt.divisibility", 16] in value),
        num_warps=options.num_warps, num_stages=options.num_stages)
    return spec, ASTSource(fn, signature, constexprs, attrs), options


def _meta(*shape, dtype=None, requires_grad=False):
    import torch
    return torch.empty(shape, dtype=dtype or torch.float32, device="meta",
                       requires_grad=requires_grad)


# Representative shapes. Together they reach every configuration each launch_config can
# return (tests/kernels/test_aot.py checks), with the sizes of the models we serve, which
# decide Triton's specialisation (multiples of 16, unit strides, heads == 1).
CE_VOCABS = (64, 128, 256, 512, 1024, 2048, 32000, 50257)  # BLOCK_V 64 .. 4096; GPT-2 odd
ATTENTION_HEAD_DIMS = (16, 32, 64, 128, 256)         # padded; 80 and 96 run as 128
ROPE_HEADS = (32, 8, 4, 2, 1)                        # q or k heads: BLOCK_H 16 .. 1
ROWS = 8192                                          # tokens of a packed batch


def representative_calls():
    """(label, call) pairs; each call runs one kernel wrapper, forward and backward, on meta
    tensors, as a training (or evaluation) step would."""
    import torch

    from cptfast.kernels import attention, cross_entropy, fused_linear_cross_entropy, rope
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    calls = []
    for (name, dtype), vocab in ((d, v) for d in dtypes.items() for v in CE_VOCABS):
        labels = _meta(ROWS, dtype=torch.int64)
        for grad, softcap in ((True, None), (True, 30.0), (False, None)):
            label = f"{name},V={vocab}" + (",softcap" if softcap else "") + \
                ("" if grad else ",eval")
            calls.append((label, lambda dtype=dtype, vocab=vocab, labels=labels, grad=grad,
                          softcap=softcap: cross_entropy.cross_entropy(
                              _meta(ROWS, vocab, dtype=dtype, requires_grad=grad), labels,
                              softcap=softcap)))
    for name, dtype in dtypes.items():  # Llama-3-8B head: gradients (training), loss (eval)
        for softcap in (None, 30.0):
            def head(dtype=dtype, softcap=softcap):
                hidden = _meta(ROWS, 4096, dtype=dtype, requires_grad=True)
                weight = _meta(128256, 4096, dtype=dtype, requires_grad=True)
                labels = _meta(ROWS, dtype=torch.int64)
                loss = fused_linear_cross_entropy.fused_linear_cross_entropy(
                    hidden, weight, labels, softcap=softcap)
                loss.backward()
                with torch.no_grad():
                    fused_linear_cross_entropy.fused_linear_cross_entropy(
                        hidden, weight, labels, softcap=softcap)
            calls.append((f"{name},V=128256" + (",softcap" if softcap else ""), head))
    for (name, dtype), head_dim in ((d, h) for d in dtypes.items() for h in ATTENTION_HEAD_DIMS):
        for softcap, window in ((None, None), (50.0, 4096)):  # plain; Gemma-2 style
            def attend(dtype=dtype, head_dim=head_dim, softcap=softcap, window=window):
                q = _meta(ROWS, 32, head_dim, dtype=dtype, requires_grad=True)
                k, v = (_meta(ROWS, 8, head_dim, dtype=dtype, requires_grad=True)
                        for _ in range(2))
                cu_seqlens = _meta(9, dtype=torch.int32)
                out = attention.varlen_attention(q, k, v, cu_seqlens, 4096, window=window,
                                                 softcap=softcap)
                out.backward(torch.empty_like(out))
            calls.append((f"{name},D={head_dim}" + (",softcap,window" if softcap else ""),
                          attend))
    for (name, dtype), head_dim in ((d, h) for d in dtypes.items() for h in ATTENTION_HEAD_DIMS):
        for heads, dense in ((h, d) for h in ROPE_HEADS for d in (False, True)):
            # q and k with the same head count: one forward launch for both, one backward launch
            # per gradient, which is expanded (a sum's) or dense (a training step's).
            def rotate(dtype=dtype, head_dim=head_dim, heads=heads, dense=dense):
                q, k = (_meta(ROWS, heads, head_dim, dtype=dtype, requires_grad=True)
                        for _ in range(2))
                cos, sin = _meta(ROWS, head_dim), _meta(ROWS, head_dim)
                q_out, k_out = rope.apply_rotary_(q * 1, k * 1, cos, sin)
                if dense:
                    torch.autograd.backward((q_out, k_out),
                                            (torch.empty_like(q_out), torch.empty_like(k_out)))
                else:
                    (q_out.sum() + k_out.sum()).backward()
            calls.append((f"{name},D={head_dim},H={heads}" + (",dense_grad" if dense else ""),
                          rotate))
    return calls


# The calibration kernels (cptfast.kernels.calibration): label -> (matmul tiles, warps, stages)
# or None for the copy; the bound each must get is in tests/kernels/test_perf_model.py.
CALIBRATION = {"bf16,128x128x64,stages=4": ((128, 128, 64), 8, 4),
               "bf16,16x16x16,stages=1": ((16, 16, 16), 1, 1),
               "bf16": None}


def calibration_calls():
    """(label, call) of the kernels whose speed is known, on meta tensors (bf16, 8192^2)."""
    import torch

    from cptfast.kernels import calibration
    calls = []
    for label, setting in CALIBRATION.items():
        if setting is None:
            call = lambda: calibration.copy(_meta(1 << 26, dtype=torch.bfloat16))  # noqa: E731
        else:
            (m, n, k), warps, stages = setting
            call = lambda m=m, n=n, k=k, warps=warps, stages=stages: calibration.matmul(  # noqa: E731
                _meta(8192, 8192, dtype=torch.bfloat16), _meta(8192, 8192, dtype=torch.bfloat16),
                block_m=m, block_n=n, block_k=k, num_warps=warps, num_stages=stages)
        calls.append((label, call))
    return calls


@dataclass
class ShippedKernel:
    """One configuration that ships: a launch a wrapper makes at a representative shape, on
    the architectures whose tile table makes it (both, unless the name ends in ",sm_80" or
    ",sm_90")."""
    name: str       # e.g. "attention_forward[bf16,D=128,sm_90]"
    launch: Launch
    spec: Specialization = field(repr=False)  # for sm_90 (the same rules for sm_80)
    archs: tuple = ARCHITECTURES

    @property
    def constexprs(self) -> dict:
        return dict(self.spec.constants)


def _short(kernel: str) -> str:
    return kernel.removesuffix("_kernel").replace("fused_linear_cross_entropy", "fused_linear_ce")


def _variant(spec: Specialization) -> str:
    """The name suffix of the launches one call makes more than one of."""
    constants = dict(spec.constants)
    if constants.get("BACKWARD"):
        return ",backward"  # RoPE's transposed rotation
    if "WANT_DK" in constants and not (constants["WANT_DK"] and constants["WANT_DV"]):
        return ",dk" if constants["WANT_DK"] else ",dv"  # attention at D = 256
    return ""


def shipped_kernels(calls=None) -> list[ShippedKernel]:
    """Every distinct launch the representative calls (or ``calls``) make on each architecture
    (the wrappers choose their tiles per architecture: cptfast.kernels.attention's
    compile_target), named by kernel and call, in a process that is not running Triton's
    interpreter. A launch made on one architecture only has it in its name."""
    from cptfast.kernels.attention import compile_target

    found: dict[Specialization, tuple[str, Launch, list[int]]] = {}
    for label, call in calls or representative_calls():
        for arch in ARCHITECTURES:
            with compile_target(arch), recorded_launches() as launches:
                call()
            for launch in launches:
                spec, _, _ = specialize(launch, 90)
                if spec not in found:
                    found[spec] = (f"{_short(spec.kernel)}[{label}{_variant(spec)}", launch, [])
                found[spec][2].append(arch)
    kernels, names = [], set()
    for spec, (name, launch, archs) in found.items():
        archs = tuple(sorted(set(archs)))
        name += "]" if archs == ARCHITECTURES else "".join(f",sm_{a}" for a in archs) + "]"
        assert name not in names, f"two shipped variants named {name}"
        names.add(name)
        kernels.append(ShippedKernel(name, launch, spec, archs))
    return kernels


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


def launch_configs() -> list[tuple[str, dict, int]]:
    """(kernel, configuration, architecture) for every configuration each kernel's
    ``launch_config`` can return on each architecture over the inputs it accepts (vocabularies
    and hidden sizes up to 2^20, head dims up to 256, up to 128 heads)."""
    import torch

    from cptfast.kernels import attention, cross_entropy, fused_linear_cross_entropy, rope
    found = []

    def add(kernel, config, archs=ARCHITECTURES):
        for arch in archs:
            if (kernel, config, arch) not in found:
                found.append((kernel, config, arch))

    dtypes = (torch.bfloat16, torch.float16, torch.float32)
    for vocab, dtype in ((2 ** k, d) for k in range(21) for d in dtypes):  # next power of 2
        add("cross_entropy_forward_kernel", cross_entropy.launch_config(vocab, dtype))
    for hidden, dtype in ((2 ** k, d) for k in range(21) for d in dtypes):
        add("fused_linear_cross_entropy_forward_kernel",
            fused_linear_cross_entropy.launch_config(hidden, dtype))
    kernels = {"forward": ("attention_forward_kernel", {}),
               "dq": ("attention_backward_dq_kernel", {}),
               "dkdv": ("attention_backward_dkdv_kernel", {"WANT_DK": True, "WANT_DV": True}),
               "dk": ("attention_backward_dkdv_kernel", {"WANT_DK": True, "WANT_DV": False}),
               "dv": ("attention_backward_dkdv_kernel", {"WANT_DK": False, "WANT_DV": True})}
    for head_dim in range(1, 257):
        for dtype, arch in itertools.product(dtypes, ARCHITECTURES):
            for name, config in attention.launch_config(head_dim, dtype, arch).items():
                kernel, flags = kernels[name]
                add(kernel, {**config, **flags}, (arch,))
            add("backward_delta_kernel", attention._delta_config(head_dim, dtype))
        if head_dim % 2 == 0:
            for heads in range(1, 129):
                add("rope_kernel", rope.launch_config(heads, head_dim))
    return found


def missing_configs(table: list[dict] | None = None) -> list[str]:
    """The ``launch_configs`` no shipped configuration (``shipped_table``) compiles for their
    architecture."""
    table = shipped_table() if table is None else table
    missing = []
    for kernel, config, arch in launch_configs():
        if not any(entry["kernel"] == kernel and arch in entry["archs"] and all(
                entry[key] == value if key in ("num_warps", "num_stages")
                else entry["constants"].get(key) == value for key, value in config.items())
                for entry in table):
            missing.append(f"{kernel} {config} sm_{arch}")
    return missing


def compile_triton(kernel: ShippedKernel, arch: int):
    """What ``triton.compile`` returns for one shipped configuration on sm_``arch`` (its
    ``asm`` holds the ttir, ttgir, llir, ptx and cubin): Triton's runtime build."""
    import triton
    from triton.backends.compiler import GPUTarget

    _, source, options = specialize(kernel.launch, arch)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options.__dict__)


def compile_kernel(kernel: ShippedKernel, arch: int) -> CompiledKernel:
    compiled = compile_triton(kernel, arch)
    registers, stack, static_shared, local = resource_usage(compiled.asm["cubin"])
    return CompiledKernel(kernel.name, arch, registers, stack, local,
                          max(static_shared, compiled.metadata.shared), compiled.asm["ptx"])


def analyze_kernel(kernel: ShippedKernel, arch: int) -> dict:
    """``analyze`` for one shipped configuration, with its useful FLOPs and its peer's
    published fraction of peak."""
    constexprs = kernel.constexprs
    head = re.search(r"D=(\d+)", kernel.name)
    config = {**{k: v for k, v in constexprs.items() if k.startswith("BLOCK")},
              "num_warps": kernel.spec.num_warps, "num_stages": kernel.spec.num_stages}
    record = analyze(compile_triton(kernel, arch), arch=arch,
                     useful_flops_per_iteration=useful_flops(kernel.spec.kernel, constexprs),
                     kernel=kernel.name, config=config,
                     head_dim=int(head.group(1)) if head else None)
    record["peer_fraction"], record["peer"] = peer(kernel.name, arch)
    return record


def _in_fresh_process(what: str, *arguments: str, shards: int = 1):
    """Run ``python -m cptfast.aot WHAT ARGUMENTS`` without Triton's interpreter (whose kernels
    cannot be compiled) and return its JSON output: a list, built by ``shards`` processes in
    parallel, each taking every shards-th configuration (``_SHARD``) and printing a list of
    entries per configuration (one per architecture it ships on), put back in order."""
    import json
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    workers = [subprocess.Popen([sys.executable, "-m", "cptfast.aot", what, *arguments],
                                env={**env, _SHARD: f"{index}/{shards}"},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for index in range(shards)]
    parts = []
    for worker in workers:
        stdout, stderr = worker.communicate()
        if worker.returncode != 0:
            raise RuntimeError(f"ahead-of-time compilation failed:\n{stderr[-4000:]}")
        parts.append(json.loads(stdout))
    return [entry for row in itertools.zip_longest(*parts) for entries in row
            if entries is not None for entry in entries]


_SHARD = "CPTFAST_AOT_SHARD"  # "index/count": this process compiles its share


def _interpreting() -> bool:
    import os
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _parallel() -> int:
    """Processes to compile in: one per core, unless this process is already one of them."""
    import os
    return 0 if os.environ.get(_SHARD) else min(os.cpu_count() or 1, 8)


def _worth_sharding(kernel_prefix: str) -> bool:
    """Whether to compile in one process per core: only for many configurations (each process
    lists the shipped kernels again, a few seconds)."""
    return _parallel() > 1 and len(_selected(kernel_prefix)) > 16


def _own_share(kernels: list[ShippedKernel]) -> list[ShippedKernel]:
    import os
    index, count = map(int, os.environ.get(_SHARD, "0/1").split("/"))
    return kernels[index::count]


@functools.cache
def _all_shipped() -> tuple[ShippedKernel, ...]:
    return tuple(shipped_kernels())  # the same in every call of one process


def _selected(kernel_prefix: str) -> list[ShippedKernel]:
    return _own_share([k for k in _all_shipped() if k.name.startswith(kernel_prefix)])


def compile_all(architectures=ARCHITECTURES, kernel_prefix: str = "") -> list[CompiledKernel]:
    """Compile every shipped configuration (whose name starts with ``kernel_prefix``) for every
    architecture, in fresh processes (one per core; never in one running the interpreter)."""
    if _interpreting() or _worth_sharding(kernel_prefix):
        return [CompiledKernel(**entry) for entry in _in_fresh_process(
            "compile", kernel_prefix, *map(str, architectures), shards=max(_parallel(), 1))]
    return [compiled for group in _compiled_groups(kernel_prefix, architectures)
            for compiled in group]


def _archs(kernel: ShippedKernel, architectures) -> list[int]:
    return [arch for arch in architectures if arch in kernel.archs]


def _compiled_groups(kernel_prefix: str, architectures) -> list[list[CompiledKernel]]:
    return [[compile_kernel(kernel, arch) for arch in _archs(kernel, architectures)]
            for kernel in _selected(kernel_prefix)]


def _record_groups(kernel_prefix: str, architectures) -> list[list[dict]]:
    return [[analyze_kernel(kernel, arch) for arch in _archs(kernel, architectures)]
            for kernel in _selected(kernel_prefix)]


def shipped_records(kernel_prefix: str | None = None,
                    architectures=ARCHITECTURES) -> list[dict]:
    """``analyze_kernel`` for every shipped configuration (whose name starts with
    ``kernel_prefix``, if given) and architecture, in fresh processes as ``compile_all``."""
    if _interpreting() or _worth_sharding(kernel_prefix or ""):
        return _in_fresh_process("analyze", kernel_prefix or "", *map(str, architectures),
                                 shards=max(_parallel(), 1))
    return [record for group in _record_groups(kernel_prefix or "", architectures)
            for record in group]


def calibration_records(architectures=ARCHITECTURES) -> list[dict]:
    """``analyze_kernel`` for the calibration kernels (``CALIBRATION``)."""
    if _interpreting():
        return _in_fresh_process("calibrate", "", *map(str, architectures))
    return [analyze_kernel(kernel, arch) for kernel in shipped_kernels(calibration_calls())
            for arch in architectures]


def shipped_table() -> list[dict]:
    """Name, kernel, constants, divisible arguments and launch options of every shipped
    configuration (JSON-friendly)."""
    if _interpreting():
        return _in_fresh_process("list")
    return [{"name": k.name, "kernel": k.spec.kernel, "signature": dict(k.spec.signature),
             "constants": dict(k.spec.constants),
             "divisible": list(k.spec.divisible), "num_warps": k.spec.num_warps,
             "num_stages": k.spec.num_stages, "archs": list(k.archs)} for k in shipped_kernels()]


if __name__ == "__main__":
    import dataclasses
    import json
    import sys

    what, prefix = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else ""
    archs = [int(a) for a in sys.argv[3:]] or list(ARCHITECTURES)
    # One list of entries per configuration (see _in_fresh_process).
    if what == "compile":
        print(json.dumps([[dataclasses.asdict(k) for k in group]
                          for group in _compiled_groups(prefix, archs)]))
    elif what == "analyze":
        print(json.dumps(_record_groups(prefix, archs)))
    elif what == "calibrate":
        print(json.dumps([calibration_records(archs)]))
    elif what == "list":
        print(json.dumps([shipped_table()]))
    else:
        raise SystemExit("usage: python -m cptfast.aot compile|analyze|calibrate|list "
                         "[PREFIX] [ARCH...]")
