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
    from cptfast.aot import ARCHITECTURES, shipped_specs
    assert f"{len(shipped_specs()) * len(ARCHITECTURES)} configurations, 0 with spills" \
        in done.stdout
    assert done.stdout.count("registers") == len(shipped_specs()) * len(ARCHITECTURES)


def test_bench_smoke_preset_writes_a_well_formed_report(tmp_path):
    done = cptfast("bench", "--suite", "attention", "--suite", "loader", "--preset", "smoke",
                   "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["preset"] == "smoke" and report["environment"]["torch"]
    assert report["ratios"] and all(math.isfinite(r["ratio"]) and r["ratio"] > 0
                                    for r in report["ratios"])
    for skipped in report["skipped"]:
        assert skipped["reason"]
    text = (tmp_path / "report.md").read_text()
    assert "| ratio |" in text and "attention tiles visited" in text
