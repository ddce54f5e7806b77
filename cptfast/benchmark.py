"""`cptfast bench`: runs the benchmark suites of `bench/` (pytest-benchmark, every ratio
measured against its baseline in the same run) at a size preset and writes ``report.md``,
``report.json`` and plots (the ratios, the curves the suites record, and a roofline of every
timed operation against the device's measured peaks). CPU timings are medians of repeats run
in fresh processes, GPU timings medians of CUDA-event timings. Baselines that cannot run here
(no GPU, not installed) are listed with the reason pytest gave for skipping them.

Beside the measured figures, the report gives the static performance bound of the Triton
kernels the suites that ran exercise (``cptfast.perf_model``: read from the SASS compiled for
sm_80 and sm_90, not measured), summarised per kernel family and architecture.

The ``gpu-check`` preset is for one H100 / H200 and takes at most about ten minutes: the fast
kernel, loss, attention, RoPE and accelerate tests in the CUDA test mode
(``CPTFAST_TEST_DEVICE=cuda``), then only the GPU rows of every suite (``-m gpu``). Its report
is laid out as a dated section of ``bench/RESULTS.md``. Without a CUDA GPU it stops at once."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from cptfast.errors import ConfigError, CptfastError

GPU_CHECK = "gpu-check"
# size scale (the GPU rows use fixed, full-size shapes)
PRESETS = {"smoke": 0.02, "small": 0.25, "medium": 1.0, "large": 4.0, GPU_CHECK: 1.0}
# runs of each CPU timing (median)
REPEATS = {"smoke": 1, "small": 3, "medium": 3, "large": 5, GPU_CHECK: 1}
SUITES = ("prepare", "loader", "cross_entropy", "attention", "hf", "train", "distributed")
_SKIP = re.compile(r"^SKIPPED \[\d+\] (\S+?):\d+: (.*)$")
_FAILED = re.compile(r"^(?:FAILED|ERROR) (\S+)(?: - (.*))?$")
_COUNTS = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)\b")

# gpu-check, step 1: the fast tests of the CUDA test mode (tests/conftest.py): kernels, losses,
# attention, RoPE and accelerate; not the ahead-of-time compilation (CPU-side, minutes).
GPU_TESTS = ("tests/kernels", "tests/hf")
GPU_TESTS_IGNORED = ("tests/kernels/test_aot.py",)
# Wall-clock limits of gpu-check's steps: the tests, the GPU rows, the static bounds (<= 10
# minutes in all); a pytest run past its limit is interrupted (SIGINT) and what it finished is
# still reported.
GPU_TEST_SECONDS, GPU_BENCH_SECONDS, STATIC_BOUND_SECONDS = 210, 300, 90

# Static bounds: the shipped kernel configurations each suite's GPU rows launch (bf16; the
# Llama-3-8B head and attention shapes, D=128; the 1B model of the training rows, D=64). Each
# entry is a name prefix for ``shipped_records``, with the older spelling of the same
# configuration after it (the names of cptfast.perf_model, before cptfast.aot named them from
# the launches themselves); the first that matches is used.
# Where an architecture has its own tiles the names end in ",sm_80]" / ",sm_90]" (both match).
_FORWARD = ("attention_forward[bf16,D={d},sm_", "attention_forward[bf16,D={d}]")
_DKDV = ("attention_backward_dkdv[bf16,D={d},sm_", "attention_backward_dkdv[bf16,D={d}]",
         "attention_dkdv[bf16,D={d}]")
_DQ = ("attention_backward_dq[bf16,D={d},sm_", "attention_backward_dq[bf16,D={d}]",
       "attention_dq[bf16,D={d}]")
_ROPE = ("rope[bf16,D={d},H=32]", "rope[bf16,BLOCK_H=16,HALF={half}]")
# The head's loss kernel, and the cross-entropy kernel its gradient path runs over chunks of
# bf16 logits (BLOCK_V = 4096: the same specialisation at V = 32,000 as at 128,256).
_LOSS = (("fused_linear_ce_forward[bf16,V=128256]", "fused_linear_ce_forward[bf16]"),
         ("cross_entropy_forward[bf16,V=32000]", "cross_entropy_forward[bf16,BLOCK_V=4096]"))


def _at(names: tuple[str, ...], d: int) -> tuple[str, ...]:
    return tuple(n.format(d=d, half=d // 2) for n in names)


STATIC_BOUND_KERNELS = {
    "cross_entropy": _LOSS,
    "attention": (_at(_FORWARD, 128), _at(_DKDV, 128), _at(_DQ, 128)),
    "hf": (_at(_FORWARD, 128), _at(_DKDV, 128), _at(_DQ, 128), _at(_ROPE, 128), *_LOSS),
    "train": (_at(_FORWARD, 64), _at(_DKDV, 64), _at(_ROPE, 64), *_LOSS),
}
# Which timed operations (roofline names) exercise each kernel family: where the report finds
# the measured figures it puts beside the bounds.
_FAMILY_OPERATIONS = {
    "fused_linear_ce": ("linear cross-entropy",), "cross_entropy": ("linear cross-entropy",),
    "attention": ("varlen attention",),
    "rope": ("transformers training step", "end-to-end training"),
}


def bench_directory() -> Path:
    directory = Path(__file__).resolve().parent.parent / "bench"
    if not (directory / "conftest.py").is_file():
        raise FileNotFoundError(f"{directory}: the benchmark suites ship with the source "
                                "checkout of cptfast (bench/), not with the installed package")
    return directory


def require_cuda() -> None:
    """Where there is no CUDA device, a one-line error saying so (gpu-check measures nothing a
    CPU could stand in for). No CUDA context is made here: the runs that follow get all of the
    device's memory."""
    import torch

    if not torch.cuda.is_available():
        build = ("a CPU-only build" if torch.version.cuda is None
                 else f"built for CUDA {torch.version.cuda}")
        raise CptfastError(
            f"--preset {GPU_CHECK} needs a CUDA GPU; this machine has none (torch "
            f"{torch.__version__}, {build}, cuda available: False); the CPU presets are "
            f"{', '.join(p for p in PRESETS if p != GPU_CHECK)}")


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


def run(suites: list[str] | None, preset: str, out: str | Path,
        repeats: int | None = None, static_bounds: bool = True) -> dict:
    """Run the suites (default: all) at ``preset`` and write the report into ``out``.
    ``gpu-check`` first runs the CUDA test mode's fast tests, then only the suites' GPU rows;
    ``static_bounds=False`` leaves out the static bounds (no kernel is compiled)."""
    if preset not in PRESETS:
        raise ConfigError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    repeats = REPEATS[preset] if repeats is None else repeats
    if repeats < 1:
        raise ConfigError(f"repeats must be at least 1, got {repeats}")
    unknown = set(suites or []) - set(SUITES)
    if unknown:
        raise ConfigError(f"unknown suites {sorted(unknown)}; choose from {', '.join(SUITES)}")
    gpu_check = preset == GPU_CHECK
    if gpu_check:
        require_cuda()
    bench = bench_directory()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    selected = list(suites or SUITES)
    files = [str(bench / f"bench_{suite}.py") for suite in selected]
    env = {**os.environ, "CPTFAST_BENCH_SCALE": str(PRESETS[preset]),
           "CPTFAST_BENCH_REPEATS": str(repeats), "CPTFAST_BENCH_PRESET": preset,
           "CPTFAST_BENCH_REPORT": str(out / "recorded.json")}
    env.pop("TRITON_INTERPRET", None)
    env.pop("CPTFAST_TEST_DEVICE", None)
    started = time.time()
    problems = []
    tests = None
    if gpu_check:
        tests = cuda_tests(bench.parent, out, env)
        problems += tests["problems"]
    (out / "recorded.json").unlink(missing_ok=True)  # never an earlier run's records
    done = _pytest([*files, "--benchmark-only", "-q", "-rfEs", "-p", "no:cacheprovider",
                    f"--benchmark-json={out / 'pytest-benchmark.json'}",
                    *(["-m", "gpu"] if gpu_check else [])],
                   cwd=bench.parent, env=env, timeout=GPU_BENCH_SECONDS if gpu_check else None)
    (out / "pytest.log").write_text(done["output"])
    failed = done["returncode"] not in (0, 5) and not done["timed_out"]
    if failed and not gpu_check:
        raise RuntimeError(f"benchmarks failed (exit {done['returncode']}); see "
                           f"{out / 'pytest.log'}:\n{done['output'][-2000:]}")
    if done["timed_out"]:
        problems.append(f"the benchmarks were stopped after {GPU_BENCH_SECONDS} s (the "
                        f"preset's limit); the rows they finished are reported")
    elif failed:
        problems.append(f"benchmarks failed (pytest exit {done['returncode']}); see "
                        f"{out / 'pytest.log'}")
    recorded_path = out / "recorded.json"
    recorded = (json.loads(recorded_path.read_text()) if recorded_path.is_file() else
                {"ratios": [], "metrics": [], "series": [], "roofline": [], "peaks": []})
    from cptfast.doctor import environment
    lines = done["output"].splitlines()
    report = {"preset": preset, "scale": PRESETS[preset], "repeats": repeats,
              "suites": selected, "environment": dict(environment()), **recorded,
              "skipped": [{"where": m.group(1), "reason": m.group(2)}
                          for m in map(_SKIP.match, lines) if m],
              "failed": [{"where": m.group(1), "reason": m.group(2) or ""}
                         for m in map(_FAILED.match, lines) if m]}
    if gpu_check:
        report["device"] = _device_name()
        report["tests"] = tests
    report["static_bounds"] = (
        collect_static_bounds_for(selected, STATIC_BOUND_SECONDS if gpu_check else 600)
        if static_bounds else {"skipped": "left out (--no-static-bounds)"})
    report["seconds"] = round(time.time() - started, 1)
    report["problems"] = problems
    report["plots"] = [p.name for p in _plot(report, out)]
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(_markdown(report))
    return report


def _pytest(arguments: list[str], *, cwd: Path, env: dict, timeout: float | None = None) -> dict:
    """pytest in a fresh process, its stdout and stderr together. Past ``timeout`` seconds it
    is interrupted as Ctrl-C would (it then still prints its summary and the suites write
    what they recorded), and killed if it has not stopped a minute later."""
    import tempfile

    started = time.time()
    timed_out = False
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen([sys.executable, "-m", "pytest", *arguments], cwd=cwd,
                                   env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.seek(0)
        output = log.read()
    return {"returncode": process.returncode, "output": output, "timed_out": timed_out,
            "seconds": round(time.time() - started, 1)}


def cuda_tests(root: Path, out: Path, env: dict) -> dict:
    """gpu-check, step 1: the fast kernel, loss, attention, RoPE and accelerate tests in the
    CUDA test mode, their log in ``out/tests.log``; counts, failures and skips returned."""
    paths = [p for p in GPU_TESTS if (root / p).is_dir()]
    arguments = [*paths, *(f"--ignore={p}" for p in GPU_TESTS_IGNORED), "-m", "not slow",
                 "-q", "-rfEs", "-p", "no:cacheprovider"]
    command = "CPTFAST_TEST_DEVICE=cuda python -m pytest " + " ".join(
        f'"{a}"' if " " in a else a for a in arguments)
    if not paths:
        return {"command": command, "counts": {}, "failed": [], "skipped": [], "seconds": 0,
                "problems": [f"{root / 'tests'}: the tests ship with the source checkout of "
                             "cptfast, not with the installed package; none were run"]}
    done = _pytest(arguments, cwd=root, env={**env, "CPTFAST_TEST_DEVICE": "cuda"},
                   timeout=GPU_TEST_SECONDS)
    (out / "tests.log").write_text(done["output"])
    lines = done["output"].splitlines()
    summary = next((line for line in reversed(lines)
                    if _COUNTS.search(line) and re.search(r"\bin [\d.]+s", line)), "")
    counts = {("errors" if kind.startswith("error") else kind): int(n)
              for n, kind in _COUNTS.findall(summary)}
    result = {"command": command, "returncode": done["returncode"], "counts": counts,
              "seconds": done["seconds"], "timed_out": done["timed_out"],
              "failed": [{"where": m.group(1), "reason": m.group(2) or ""}
                         for m in map(_FAILED.match, lines) if m],
              "skipped": [{"where": m.group(1), "reason": m.group(2)}
                          for m in map(_SKIP.match, lines) if m], "problems": []}
    if done["timed_out"]:
        result["problems"].append(f"the CUDA tests were stopped after {GPU_TEST_SECONDS} s (the "
                                  f"preset's limit); see {out / 'tests.log'}")
    elif done["returncode"] != 0:
        bad = counts.get("failed", 0) + counts.get("errors", 0)
        result["problems"].append(f"CUDA tests: {bad or 'some'} failed or errored (pytest exit "
                                  f"{done['returncode']}); see {out / 'tests.log'}")
    return result


def static_bound_kernels(suites: list[str]) -> list[list[str]]:
    """The shipped kernel configurations the suites exercise: for each, its name prefixes
    (the current spelling first)."""
    kernels: list[list[str]] = []
    for suite in suites:
        kernels += [list(k) for k in STATIC_BOUND_KERNELS.get(suite, ()) if list(k) not in kernels]
    return kernels


def collect_static_bounds_for(suites: list[str], timeout: float = 600) -> dict:
    """The static bounds of the kernels the suites exercise (``static_bound_kernels``),
    compiled in one fresh process without Triton's interpreter (whose kernels cannot be
    compiled), stopped after ``timeout`` seconds. Failing to compile is reported, never
    raised."""
    kernels = static_bound_kernels(suites)
    if not kernels:
        return collect_static_bounds(kernels)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    try:
        done = subprocess.run([sys.executable, "-m", "cptfast.benchmark", "--static-bounds",
                               json.dumps(kernels)], env=env, capture_output=True, text=True,
                              timeout=timeout)
        if done.returncode == 0:
            return json.loads(done.stdout.strip().splitlines()[-1])
        error = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
    except subprocess.TimeoutExpired:
        error = f"not done within {timeout:.0f} s"
    except (ValueError, IndexError) as problem:  # no JSON on its last line
        error = f"unreadable output ({problem})"
    return {"kernels": kernels, "records": [],
            "failures": [{"kernel": "every kernel", "error": _one_line(error)}]}


def collect_static_bounds(kernels: list[list[str]]) -> dict:
    """``shipped_records(prefix)`` (cptfast.aot; earlier cptfast.perf_model) for each kernel
    of ``kernels`` (a list of alternative name prefixes: the first that matches is used), in
    this process; what cannot be compiled is listed under ``failures`` with the reason."""
    records, failures = [], []
    try:
        try:
            from cptfast.aot import shipped_records
        except ImportError:
            from cptfast.perf_model import shipped_records
    except Exception as error:
        return {"kernels": kernels, "records": [],
                "failures": [{"kernel": "every kernel",
                              "error": f"the static model cannot be loaded: {_one_line(error)}"}]
                if kernels else []}
    for alternatives in kernels:
        found = []
        try:
            for prefix in alternatives:
                found = shipped_records(prefix)
                if found:
                    break
        except Exception as error:  # a kernel that fails to compile: a line, not a crash
            failures.append({"kernel": prefix, "error": "failed to compile or analyse: "
                                                        + _one_line(error)})
            continue
        if not found:
            failures.append({"kernel": " or ".join(f"{a}..." for a in alternatives),
                             "error": "no shipped configuration starts with this name "
                                      "(STATIC_BOUND_KERNELS in cptfast/benchmark.py is "
                                      "out of date)"})
        records += [{key: r[key] for key in _RECORD_KEYS if key in r} for r in found]
    return {"kernels": kernels, "records": records, "failures": failures}


_RECORD_KEYS = ("kernel", "arch", "device", "bound_fraction", "peer_fraction", "peer",
                "limiter", "kind", "occupancy", "registers", "spill_bytes",
                "duplicated_fraction")


def _one_line(error) -> str:
    """The informative last line of an error (compilers end theirs with the cause)."""
    text = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    line = text[-1] if text else type(error).__name__
    return (line[:300] + "...") if len(line) > 300 else line


def summarise_static_bounds(records: list[dict]) -> list[dict]:
    """One row per kernel family (the name before ``[``): per architecture the least and the
    largest bound over its configurations, the most frequent limiter and the peer's published
    fraction of peak."""
    families: dict[str, dict[str, list[dict]]] = {}
    for record in records:
        family = record["kernel"].split("[")[0]
        families.setdefault(family, {}).setdefault(record["arch"], []).append(record)
    rows = []
    for family, by_arch in families.items():
        row = {"family": family, "configurations": sorted({r["kernel"] for group in
                                                            by_arch.values() for r in group}),
               "archs": {}}
        for arch, group in sorted(by_arch.items()):
            bounds = [float(r["bound_fraction"]) for r in group]
            limiters = Counter(r["limiter"] for r in group if r.get("limiter"))
            peers = [r for r in group if r.get("peer_fraction") is not None]
            row["archs"][arch] = {
                "bound_min": min(bounds), "bound_max": max(bounds),
                "limiter": ", ".join(name for name, _ in limiters.most_common()) or None,
                "peer_fraction": peers[0]["peer_fraction"] if peers else None,
                "peer": peers[0].get("peer") if peers else None}
        rows.append(row)
    return rows


def _measured_beside(family: str, roofline: list[dict]) -> str:
    """Our own timed figures (roofline points) of the operations that run this family."""
    operations = next((ops for prefix, ops in _FAMILY_OPERATIONS.items()
                       if family.startswith(prefix)), ())
    ours = [p for p in roofline if p["name"].startswith(operations)
            and (p["variant"].startswith("cptfast") or p["variant"] == "accelerated")]
    if not ours:
        return "not timed in this run"
    return "; ".join(f"{p['device']}: {p['of_peak']:.1%} of peak, "
                     f"{_si(p['flops_per_s'], 'FLOP/s')} ({p['name']})" for p in ours)


def _static_bounds_markdown(static: dict, roofline: list[dict], heading: str) -> list[str]:
    lines = ["", f"{heading} Static bounds (from the SASS, not measured)", ""]
    if "skipped" in static:
        return lines + [f"Not computed: {static['skipped']}."]
    lines += ["Upper bounds on the fraction of a GPU's peak that one hot-loop iteration of each "
              "kernel can reach, read by `cptfast.perf_model` from the SASS Triton compiles for "
              "each architecture (no GPU needed; `cptfast doctor --perf` lists every shipped "
              "configuration). Per architecture: the least and the largest bound over the "
              "configurations the suites that ran launch, the hot loop's limiting resource, "
              "and the published fraction of peak of the peer the kernel competes with. "
              "Beside them, our figures timed in this run as a fraction of the measured peak: "
              "on a CPU those time the PyTorch reference path, not these kernels. A bound is "
              "not a measurement.", ""]
    rows = summarise_static_bounds(static.get("records", []))
    archs = sorted({arch for row in rows for arch in row["archs"]})
    if rows:
        lines += ["| kernel family | configurations | "
                  + " | ".join(f"{arch}: bound (limiter); peer" for arch in archs)
                  + " | measured in this run (ours) |",
                  "|---|---|" + "---|" * len(archs) + "---|"]
        for row in rows:
            cells = []
            for arch in archs:
                a = row["archs"].get(arch)
                if a is None:
                    cells.append("not compiled")
                    continue
                bound = (f"{a['bound_min']:.2f}" if a["bound_min"] == a["bound_max"]
                         else f"{a['bound_min']:.2f} - {a['bound_max']:.2f}")
                limiter = f" ({a['limiter']})" if a["limiter"] else ""
                peer = "-" if a["peer_fraction"] is None else f"{a['peer_fraction']:.2f}"
                cells.append(f"{bound}{limiter}; peer {peer}")
            variants = "; ".join(c[len(row["family"]):].strip("[]") or c
                                 for c in row["configurations"])
            lines.append(f"| {row['family']} | {len(row['configurations'])}: "
                         f"{_cell(variants)} | " + " | ".join(cells)
                         + f" | {_cell(_measured_beside(row['family'], roofline))} |")
        peers = sorted({f"{arch}: {a['peer']}" for row in rows
                        for arch, a in row["archs"].items() if a["peer"]})
        if peers:
            lines += ["", "Peers: " + "; ".join(peers) + "."]
    elif not static.get("failures"):
        lines.append("No kernel of the suites that ran has a static bound.")
    for failure in static.get("failures", []):
        lines.append(f"- {failure['kernel']}: no bound: {failure['error']}")
    return lines


def _cell(text: str) -> str:
    """Text that keeps a markdown table's row intact."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _static_bounds_main(kernels: str) -> None:
    print(json.dumps(collect_static_bounds(json.loads(kernels))))


def resident_bytes() -> int:
    """This process's resident memory now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_resident() -> bool:
    """Start a new peak-RSS window (Linux >= 4.0: clear_refs 5 resets VmHWM), so that a peak
    read after a measured step is that step's, not an earlier warm-up's. False where the
    kernel does not allow it (the peak then covers the whole process)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_resident_bytes() -> int:
    """This process's peak resident memory since the last ``reset_peak_resident``."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def measure_peaks(device: str = "cpu") -> dict:
    """What the device achieves at best, measured (the roofline's two ceilings): dense matmul
    FLOP/s (bf16 on a GPU, fp32 on the CPU) and memory bandwidth (a copy far larger than the
    caches, read + write bytes), each the best of repeats — a ceiling, so not a median, which
    a noisy neighbour or a clock dip on a shared CPU would pull down."""
    import torch

    if device.startswith("cuda"):
        import triton.testing

        def best_seconds(fn):
            return triton.testing.do_bench(fn, return_mode="min") / 1e3
        n, dtype, copy_elements = 8192, torch.bfloat16, 2**29  # 1 GiB of bf16
    else:
        def best_seconds(fn):
            fn()
            times = []
            for _ in range(10):
                started = time.perf_counter()
                fn()
                times.append(time.perf_counter() - started)
            return min(times)
        n, dtype, copy_elements = 2048, torch.float32, 2**26  # 256 MiB of fp32
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    source = torch.ones(copy_elements, device=device, dtype=dtype)
    target = torch.empty_like(source)
    flops = 2 * n**3 / best_seconds(lambda: torch.mm(a, b))
    bandwidth = 2 * source.nbytes / best_seconds(lambda: target.copy_(source))
    return {"device": device, "flops_per_s": flops, "bytes_per_s": bandwidth,
            "how": f"{n}x{n} {str(dtype).removeprefix('torch.')} matmul; copy of "
                   f"{source.nbytes / 2**20:,.0f} MiB"}


def roofline_point(flops: float, bytes_moved: float, seconds: float, peaks: dict) -> dict:
    """Where one timed operation sits under the roofline: its arithmetic intensity (FLOPs per
    byte it must move at the least), the FLOP/s it achieved, the fraction of the measured
    matmul peak (MFU) and of the roofline's bound at its intensity."""
    intensity = flops / bytes_moved
    bound = min(peaks["flops_per_s"], intensity * peaks["bytes_per_s"])
    achieved = flops / seconds
    return {"flops": flops, "bytes": bytes_moved, "seconds": seconds,
            "intensity": intensity, "flops_per_s": achieved,
            "of_peak": achieved / peaks["flops_per_s"], "of_bound": achieved / bound,
            "bound": "compute" if bound == peaks["flops_per_s"] else "memory"}


def _ratio(value: float) -> str:
    return f"{value:.2f}x" if math.isfinite(value) else "not measured"


def _si(value: float, unit: str) -> str:
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:,.2f} {prefix}{unit}"
    return f"{value:,.2f} {unit}"


def _markdown(report: dict) -> str:
    gpu_check = report["preset"] == GPU_CHECK
    h2 = "###" if gpu_check else "##"  # gpu-check: a dated section of bench/RESULTS.md
    if gpu_check:
        torch_version = report["environment"].get("torch", "?")
        lines = [f"## {time.strftime('%Y-%m-%d')} — {report.get('device', 'GPU')}, torch "
                 f"{torch_version} (`cptfast bench --preset {GPU_CHECK}`, "
                 f"{report.get('seconds', 0):,.0f} s)", ""]
        lines += _tests_markdown(report.get("tests"), h2)
        lines += ["", f"{h2} GPU rows of the suites", ""]
    else:
        lines = [f"# cptfast benchmark report ({report['preset']} preset, scale "
                 f"{report['scale']}, median of {report.get('repeats', 1)} repeat(s) per CPU "
                 "timing)", ""]
    lines += ["Every ratio is ours / baseline, both measured in this run (higher is better).",
              "", "| benchmark | baseline | ratio | details |", "|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['baseline']} | {_ratio(r['ratio'])} | {_cell(r['note'])} |"
              for r in report["ratios"]]
    if report["metrics"]:
        lines += ["", "| measured | value | details |", "|---|---|---|"]
        lines += [f"| {m['name']} | {m['value']} | {_cell(m['note'])} |"
                  for m in report["metrics"]]
    if report.get("roofline"):
        lines += ["", f"{h2} Roofline", "",
                  "FLOPs and bytes are what each operation must do at the least (its suite "
                  "says how it counts them: typically inputs read and outputs written once); "
                  "the peaks are measured in this run:"]
        lines += [f"- {p['device']}: {_si(p['flops_per_s'], 'FLOP/s')}, "
                  f"{_si(p['bytes_per_s'], 'B/s')} ({p['how']})" for p in report["peaks"]]
        lines += ["", "| operation | variant | device | FLOPs | bytes | FLOP/B | achieved | "
                  "of peak (MFU) | of roofline bound |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['name']} | {r['variant']} | {r['device']} | {_si(r['flops'], '')} | "
                  f"{_si(r['bytes'], 'B')} | {r['intensity']:,.1f} | "
                  f"{_si(r['flops_per_s'], 'FLOP/s')} | {r['of_peak']:.1%} | "
                  f"{r['of_bound']:.1%} ({r['bound']}) |" for r in report["roofline"]]
    if "static_bounds" in report:
        lines += _static_bounds_markdown(report["static_bounds"], report.get("roofline", []),
                                         h2)
    lines += [f"\n![{name}]({name})" for name in report.get("plots", [])] or [
        "", "No plots: matplotlib is not installed (`pip install matplotlib`)."]
    if report.get("problems") or report.get("failed"):
        lines += ["", f"{h2} Problems", ""]
        lines += [f"- {problem}" for problem in report.get("problems", [])]
        lines += [f"- failed: {f['where']}: {_cell(f['reason'])}"
                  for f in report.get("failed", [])]
    lines += ["", f"{h2} Not measured here", ""]
    lines += [f"- {s['where']}: {s['reason']}" for s in report["skipped"]] or ["- nothing"]
    lines += ["", f"{h2} Environment", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report["environment"].items()]
    return "\n".join(lines) + "\n"


def _tests_markdown(tests: dict | None, heading: str) -> list[str]:
    lines = [f"{heading} Tests in the CUDA test mode", ""]
    if tests is None:
        return lines + ["Not run."]
    counts = ", ".join(f"{n} {kind}" for kind, n in tests.get("counts", {}).items()) or \
        "no summary"
    stopped = " (stopped at the preset's limit)" if tests.get("timed_out") else ""
    lines += [f"`{tests['command']}`: {counts} in {tests.get('seconds', 0):,.0f} s{stopped}."]
    lines += [f"- failed: {f['where']}: {_cell(f['reason'])}" for f in tests.get("failed", [])]
    lines += [f"- {problem}" for problem in tests.get("problems", [])
              if not tests.get("failed")]
    if tests.get("skipped"):
        lines += ["", "Skipped in this mode:", ""]
        lines += [f"- {s['where']}: {_cell(s['reason'])}" for s in tests["skipped"]]
    return lines


def _plot(report: dict, out: Path) -> list[Path]:
    """ratios.png (every ratio) and one PNG per recorded series; none without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    ratios = [r for r in report["ratios"] if math.isfinite(r["ratio"])]
    if ratios:
        figure, axes = plt.subplots(figsize=(8, 0.4 * len(ratios) + 1.2))
        labels = [f"{r['name']}\nvs {r['baseline']}" for r in ratios]
        axes.barh(range(len(ratios)), [r["ratio"] for r in ratios])
        axes.set_yticks(range(len(ratios)), labels, fontsize=7)
        axes.axvline(1.0, color="black", linewidth=0.8)
        axes.set_xscale("log")
        axes.set_xlabel("ours / baseline (higher is better)")
        written.append(_save(figure, plt, out / "ratios.png"))
    for peaks in report.get("peaks", []):
        points = [r for r in report.get("roofline", []) if r["device"] == peaks["device"]]
        if points:
            written.append(_roofline_plot(plt, peaks, points, out))
    for series in report.get("series", []):
        figure, axes = plt.subplots(figsize=(7, 4))
        for label, points in series["lines"].items():
            axes.plot(*zip(*points), marker="o", label=label)
        axes.set_xlabel(series["x"])
        axes.set_ylabel(series["y"])
        axes.set_title(series["name"])
        axes.legend()
        slug = re.sub(r"[^a-z0-9]+", "-", series["name"].lower()).strip("-")
        written.append(_save(figure, plt, out / f"{slug}.png"))
    return written


def _roofline_plot(plt, peaks: dict, points: list[dict], out: Path) -> Path:
    import numpy as np

    figure, axes = plt.subplots(figsize=(11, 4.5))
    intensities = [p["intensity"] for p in points]
    ridge = peaks["flops_per_s"] / peaks["bytes_per_s"]
    x = np.logspace(np.log10(min(intensities + [ridge]) / 4),
                    np.log10(max(intensities + [ridge]) * 4), 200)
    axes.plot(x, np.minimum(peaks["flops_per_s"], x * peaks["bytes_per_s"]), color="black",
              label=f"measured roof ({peaks['how']})")
    for point in points:
        axes.scatter(point["intensity"], point["flops_per_s"], zorder=3,
                     label=f"{point['name']}: {point['variant']}")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("arithmetic intensity (FLOP per byte moved)")
    axes.set_ylabel("achieved FLOP/s")
    axes.set_title(f"roofline ({peaks['device']})")
    axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return _save(figure, plt, out / f"roofline-{peaks['device'].replace(':', '')}.png")


def _save(figure, plt, target: Path) -> Path:
    figure.tight_layout()
    figure.savefig(target, dpi=110)
    plt.close(figure)
    return target


if __name__ == "__main__":  # used by collect_static_bounds_for: a process without the interpreter
    if len(sys.argv) != 3 or sys.argv[1] != "--static-bounds":
        sys.exit("usage: python -m cptfast.benchmark --static-bounds "
                 "'[[\"PREFIX\", \"OLDER PREFIX\"], ...]'")
    _static_bounds_main(sys.argv[2])
