"""The CUDA test mode (CPTFAST_TEST_DEVICE=cuda) refuses to run where there is no GPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def run_pytest(*args, **env):
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_mode_stops_at_once_without_a_gpu():
    done = run_pytest("tests/kernels/test_rope.py", "-q", CPTFAST_TEST_DEVICE="cuda")
    assert done.returncode == pytest.ExitCode.USAGE_ERROR, done.stdout + done.stderr
    assert "CPTFAST_TEST_DEVICE=cuda needs a CUDA GPU" in done.stderr
    assert "passed" not in done.stdout and "collected" not in done.stdout


def test_an_unknown_test_device_is_refused():
    done = run_pytest("tests/kernels/test_rope.py", "-q", CPTFAST_TEST_DEVICE="tpu")
    assert done.returncode == pytest.ExitCode.USAGE_ERROR, done.stdout + done.stderr
    assert "CPTFAST_TEST_DEVICE must be cpu or cuda, got 'tpu'" in done.stderr
