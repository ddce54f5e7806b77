"""`cptfast bench`: runs the benchmark suites of `bench/` (pytest-benchmark, every ratio
measured against its baseline in the same run) at a size preset and writes ``report.md``,
``report.json`` and plots (the ratios, the curves the suites record, and a roofline of every
timed operation against the device's measured peaks). CPU timings are medians of repeats run
in fresh processes, GPU timings medians of CUDA-event timings. Baselines that cannot run here
(no GPU, not installed) are listed with the reason pytest gave for skipping them."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from cptfast.errors import ConfigError

PRESETS = {"smoke": 0.02, "small": 0.25, "medium": 1.0, "large": 4.0}  # size scale
REPEATS = {"smoke": 1, "small": 3, "medium": 3, "large": 5}  # of each CPU timing (median)
SUITES = ("prepare", "loader", "cross_entropy", "attention", "hf", "train", "distributed")
_SKIP = re.compile(r"^SKIPPED \[\d+\] (\S+?):\d+: (.*)$")


def bench_directory() -> Path:
    directory = Path(__file__).resolve().parent.parent / "bench"
    if not (directory / "conftest.py").is_file():
        raise FileNotFoundError(f"{directory}: the benchmark suites ship with the source "
                                "checkout of cptfast (bench/), not with the installed package")
    return directory


def run(suites: list[str] | None, preset: str, out: str | Path,
        repeats: int | None = None) -> dict:
    if preset not in PRESETS:
        raise ConfigError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    repeats = REPEATS[preset] if repeats is None else repeats
    if repeats < 1:
        raise ConfigError(f"repeats must be at least 1, got {repeats}")
    unknown = set(suites or []) - set(SUITES)
    if unknown:
        raise ConfigError(f"unknown suites {sorted(unknown)}; choose from {', '.join(SUITES)}")
    bench = bench_directory()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = [str(bench / f"bench_{suite}.py") for suite in (suites or SUITES)]
    env = {**os.environ, "CPTFAST_BENCH_SCALE": str(PRESETS[preset]),
           "CPTFAST_BENCH_REPEATS": str(repeats),
           "CPTFAST_BENCH_REPORT": str(out / "recorded.json")}
    env.pop("TRITON_INTERPRET", None)
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "pytest", *files, "--benchmark-only", "-q",
                           "-rs", "-p", "no:cacheprovider",
                           f"--benchmark-json={out / 'pytest-benchmark.json'}"],
                          cwd=bench.parent, env=env, capture_output=True, text=True)
    (out / "pytest.log").write_text(done.stdout + done.stderr)
    if done.returncode not in (0, 5):
        raise RuntimeError(f"benchmarks failed (exit {done.returncode}); see "
                           f"{out / 'pytest.log'}:\n{done.stdout[-2000:]}")
    recorded = json.loads((out / "recorded.json").read_text())
    from cptfast.doctor import environment
    report = {"preset": preset, "scale": PRESETS[preset], "repeats": repeats,
              "suites": suites or list(SUITES),
              "seconds": round(time.time() - started, 1),
              "environment": dict(environment()), **recorded,
              "skipped": [{"where": m.group(1), "reason": m.group(2)}
                          for m in map(_SKIP.match, done.stdout.splitlines()) if m]}
    report["plots"] = [p.name for p in _plot(report, out)]
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(_markdown(report))
    return report


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
    lines = [f"# cptfast benchmark report ({report['preset']} preset, scale "
             f"{report['scale']}, median of {report.get('repeats', 1)} repeat(s) per CPU "
             "timing)", "",
             "Every ratio is ours / baseline, both measured in this run (higher is better).", "",
             "| benchmark | baseline | ratio | details |", "|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['baseline']} | {_ratio(r['ratio'])} | {r['note']} |"
              for r in report["ratios"]]
    if report["metrics"]:
        lines += ["", "| measured | value | details |", "|---|---|---|"]
        lines += [f"| {m['name']} | {m['value']} | {m['note']} |" for m in report["metrics"]]
    if report.get("roofline"):
        lines += ["", "## Roofline", "",
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
    lines += [f"\n![{name}]({name})" for name in report.get("plots", [])] or [
        "", "No plots: matplotlib is not installed (`pip install matplotlib`)."]
    lines += ["", "## Not measured here", ""]
    lines += [f"- {s['where']}: {s['reason']}" for s in report["skipped"]] or ["- nothing"]
    lines += ["", "## Environment", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report["environment"].items()]
    return "\n".join(lines) + "\n"


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
