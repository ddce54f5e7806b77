"""`cptfast doctor`: the environment, and the GPU-readiness report that works without a GPU —
every shipped Triton kernel configuration compiled ahead of time for sm_80 and sm_90, with its
registers, spills and shared memory, and (`--perf`) its static performance bound. Exit status 1
if a configuration fails or spills, or a configuration a launch_config can return is not
shipped."""

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
    from cptfast.aot import ARCHITECTURES, MAX_SHARED_BYTES, compile_all, missing_configs

    print(f"\nahead-of-time compilation of every shipped kernel configuration for "
          f"{', '.join(f'sm_{a}' for a in ARCHITECTURES)}, specialised as Triton's runtime "
          f"would for the wrappers' launches at representative shapes:")
    try:
        kernels = compile_all()
        missing = missing_configs()
    except Exception as error:  # the report must say why, not crash
        print(f"FAILED: {error}")
        return 1
    bad = [k for k in kernels if k.stack_bytes or k.local_bytes
           or k.shared_bytes > MAX_SHARED_BYTES[k.arch]]
    for kernel in kernels:
        print(("  SPILLS " if kernel in bad else "  ") + kernel.line())
    for config in missing:
        print(f"  NOT SHIPPED (launch_config can return it, nothing compiles it): {config}")
    print(f"\n{len(kernels)} configurations, {len(bad)} with spills or too much shared memory, "
          f"{len(missing)} launch configurations not shipped")
    return 1 if bad or missing else 0


def _perf_line(r: dict) -> str:
    dup = "-" if r["duplicated_fraction"] is None else f"{r['duplicated_fraction']:.2f}"
    peer = "-" if r.get("peer_fraction") is None else f"{r['peer_fraction']:.2f}"
    ops = ", ".join(f"{n}x{op}" for op, n in r["tensor_ops"].items()) or r["kind"]
    return (f"{r['kernel']:<48} {r['arch']:<6} {r['registers']:>4} {r['spill_bytes']:>5} "
            f"{r['shared_bytes']:>7} {r['occupancy']:>5.2f} {r['limiter']:<7} "
            f"{r['bound_fraction']:>6.2f} {dup:>5} {peer:>5}  {ops}"
            + (f"; {r['peer']}" if r.get("peer") else ""))


def perf_report(json_path: str | None = None, kernel_prefix: str | None = None) -> int:
    """`cptfast doctor --perf`: the static bound (cptfast.perf_model, read from the SASS) of
    the calibration kernels, whose speed is known, then of every shipped kernel configuration
    (or those whose name starts with ``kernel_prefix``) on sm_80 and sm_90, next to the
    published fraction of peak of its peer; records written to ``json_path`` as JSON. Exit
    status 1 if a configuration fails, spills, or none matches."""
    import json
    from pathlib import Path

    from cptfast.aot import calibration_records, shipped_records

    try:
        calibration = calibration_records()
        records = shipped_records(kernel_prefix)
    except Exception as error:  # the report must say why, not crash
        print(f"FAILED: {error}")
        return 1
    if not records:
        print(f"no shipped kernel configuration starts with {kernel_prefix!r}")
        return 1
    header = (f"{'kernel':<48} {'arch':<6} {'regs':>4} {'spill':>5} {'shared':>7} {'occ':>5} "
              f"{'limiter':<7} {'bound':>6} {'dup':>5} {'peer':>5}  tensor ops / peer")
    print("static bound per hot-loop iteration, read from the SASS (cptfast.perf_model): an "
          "upper bound on the fraction of peak, not a measurement\n")
    print("calibration (cptfast.kernels.calibration): a cuBLAS-class matmul should be near 1, "
          "a 16x16-tiled one low, a copy memory-bound")
    print(header)
    for r in calibration:
        print(_perf_line(r))
    print("\nshipped kernels")
    print(header)
    for r in records:
        print(_perf_line(r))
    if json_path:
        path = Path(json_path)
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps(
            [{**r, "calibration": True} for r in calibration]
            + [{**r, "calibration": False} for r in records], indent=1))
        temporary.replace(path)  # never a half-written file
        print(f"\n{len(records)} records written to {path}")
    spills = [r for r in records if r["spill_bytes"]]
    return 1 if spills else 0
