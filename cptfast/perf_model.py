"""A static performance model read from the SASS of a compiled Triton kernel: an upper bound on
the fraction of the GPU's peak one loop iteration can reach, not a measurement.

Method (``analyze``):
1. Disassemble the cubin (``cuobjdump -sass``, shipped in the triton wheel) and find the hot
   loop: among the innermost loops (a backward ``BRA`` whose range holds no other backward
   branch), the one with the most tensor-core work, then the most global bytes, then the
   fewest instructions (so ties favour the cheaper body: the bound stays an upper bound). A
   kernel without a loop is taken whole. Instructions predicated ``@!PT`` never run and are
   skipped. ptxas may unroll a small loop; the unroll factor is the SASS body's tensor-core
   instructions over those of the innermost PTX loop (Triton itself does not unroll), and the
   caller's useful FLOPs per (source) iteration are scaled by it.
2. Count the body's warp instructions by class (tensor, fp32, mufu, integer, predicate,
   shared, global, async copy, barrier, shuffle, other) and the tensor-core shapes.
3. Cycles per iteration of one CTA on one SM, each resource alone at its peak rate:
   - tensor:  issued FLOPs / tensor FLOP per clock per SM. ``HMMA.16816`` is one warp's
     m16n8k16 (2*16*8*16 FLOPs); ``HGMMA.64xNx16`` is a warpgroup's (4 warps issue it once each,
     so its work counts once per 4 warps).
   - issue:   warp instructions * warps / 4 (4 schedulers per SM, 1 warp instruction per clock
     each).
   - fp32:    fp32/fp16x2 warp instructions * 32 lanes / fp32 lanes per clock per SM.
   - mufu:    MUFU warp instructions * 32 / 16 (16 special-function results per clock per SM).
   - shared:  bytes moved through shared memory (LDS/STS/LDSM/STSM, and what LDGSTS writes) /
     128 B per clock per SM (32 banks of 4 bytes). Operands wgmma reads from shared memory are
     not counted (they use the tensor cores' own path in this model).
   - memory:  global bytes (LDG/STG/LDGSTS, every lane active) / DRAM bytes per clock per SM.
     Counted only for kernels without tensor work: a tensor-core kernel's tiles are reused
     across CTAs through L2, and the model assumes that reuse is perfect.
4. ``bound_fraction`` = useful work cycles / the largest of those cycles, where the useful work
   is the tensor cycles of the tile's useful FLOPs when the caller gives them (otherwise of the
   issued FLOPs), the memory cycles for a kernel without tensor ops (``kind`` = "memory"), or
   the fp32 cycles of the useful FLOPs for a matmul on FMA units (``kind`` = "fma").
   ``duplicated_fraction`` = (issued - useful) / issued tensor FLOPs (e.g. 0.5 when the warps
   compute the same tile twice). ``occupancy`` = resident warps / 64 from the registers
   (65536 per SM, allocated per warp in units of 256), shared memory (plus the 1 KiB the
   system reserves per CTA) and the 32-CTA limit.

Everything is an upper bound: latencies, dependencies, bank conflicts, L2 and DRAM contention,
tail effects and the code outside the loop are ignored.

Constants (public sources):
- A100 SXM (sm_80): 108 SMs, 1410 MHz boost, 312 TFLOPS dense bf16/fp16 (156 TF32) —
  NVIDIA A100 Tensor Core GPU Architecture whitepaper (2020), which also states 1024 dense fp16
  FMA per clock per SM: 312e12 / (108 * 1.41e9) = 2048 FLOP/clk/SM. 2039 GB/s HBM2e (A100 80GB
  SXM datasheet). 164 KiB shared memory per SM usable by CTAs.
- H100 SXM5 (sm_90): 132 SMs, 1830 MHz boost, 989 TFLOPS dense bf16/fp16 (495 TF32) — NVIDIA
  H100 Tensor Core GPU Architecture whitepaper (2022): 989e12 / (132 * 1.83e9) = 4096
  FLOP/clk/SM (twice A100 per SM per clock, as the whitepaper says). 3.35 TB/s HBM3
  (H100 SXM datasheet). 228 KiB shared memory per SM usable by CTAs.
- Per SM per clock, CUDA C++ Programming Guide, "Arithmetic Instructions" throughput table:
  fp32 add/mul/fma 64 (cc 8.0) and 128 (cc 9.0); 32-bit reciprocal, rsqrt, log2, exp2, sin,
  cos (MUFU) 16 on both. Shared memory 32 banks * 4 B = 128 B/clk/SM (Programming Guide,
  "Shared Memory" for cc 8.x/9.0). 4 warp schedulers per SM, 1 instruction per clock each
  (both whitepapers). 64 warps, 65536 32-bit registers, 32 CTAs per SM (Programming Guide,
  "Technical Specifications per Compute Capability").

Published fractions of peak of the peers (``PEERS``, printed next to the bounds):
- FlashAttention-2 forward on A100: 50-73 % of 312 TFLOPS (Dao 2023, "FlashAttention-2:
  Faster Attention with Better Parallelism and Work Partitioning", arXiv:2307.08691; ~230
  TFLOPs/s). Used for the attention kernels on sm_80 (the backward reaches less).
- FlashAttention-3 forward on H100, bf16: ~75 % (Shah et al. 2024, "FlashAttention-3: Fast and
  Accurate Attention with Asynchrony and Low-precision", arXiv:2407.08608; ~740 of 989
  TFLOPs/s). Used for the attention kernels on sm_90.
- cuBLAS bf16 GEMM at large sizes: ~80-90 % of peak (NVIDIA's published cuBLAS results; the
  peer of the loss GEMMs).
- Bandwidth-bound kernels (cross-entropy, RoPE, attention's delta): a device copy reaches
  ~90 % of DRAM bandwidth (the roofline the peers, e.g. Liger-Kernel, share).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Arch:
    name: str
    sms: int
    clock_ghz: float          # boost clock the peak figures are quoted at
    tensor_flops: int         # dense bf16/fp16 FLOP per clock per SM
    fp32_lanes: int           # fp32 FMA per clock per SM
    dram_gb_s: float
    shared_per_sm: int        # bytes usable by CTAs
    mufu_lanes: int = 16
    shared_bytes_per_clk: int = 128
    schedulers: int = 4
    max_warps: int = 64
    max_ctas: int = 32
    registers: int = 65536

    @property
    def dram_bytes_per_clk(self) -> float:  # per SM
        return self.dram_gb_s * 1e9 / (self.sms * self.clock_ghz * 1e9)


ARCHS = {
    80: Arch("A100 SXM", sms=108, clock_ghz=1.41, tensor_flops=2048, fp32_lanes=64,
             dram_gb_s=2039, shared_per_sm=164 * 1024),
    90: Arch("H100 SXM", sms=132, clock_ghz=1.83, tensor_flops=4096, fp32_lanes=128,
             dram_gb_s=3350, shared_per_sm=228 * 1024),
}

# Published fraction of peak of the peer each shipped kernel competes with (module docstring).
PEERS = {
    ("attention", 80): (0.73, "FlashAttention-2 fwd, A100 (Dao 2023): 50-73%"),
    ("attention", 90): (0.75, "FlashAttention-3 fwd, H100 bf16 (Shah et al. 2024): ~75%"),
    ("fused_linear_ce", 80): (0.85, "cuBLAS bf16 GEMM: ~80-90%"),
    ("fused_linear_ce", 90): (0.85, "cuBLAS bf16 GEMM: ~80-90%"),
    ("cross_entropy", 80): (0.90, "device copy: ~90% of DRAM bandwidth"),
    ("cross_entropy", 90): (0.90, "device copy: ~90% of DRAM bandwidth"),
    ("rope", 80): (0.90, "device copy: ~90% of DRAM bandwidth"),
    ("rope", 90): (0.90, "device copy: ~90% of DRAM bandwidth"),
    ("backward_delta", 80): (0.90, "device copy: ~90% of DRAM bandwidth"),
    ("backward_delta", 90): (0.90, "device copy: ~90% of DRAM bandwidth"),
}

CLASSES = ("tensor", "fp32", "mufu", "integer", "predicate", "shared", "global", "async",
           "barrier", "shuffle", "other")
_OPCODE_CLASS = {
    **dict.fromkeys(("HMMA", "HGMMA", "IMMA", "QGMMA", "IGMMA", "DMMA"), "tensor"),
    **dict.fromkeys(("FFMA", "FADD", "FMUL", "FMNMX", "FSETP", "FSEL", "FSET", "HFMA2",
                     "HADD2", "HMUL2", "HMNMX2", "HSETP2", "FRND", "FCHK", "FSWZADD"), "fp32"),
    "MUFU": "mufu",
    **dict.fromkeys(("ISETP", "PLOP3", "P2R", "R2P", "PSETP", "VOTE", "UISETP", "UPLOP3",
                     "UP2UR", "UR2UP", "VOTEU", "FSETP2"), "predicate"),
    **dict.fromkeys(("LDS", "STS", "LDSM", "STSM", "ATOMS"), "shared"),
    **dict.fromkeys(("LDG", "STG", "LD", "ST", "RED", "ATOMG", "ATOM", "LDL", "STL"), "global"),
    **dict.fromkeys(("LDGSTS", "UTMALDG", "UTMASTG", "UTMAPF", "UBLKCP", "UTMACMDFLUSH"),
                    "async"),
    **dict.fromkeys(("BAR", "WARPSYNC", "SYNCS", "MEMBAR", "DEPBAR", "LDGDEPBAR", "WARPGROUP",
                     "BSSY", "BSYNC", "FENCE", "ARRIVES", "ERRBAR", "CCTL"), "barrier"),
    "SHFL": "shuffle",
    **dict.fromkeys(("BRA", "EXIT", "NOP", "CALL", "RET", "BMOV", "YIELD", "JMP", "BRX",
                     "NANOSLEEP", "BPT", "KILL"), "other"),
}
_INTEGER = re.compile(r"^(U?(IMAD|IADD3|IADD|LOP3|LOP|SHF|SHL|SHR|LEA|IABS|SEL|PRMT|IMNMX|"
                      r"VIADD|VIMNMX|POPC|FLO|BREV|SGXT|MOV|BMSK|IDP|I2I|CS2R|S2R|S2UR|R2UR|"
                      r"F2F|F2I|I2F|F2FP|I2FP|F2IP|FMNMX|ULDC|LDC|MOV32I|IMUL|VABSDIFF))$")
_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")
_BRANCH_TARGET = re.compile(r"0x([0-9a-f]+)")


def opcode_class(opcode: str) -> str:
    base = opcode.split(".")[0]
    if base in _OPCODE_CLASS:
        return _OPCODE_CLASS[base]
    if _INTEGER.match(base):
        return "integer"
    return "integer" if base.startswith("U") else "other"  # uniform datapath: integer work


def _access_bytes(opcode: str) -> int:
    """Bytes one warp moves with a memory instruction (every lane active)."""
    parts = opcode.split(".")
    if parts[0] in ("LDSM", "STSM"):  # 8x8 matrices of 16-bit values, 128 B each
        count = int(parts[-1]) if parts[-1] in ("2", "4") else 1
        return 128 * count
    width = 4
    for part in parts[1:]:
        if part in ("128", "64", "32"):
            width = int(part) // 8
        elif part in ("U16", "S16"):
            width = 2
        elif part in ("U8", "S8"):
            width = 1
    return 32 * width


def _tensor_shape(opcode: str) -> tuple[int, int, int, str]:
    """(m, n, k, input dtype) of one tensor-core instruction."""
    parts = opcode.split(".")
    dtype = parts[-1] if parts[-1] in ("BF16", "F16", "TF32", "S8", "E4M3", "E5M2") else "F16"
    if parts[0] == "HGMMA":
        m, n, k = (int(x) for x in parts[1].split("x"))
        return m, n, k, dtype
    shape = parts[1]  # HMMA.16816 = m16 n8 k16, HMMA.1688 = m16 n8 k8
    return int(shape[:2]), int(shape[2]), int(shape[3:]), dtype


@dataclass
class Instruction:
    address: int
    opcode: str
    operands: str

    @property
    def cls(self) -> str:
        return opcode_class(self.opcode)


def parse_sass(sass: str) -> list[Instruction]:
    """The instructions of the (first) kernel in ``cuobjdump -sass`` text; ``@!PT`` ones,
    which never run, are dropped."""
    out = []
    for line in sass.splitlines():
        if "Function :" in line and out:
            break  # one kernel per Triton cubin; stop at a second one
        found = _LINE.search(line)
        if found and (found.group(2) or "").strip() != "@!PT":
            out.append(Instruction(int(found.group(1), 16), found.group(3), found.group(4)))
    return out


def loops(instructions: list[Instruction]) -> list[list[Instruction]]:
    """The bodies of the innermost loops: [branch target, backward branch]."""
    ranges = []
    for ins in instructions:
        if ins.opcode.startswith("BRA"):
            target = _BRANCH_TARGET.search(ins.operands)
            if target and int(target.group(1), 16) < ins.address:
                ranges.append((int(target.group(1), 16), ins.address))
    innermost = [r for r in ranges
                 if not any(o != r and r[0] <= o[0] and o[1] <= r[1] for o in ranges)]
    return [[i for i in instructions if lo <= i.address <= hi] for lo, hi in innermost]


def ptx_tensor_ops_per_iteration(ptx: str) -> int:
    """Most tensor-core instructions (mma.sync / wgmma.mma_async) in an innermost PTX loop:
    Triton does not unroll, so this is one source iteration's count."""
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines)
              if (m := re.match(r"\s*(\$L__BB\w+):", line))}
    ranges = []
    for i, line in enumerate(lines):
        found = re.search(r"\bbra(?:\.uni)?\s+(\$L__BB\w+)", line)
        if found and labels.get(found.group(1), i) < i:
            ranges.append((labels[found.group(1)], i))
    innermost = [r for r in ranges
                 if not any(o != r and r[0] <= o[0] and o[1] <= r[1] for o in ranges)]
    return max((sum(("mma.sync" in line or "wgmma.mma_async" in line)
                    for line in lines[lo:hi + 1]) for lo, hi in innermost), default=0)


def count(body: list[Instruction], num_warps: int) -> dict:
    """Per-iteration counts of one loop body: warp instructions per class, tensor-core shapes,
    issued tensor FLOPs of the whole CTA, and bytes per warp through shared and global memory."""
    classes = dict.fromkeys(CLASSES, 0)
    shapes: dict[str, int] = {}
    tensor_flops = {"16bit": 0, "tf32": 0}
    shared_bytes = global_bytes = 0
    for ins in body:
        cls = ins.cls
        classes[cls] += 1
        base = ins.opcode.split(".")[0]
        if cls == "tensor" and base in ("HMMA", "HGMMA"):
            shapes[ins.opcode] = shapes.get(ins.opcode, 0) + 1
            m, n, k, dtype = _tensor_shape(ins.opcode)
            # A warpgroup (4 warps) issues one HGMMA together; an HMMA is one warp's.
            issuers = num_warps / 4 if base == "HGMMA" else num_warps
            tensor_flops["tf32" if dtype == "TF32" else "16bit"] += 2 * m * n * k * issuers
        elif cls == "shared":
            shared_bytes += _access_bytes(ins.opcode)
        elif cls == "global" and base not in ("LDL", "STL"):
            global_bytes += _access_bytes(ins.opcode)
        elif base == "LDGSTS":  # global -> shared: both paths
            global_bytes += _access_bytes(ins.opcode)
            shared_bytes += _access_bytes(ins.opcode)
    return {"classes": classes, "tensor_shapes": shapes, "tensor_flops": tensor_flops,
            "shared_bytes_per_warp": shared_bytes, "global_bytes_per_warp": global_bytes,
            "instructions": len(body)}


def occupancy(arch: Arch, num_warps: int, registers: int, shared_bytes: int) -> dict:
    """Resident CTAs per SM and the fraction of the 64 warp slots they fill."""
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256  # allocated in units of 256
    limits = {"warps": arch.max_warps // num_warps,
              "registers": arch.registers // (regs_per_warp * num_warps),
              "shared": arch.shared_per_sm // (shared_bytes + 1024),  # 1 KiB reserved per CTA
              "ctas": arch.max_ctas}
    ctas = min(limits.values())
    return {"ctas_per_sm": ctas, "limited_by": min(limits, key=limits.get),
            "occupancy": ctas * num_warps / arch.max_warps}


def cuobjdump() -> Path:
    """The cuobjdump shipped inside the triton wheel."""
    import triton
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        raise FileNotFoundError(f"{path}: cuobjdump not found in the triton wheel")
    return path


def sass_of(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        return subprocess.run([str(cuobjdump()), "-sass", file.name], capture_output=True,
                              text=True, check=True).stdout


def resource_usage(cubin: bytes) -> tuple[int, int, int, int]:
    """(registers, stack, static shared, local) bytes from ``cuobjdump --dump-resource-usage``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        report = subprocess.run([str(cuobjdump()), "--dump-resource-usage", file.name],
                                capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", report)
    if found is None:
        raise RuntimeError(f"no resource usage in:\n{report}")
    registers, stack, shared, local = map(int, found.groups())
    return registers, stack, shared, local


def analyze(compiled, *, arch: int | None = None, useful_flops_per_iteration: float | None = None,
            kernel: str | None = None, config: dict | None = None,
            head_dim: int | None = None) -> dict:
    """The static bound of one compiled kernel (what ``triton.compile`` returns): counts of its
    hot loop's instructions, cycles per iteration per resource, ``bound_fraction``,
    ``duplicated_fraction`` and ``occupancy`` (see the module docstring). ``arch`` defaults to
    the compile target; ``useful_flops_per_iteration`` is the tile's necessary tensor FLOPs."""
    metadata = compiled.metadata
    arch = arch or metadata.target.arch
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch}")
    spec = ARCHS[arch]
    cubin = compiled.asm["cubin"]
    warps = metadata.num_warps
    registers, stack, static_shared, local = resource_usage(cubin)
    spill_bytes = stack + local
    shared = max(static_shared, metadata.shared)

    instructions = parse_sass(sass_of(cubin))
    bodies = loops(instructions) or [instructions]  # no loop: the whole kernel is one iteration
    counted = [count(body, warps) for body in bodies]
    hot = max(counted, key=lambda c: (sum(c["tensor_flops"].values()),
                                      c["global_bytes_per_warp"], -c["instructions"]))
    classes = hot["classes"]

    tensor_rate = {"16bit": spec.tensor_flops, "tf32": spec.tensor_flops / 2}
    issued_flops = sum(hot["tensor_flops"].values())
    cycles = {
        "tensor": sum(f / tensor_rate[t] for t, f in hot["tensor_flops"].items()),
        "issue": hot["instructions"] * warps / spec.schedulers,
        "fp32": classes["fp32"] * warps * 32 / spec.fp32_lanes,
        "mufu": classes["mufu"] * warps * 32 / spec.mufu_lanes,
        "shared": hot["shared_bytes_per_warp"] * warps / spec.shared_bytes_per_clk,
    }
    # ptxas may unroll a small loop u times: the SASS body is then u source iterations.
    ptx_ops = ptx_tensor_ops_per_iteration(compiled.asm["ptx"])
    sass_ops = sum(hot["tensor_shapes"].values())
    unroll = max(1, round(sass_ops / ptx_ops)) if ptx_ops and sass_ops else 1
    useful = useful_flops_per_iteration * unroll if useful_flops_per_iteration else None
    if issued_flops:
        kind = "tensor"
        scale = (useful / issued_flops) if useful else 1.0  # useful share of the issued work
        work = cycles["tensor"] * min(scale, 1.0)
    elif useful:
        kind = "fma"  # a matmul on the fp32 units (e.g. fp32 inputs without tensor cores)
        work = useful / 2 / spec.fp32_lanes
    else:
        kind = "memory"
        cycles["memory"] = hot["global_bytes_per_warp"] * warps / spec.dram_bytes_per_clk
        work = cycles["memory"]
    largest = max(cycles.values())
    limiter = max(cycles, key=cycles.get)
    duplicated = None
    if useful and issued_flops:
        duplicated = max(0.0, (issued_flops - useful) / issued_flops)
    occ = occupancy(spec, warps, registers, shared)
    return {
        "kernel": kernel or metadata.name, "config": config or {}, "head_dim": head_dim,
        "arch": f"sm_{arch}", "device": spec.name, "num_warps": warps,
        "registers": registers, "spill_bytes": spill_bytes, "shared_bytes": shared,
        "kind": kind, "limiter": limiter,
        "tensor_ops": hot["tensor_shapes"], "instruction_classes": classes,
        "instructions_per_iteration": hot["instructions"], "loops": len(bodies),
        "global_bytes_per_warp": hot["global_bytes_per_warp"],
        "unroll": unroll,
        "issued_tensor_flops": issued_flops, "useful_tensor_flops": useful,
        "cycles": {name: round(value, 1) for name, value in cycles.items()},
        "bound_fraction": round(work / largest, 4) if largest else 0.0,
        "duplicated_fraction": None if duplicated is None else round(duplicated, 4),
        "occupancy": occ["occupancy"], "ctas_per_sm": occ["ctas_per_sm"],
        "occupancy_limited_by": occ["limited_by"],
    }


def useful_flops(kernel: str, constexprs: dict) -> float | None:
    """The tensor FLOPs one hot-loop iteration of a shipped kernel (the JITFunction's name and
    its constexprs) must do: its dots at the tile size; None for kernels without a matmul."""
    c = constexprs
    if kernel.startswith("attention_"):
        if kernel == "attention_forward_kernel":
            dots = 2                       # q k^T, p v
        elif kernel == "attention_backward_dq_kernel":
            dots = 3                       # q k^T, do v^T, ds k
        else:  # dk/dv: q k^T, then do v^T and ds^T q for dk, p^T do for dv
            dots = 1 + 2 * bool(c.get("WANT_DK")) + bool(c.get("WANT_DV"))
        return dots * 2 * c["BLOCK_M"] * c["BLOCK_N"] * c["BLOCK_D"]
    if kernel == "matmul_kernel":  # the calibration matmul (cptfast.kernels.calibration)
        return 2 * c["BLOCK_M"] * c["BLOCK_N"] * c["BLOCK_K"]
    if kernel.startswith("fused_linear_cross_entropy"):
        return 2 * c["BLOCK_N"] * c["BLOCK_V"] * c["BLOCK_H"]
    return None


def peer(kernel: str, arch: int) -> tuple[float | None, str]:
    for (prefix, peer_arch), value in PEERS.items():
        if kernel.startswith(prefix) and peer_arch == arch:
            return value
    return None, ""
