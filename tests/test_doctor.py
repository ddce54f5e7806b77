"""`cptfast doctor` and `cptfast bench` end to end."""

import json
import math
import subprocess
import sys


def cptfast(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "cptfast", *args], capture_output=True,
                          text=True, **kwargs)


def test_doctor_reports_the_environment_and_every_shipped_kernel():
    done = cptfast("doctor")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "torch" in done.stdout and "extension cptfast._C   built" in done.stdout
    from cptfast.aot import shipped_table
    shipped = sum(len(entry["archs"]) for entry in shipped_table())
    assert (f"{shipped} configurations, 0 with spills or too much shared memory, 0 launch "
            "configurations not shipped") in done.stdout
    assert done.stdout.count("registers") == shipped


def test_doctor_fails_on_a_spill_or_a_launch_config_that_is_not_shipped(monkeypatch, capsys):
    import cptfast.aot as aot
    from cptfast import doctor

    good = aot.CompiledKernel("rope[bf16,D=16,H=1]", 90, 40, 0, 0, 0, ".target sm_90")
    spilling = aot.CompiledKernel("rope[bf16,D=16,H=2]", 90, 255, 16, 0, 0, ".target sm_90")
    monkeypatch.setattr(aot, "missing_configs", lambda: [])
    monkeypatch.setattr(aot, "compile_all", lambda: [good])
    assert doctor.run() == 0
    monkeypatch.setattr(aot, "compile_all", lambda: [good, spilling])
    assert doctor.run() == 1 and "  SPILLS rope[bf16,D=16,H=2]" in capsys.readouterr().out
    monkeypatch.setattr(aot, "compile_all", lambda: [good])
    monkeypatch.setattr(aot, "missing_configs", lambda: ["rope_kernel {'BLOCK_H': 2}"])
    assert doctor.run() == 1
    assert "NOT SHIPPED (launch_config can return it, nothing compiles it): rope_kernel " \
        "{'BLOCK_H': 2}" in capsys.readouterr().out


def test_doctor_perf_writes_the_records_and_the_calibration(tmp_path):
    out = tmp_path / "perf.json"
    done = cptfast("doctor", "--perf", "--kernel", "attention_forward[bf16,D=128,sm_",
                   "--json", str(out))  # each architecture has its own tiles at D = 128
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "upper bound on the fraction of peak, not a measurement" in done.stdout
    records = json.loads(out.read_text())
    kernels = [r for r in records if not r["calibration"]]
    assert [(r["kernel"], r["arch"]) for r in kernels] == [
        ("attention_forward[bf16,D=128,sm_80]", "sm_80"),
        ("attention_forward[bf16,D=128,sm_90]", "sm_90")]
    assert {r["kernel"].split("[")[0] for r in records if r["calibration"]} == {"matmul", "copy"}
    for record in kernels:
        assert record["kernel"] in done.stdout and 0 < record["bound_fraction"] <= 1
    nothing = cptfast("doctor", "--perf", "--kernel", "no_such_kernel")
    assert nothing.returncode == 1 and "no shipped kernel configuration starts with" in \
        nothing.stdout


def test_bench_smoke_preset_writes_a_well_formed_report(tmp_path):
    from cptfast.benchmark import SUITES

    done = cptfast("bench", "--preset", "smoke", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["preset"] == "smoke" and report["repeats"] == 1
    assert report["suites"] == list(SUITES) and report["environment"]["torch"]
    # Every ratio measured here is a positive finite number; what could not run says why.
    measured = [r for r in report["ratios"] if math.isfinite(r["ratio"])]
    assert len(measured) >= 15 and all(r["ratio"] > 0 for r in measured)
    assert all(r["note"] for r in report["ratios"] if not math.isfinite(r["ratio"]))
    assert report["skipped"] and all(s["reason"] for s in report["skipped"])
    assert {s["where"].split("::")[0] for s in report["skipped"]} <= {
        f"bench/bench_{suite}.py" for suite in SUITES}
    # The roofline: measured CPU peaks, every point under the measured roof (with slack for
    # timing noise on a shared machine), all numbers finite and positive.
    [peaks] = report["peaks"]
    assert peaks["device"] == "cpu" and peaks["flops_per_s"] > 1e8 and peaks["bytes_per_s"] > 1e8
    assert {r["name"].split(" (")[0] for r in report["roofline"]} >= {
        "linear cross-entropy fwd+bwd", "varlen attention fwd+bwd",
        "transformers training step", "end-to-end training"}
    for point in report["roofline"]:
        values = [point[k] for k in ("flops", "bytes", "seconds", "flops_per_s", "of_peak")]
        assert all(math.isfinite(v) and v > 0 for v in values), point
        assert point["of_bound"] <= 1.5 and point["bound"] in ("compute", "memory")
    for series in report["series"]:
        assert all(math.isfinite(y) for points in series["lines"].values() for _, y in points)
    losses = next(s for s in report["series"] if s["name"] == "end-to-end training loss")
    ours = [y for _, y in losses["lines"]["cptfast train"]]
    assert ours[-1] < ours[0]  # Zipfian words: the loss falls within a few steps
    assert set(report["plots"]) >= {"ratios.png", "roofline-cpu.png",
                                    "end-to-end-training-loss.png"}
    assert all((tmp_path / plot).stat().st_size > 1000 for plot in report["plots"])
    text = (tmp_path / "report.md").read_text()
    for heading in ("| ratio |", "## Roofline", "## Not measured here", "## Environment"):
        assert heading in text
    assert "attention tiles visited" in text and "nan" not in text.lower().replace("nanogpt", "")


def test_roofline_point_against_hand_computed_values():
    from cptfast.benchmark import roofline_point

    peaks = {"flops_per_s": 1000.0, "bytes_per_s": 10.0}  # ridge at 100 FLOP per byte
    low = roofline_point(flops=400.0, bytes_moved=20.0, seconds=4.0, peaks=peaks)
    assert low["intensity"] == 20.0 and low["bound"] == "memory"
    assert low["flops_per_s"] == 100.0 and low["of_peak"] == 0.1
    assert low["of_bound"] == 0.5  # the memory roof at intensity 20 is 200 FLOP/s
    high = roofline_point(flops=4000.0, bytes_moved=8.0, seconds=8.0, peaks=peaks)
    assert high["intensity"] == 500.0 and high["bound"] == "compute"
    assert high["of_peak"] == high["of_bound"] == 0.5


def test_bench_rejects_bad_arguments_before_running_anything(tmp_path):
    import pytest

    from cptfast.benchmark import run

    for arguments, message in (({"preset": "huge"}, "preset must be one of"),
                               ({"preset": "smoke", "repeats": 0}, "repeats must be at least 1"),
                               ({"preset": "smoke", "suites": ["gpu"]}, "unknown suites")):
        with pytest.raises(ValueError, match=message):
            run(arguments.pop("suites", None), out=tmp_path / "report", **arguments)
    assert not (tmp_path / "report").exists()
