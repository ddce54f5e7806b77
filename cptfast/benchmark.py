"""`cptfast bench`: runs the benchmark suites of `bench/` (pytest-benchmark, every ratio
measured against its baseline in the same run) at a size preset and writes ``report.md``,
``report.json`` and plots (the ratios, and the curves the suites record). Baselines that
cannot run here (no GPU, not installed) are listed with the reason pytest gave for skipping
them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

PRESETS = {"smoke": 0.02, "small": 0.25, "medium": 1.0, "large": 4.0}
SUITES = ("prepare", "loader", "cross_entropy", "attention", "hf", "train", "distributed")
_SKIP = re.compile(r"^SKIPPED \[\d+\] (\S+?):\d+: (.*)$")


def bench_directory() -> Path:
    directory = Path(__file__).resolve().parent.parent / "bench"
    if not (directory / "conftest.py").is_file():
        raise FileNotFoundError(f"{directory}: the benchmark suites ship with the source "
                                "checkout of cptfast (bench/), not with the installed package")
    return directory


def run(suites: list[str] | None, preset: str, out: str | Path) -> dict:
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    unknown = set(suites or []) - set(SUITES)
    if unknown:
        raise ValueError(f"unknown suites {sorted(unknown)}; choose from {', '.join(SUITES)}")
    bench = bench_directory()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = [str(bench / f"bench_{suite}.py") for suite in (suites or SUITES)]
    env = {**os.environ, "CPTFAST_BENCH_SCALE": str(PRESETS[preset]),
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
    report = {"preset": preset, "scale": PRESETS[preset], "suites": suites or list(SUITES),
              "seconds": round(time.time() - started, 1),
              "environment": dict(environment()), **recorded,
              "skipped": [{"where": m.group(1), "reason": m.group(2)}
                          for m in map(_SKIP.match, done.stdout.splitlines()) if m]}
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    plots = _plot(report, out)
    report["plots"] = [p.name for p in plots]
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(_markdown(report))
    return report


def _markdown(report: dict) -> str:
    lines = [f"# cptfast benchmark report ({report['preset']} preset, scale "
             f"{report['scale']})", "",
             "Every ratio is ours / baseline, both measured in this run (higher is better).", "",
             "| benchmark | baseline | ratio | details |", "|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['baseline']} | {r['ratio']:.2f}x | {r['note']} |"
              for r in report["ratios"]]
    if report["metrics"]:
        lines += ["", "| measured | value | details |", "|---|---|---|"]
        lines += [f"| {m['name']} | {m['value']} | {m['note']} |" for m in report["metrics"]]
    lines += [f"\n![{name}]({name})" for name in report.get("plots", [])]
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
    ratios = report["ratios"]
    if ratios:
        figure, axes = plt.subplots(figsize=(8, 0.4 * len(ratios) + 1.2))
        labels = [f"{r['name']}\nvs {r['baseline']}" for r in ratios]
        axes.barh(range(len(ratios)), [r["ratio"] for r in ratios])
        axes.set_yticks(range(len(ratios)), labels, fontsize=7)
        axes.axvline(1.0, color="black", linewidth=0.8)
        axes.set_xscale("log")
        axes.set_xlabel("ours / baseline (higher is better)")
        written.append(_save(figure, plt, out / "ratios.png"))
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


def _save(figure, plt, target: Path) -> Path:
    figure.tight_layout()
    figure.savefig(target, dpi=110)
    plt.close(figure)
    return target
