"""`cptfast bench --preset gpu-check` (refused at once without a GPU; its steps and report with
the GPU's work faked) and the report's static bounds (with the static model faked: nothing is
compiled here)."""

import json
import subprocess
import sys
import types

import pytest
import torch

from cptfast import benchmark


def fake_record(kernel: str, arch: str, bound: float, peer: float, limiter: str) -> dict:
    return {"kernel": kernel, "arch": arch, "bound_fraction": bound, "peer_fraction": peer,
            "peer": f"peer of {kernel.split('[')[0]} on {arch}", "limiter": limiter,
            "registers": 128, "cycles": {"tensor": 1.0}}  # keys the report does not keep


FAKE = {  # name prefix -> what shipped_records returns (both archs)
    "attention_forward[bf16,D=128]": [
        fake_record("attention_forward[bf16,D=128]", "sm_80", 0.39, 0.73, "shared"),
        fake_record("attention_forward[bf16,D=128]", "sm_90", 0.36, 0.75, "issue")],
    "attention_forward[bf16,D=64]": [
        fake_record("attention_forward[bf16,D=64]", "sm_80", 0.47, 0.73, "fp32"),
        fake_record("attention_forward[bf16,D=64]", "sm_90", 0.41, 0.75, "issue")],
    "rope[old,HALF=64]": [  # only the older spelling exists
        fake_record("rope[old,HALF=64]", "sm_80", 1.0, 0.9, "memory"),
        fake_record("rope[old,HALF=64]", "sm_90", 1.0, 0.9, "memory")],
}


@pytest.fixture
def fake_static_model(monkeypatch):
    """cptfast.aot replaced by a module whose shipped_records answers from FAKE (raising for
    "broken"), and which, like the real one, lists the shipped kernels on every call."""
    module = types.ModuleType("cptfast.aot")
    module.calls, module.listings = [], []

    def shipped_kernels(calls=None):
        module.listings.append(calls)
        return list(FAKE)

    def shipped_records(kernel_prefix=None, architectures=(80, 90)):
        module.calls.append(kernel_prefix)
        names = module.shipped_kernels()  # looked up on the module, as cptfast.aot does
        if kernel_prefix == "broken":
            raise RuntimeError("triton.compile failed\nPassManager::run failed: out of shared "
                               "memory")
        return [r for name in names if name.startswith(kernel_prefix) for r in FAKE[name]]

    module.shipped_kernels, module.shipped_records = shipped_kernels, shipped_records
    monkeypatch.setitem(sys.modules, "cptfast.aot", module)
    return module


def test_static_bounds_are_collected_per_kernel_with_failures_as_lines(fake_static_model):
    kernels = [["attention_forward[bf16,D=128]"], ["rope[new,D=128", "rope[old,HALF=64]"],
               ["broken"], ["fused_linear_ce_forward[bf16"]]
    collected = benchmark.collect_static_bounds(kernels)
    # The first spelling that matches is used; every kernel is asked for once.
    assert fake_static_model.calls == ["attention_forward[bf16,D=128]", "rope[new,D=128",
                                       "rope[old,HALF=64]", "broken",
                                       "fused_linear_ce_forward[bf16"]
    assert [(r["kernel"], r["arch"]) for r in collected["records"]] == [
        ("attention_forward[bf16,D=128]", "sm_80"), ("attention_forward[bf16,D=128]", "sm_90"),
        ("rope[old,HALF=64]", "sm_80"), ("rope[old,HALF=64]", "sm_90")]
    assert "cycles" not in collected["records"][0] and collected["records"][0]["registers"] == 128
    broken, missing = collected["failures"]
    assert broken == {"kernel": "broken", "error": "failed to compile or analyse: "
                                                   "PassManager::run failed: out of shared memory"}
    assert missing["kernel"] == "fused_linear_ce_forward[bf16..."
    assert missing["error"].startswith("no shipped configuration starts with this name")
    json.dumps(collected)  # what the fresh process prints


def test_the_suites_name_the_kernels_their_gpu_rows_launch():
    kernels = benchmark.static_bound_kernels(["attention", "hf"])
    flat = [name for alternatives in kernels for name in alternatives]
    assert len(flat) == len(set(flat))  # attention's kernels are not asked for twice
    assert kernels[0] == ["attention_forward[bf16,D=128,sm_", "attention_forward[bf16,D=128]"]
    assert ["fused_linear_ce_forward[bf16,V=128256]", "fused_linear_ce_forward[bf16]"] in kernels
    assert benchmark.static_bound_kernels(["prepare", "loader", "distributed"]) == []
    assert benchmark.collect_static_bounds_for(["prepare"]) == {
        "kernels": [], "records": [], "failures": []}  # nothing compiled, no process started


def roofline_point(name, variant, device, of_peak, flops_per_s):
    return {"name": name, "variant": variant, "device": device, "of_peak": of_peak,
            "flops_per_s": flops_per_s, "flops": 1e12, "bytes": 1e9, "seconds": 1.0,
            "intensity": 1000.0, "of_bound": of_peak, "bound": "compute"}


def small_report(static_bounds, preset="smoke", **extra) -> dict:
    return {"preset": preset, "scale": 0.02, "repeats": 1, "suites": ["attention"],
            "ratios": [{"name": "varlen attention fwd+bwd (CPU)",
                        "baseline": "SDPA + dense document mask", "ratio": 3.5,
                        "note": "143 ms vs 510 ms"}],
            "metrics": [], "series": [], "peaks": [],
            "roofline": [roofline_point("varlen attention fwd+bwd",
                                        "cptfast varlen (per-document SDPA)", "cpu", 0.378,
                                        141e9),
                         roofline_point("varlen attention fwd+bwd",
                                        "SDPA + dense document mask", "cpu", 0.105, 39e9)],
            "skipped": [], "environment": {"torch": torch.__version__}, "plots": [],
            "static_bounds": static_bounds, **extra}


def test_report_puts_the_static_bounds_beside_the_measured_figures(fake_static_model):
    static = benchmark.collect_static_bounds(
        [["attention_forward[bf16,D=128]"], ["attention_forward[bf16,D=64]"],
         ["rope[old,HALF=64]"], ["broken"]])
    text = benchmark._markdown(small_report(static))
    start = text.index("## Static bounds (from the SASS, not measured)")
    section = text[start:text.index("\n## ", start)]
    lines = section.splitlines()
    header = next(line for line in lines if line.startswith("| kernel family"))
    assert header == ("| kernel family | configurations | sm_80: bound (limiter); peer | "
                      "sm_90: bound (limiter); peer | measured in this run (ours) |")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines
            if line.startswith("| ") and line != header}
    assert set(rows) == {"attention_forward", "rope"}
    # Per family and arch: least - largest bound over its configurations, their limiters
    # (most frequent first), the peer; beside them our own timed figure, not the baseline's.
    assert rows["attention_forward"] == (
        "| attention_forward | 2: bf16,D=128; bf16,D=64 | 0.39 - 0.47 (shared, fp32); "
        "peer 0.73 | 0.36 - 0.41 (issue); peer 0.75 | cpu: 37.8% of peak, 141.00 GFLOP/s "
        "(varlen attention fwd+bwd) |")
    assert rows["rope"] == ("| rope | 1: old,HALF=64 | 1.00 (memory); peer 0.90 | 1.00 "
                            "(memory); peer 0.90 | not timed in this run |")
    assert "Peers: sm_80: peer of attention_forward on sm_80;" in section
    assert ("- broken: no bound: failed to compile or analyse: PassManager::run failed: out "
            "of shared memory") in section
    assert "not a measurement" in section and "the PyTorch reference path" in section
    assert "nan" not in text.lower()
    assert text.index("## Roofline") < text.index("## Static bounds") < text.index(
        "## Not measured here")


def test_report_says_when_the_static_bounds_were_left_out():
    text = benchmark._markdown(small_report({"skipped": "left out (--no-static-bounds)"}))
    assert ("## Static bounds (from the SASS, not measured)\n\nNot computed: left out "
            "(--no-static-bounds).") in text


def test_bench_parser_takes_gpu_check_and_no_static_bounds():
    from cptfast.cli import build_parser

    args = build_parser().parse_args(["bench", "--preset", "gpu-check", "--no-static-bounds"])
    assert args.preset == "gpu-check" and args.no_static_bounds
    assert not build_parser().parse_args(["bench"]).no_static_bounds
    assert "gpu-check" in benchmark.PRESETS


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_check_stops_at_once_with_one_line_without_a_gpu(tmp_path):
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, "-m", "cptfast", "bench", "--preset", "gpu-check",
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith("cptfast bench: error: --preset gpu-check needs a CUDA GPU; this "
                           f"machine has none (torch {torch.__version__}, ")
    assert "cuda available: False" in line and "Traceback" not in done.stderr
    assert not out.exists()  # nothing started, nothing written


def test_gpu_check_runs_the_cuda_tests_then_the_gpu_rows(tmp_path, monkeypatch, capsys):
    """The steps and the report of gpu-check, with the GPU's part faked: which pytest runs it
    starts, with what, and how their results land in the report and the exit status."""
    runs = []

    def fake_pytest(arguments, *, cwd, env, timeout=None):
        runs.append({"arguments": arguments, "env": env, "timeout": timeout})
        if env.get("CPTFAST_TEST_DEVICE") == "cuda":
            output = ("..F.s\n=== short test summary info ===\n"
                      "SKIPPED [2] tests/kernels/test_rope.py:40: CUDA test mode: CPU only\n"
                      "FAILED tests/kernels/test_attention.py::test_grads[128] - "
                      "AssertionError: max error 0.3\n"
                      "1 failed, 40 passed, 2 skipped in 61.20s (0:01:01)\n")
            return {"returncode": 1, "output": output, "timed_out": False, "seconds": 61.3}
        with open(env["CPTFAST_BENCH_REPORT"], "w") as f:
            json.dump({"ratios": [{"name": "fused linear CE fwd+bwd time (GPU, N=8192)",
                                   "baseline": "eager bf16", "ratio": 1.8, "note": "12 ms"},
                                  {"name": "fused linear CE (GPU)", "baseline": "Liger-Kernel",
                                   "ratio": float("nan"), "note": "not installed"}],
                       "metrics": [], "series": [], "peaks": [], "roofline": []}, f)
        output = "SKIPPED [1] bench/bench_distributed.py:50: needs 2 CUDA GPUs\n"
        return {"returncode": 0, "output": output, "timed_out": False, "seconds": 200.0}

    monkeypatch.setattr(benchmark, "require_cuda", lambda: None)
    monkeypatch.setattr(benchmark, "_device_name", lambda: "NVIDIA H200")
    monkeypatch.setattr(benchmark, "_pytest", fake_pytest)
    monkeypatch.setattr(benchmark, "collect_static_bounds_for",
                        lambda suites, timeout: {"kernels": [], "records": [], "failures": [
                            {"kernel": "every kernel", "error": f"faked, {timeout} s"}]})
    monkeypatch.setattr(benchmark, "_plot", lambda report, out: [])
    from cptfast.cli import main

    assert main(["bench", "--preset", "gpu-check", "--out", str(tmp_path)]) == 1
    tests, rows = runs
    assert tests["arguments"][:2] == ["tests/kernels", "tests/hf"]
    assert "--ignore=tests/kernels/test_aot.py" in tests["arguments"]
    assert tests["arguments"][tests["arguments"].index("-m") + 1] == "not slow"
    assert "TRITON_INTERPRET" not in tests["env"]
    assert tests["timeout"] == benchmark.GPU_TEST_SECONDS
    assert rows["arguments"][-2:] == ["-m", "gpu"]
    assert rows["timeout"] == benchmark.GPU_BENCH_SECONDS
    assert "CPTFAST_TEST_DEVICE" not in rows["env"]
    assert rows["env"]["CPTFAST_BENCH_PRESET"] == "gpu-check"
    printed = capsys.readouterr()
    assert "CUDA tests: 1 failed, 40 passed, 2 skipped" in printed.out
    assert "CUDA tests: 1 failed or errored (pytest exit 1)" in printed.err

    report = json.loads((tmp_path / "report.json").read_text())
    assert report["device"] == "NVIDIA H200" and report["tests"]["counts"] == {
        "failed": 1, "passed": 40, "skipped": 2}
    text = (tmp_path / "tests.log").read_text()
    assert "1 failed, 40 passed" in text
    text = (tmp_path / "report.md").read_text()
    assert text.startswith("## 2") and "NVIDIA H200, torch" in text.splitlines()[0]
    for expected in ("### Tests in the CUDA test mode",
                     "CPTFAST_TEST_DEVICE=cuda python -m pytest tests/kernels tests/hf",
                     ": 1 failed, 40 passed, 2 skipped in 61 s.",
                     "- failed: tests/kernels/test_attention.py::test_grads[128]: "
                     "AssertionError: max error 0.3",
                     "- tests/kernels/test_rope.py: CUDA test mode: CPU only",
                     "### GPU rows of the suites",
                     "| fused linear CE fwd+bwd time (GPU, N=8192) | eager bf16 | 1.80x | 12 ms |",
                     "| fused linear CE (GPU) | Liger-Kernel | not measured | not installed |",
                     "### Static bounds (from the SASS, not measured)",
                     "- every kernel: no bound: faked, 90 s",
                     "### Problems", "### Not measured here",
                     "- bench/bench_distributed.py: needs 2 CUDA GPUs"):
        assert expected in text, expected
