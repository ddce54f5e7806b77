"""`cptfast merge`: interpolation endpoints, the held-out sweep, the command line."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from cptfast.training import train
from cptfast.training.merge import interpolate, merge
from test_train import in_process_config


@pytest.fixture(scope="module")
def tuned(setup, tmp_path_factory):
    run = tmp_path_factory.mktemp("merge") / "run"
    return train(in_process_config(setup, run, "--train.steps=4", "--checkpoint.every=0")
                 ).final_checkpoint


def test_interpolation_endpoints_and_midpoint(setup, tuned):
    base, end = (load_file(p / "model.safetensors") for p in (setup / "base", tuned))
    at0, at1, half = (interpolate(base, end, a) for a in (0.0, 1.0, 0.5))
    for name in base:
        assert torch.equal(at0[name], base[name]) and torch.equal(at1[name], end[name])
        torch.testing.assert_close(half[name], (base[name] + end[name]) / 2)
    wrong = dict(base, **{"lm_head.weight": base["lm_head.weight"][:-1]})
    with pytest.raises(ValueError, match="lm_head.weight: shape"):
        interpolate(wrong, end, 0.5)


def stock_loss(model_dir, batches) -> float:
    """Held-out loss the plain way: transformers logits and F.cross_entropy."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            width = b.input_ids.shape[1]
            for row in range(b.input_ids.shape[0]):  # each document of each row alone
                bounds = [int(x) - row * width for x in b.cu_seqlens
                          if row * width <= int(x) <= (row + 1) * width]
                for start, end in zip(bounds[:-1], bounds[1:]):
                    ids = b.input_ids[row:row + 1, start:end]
                    logits = model(ids).logits[0]
                    labels = b.labels[row, start:end]
                    total += float(torch.nn.functional.cross_entropy(
                        logits, labels, ignore_index=-100, reduction="sum"))
                    count += int((labels != -100).sum())
    return total / count


def test_sweep_endpoints_are_the_two_models(setup, tuned, tmp_path):
    from cptfast.training.evaluation import held_out_batches

    rows = merge(setup / "base", tuned, 0.5, tmp_path / "half",
                 eval_sets={"domain": str(setup / "domain")}, alphas=[0.0, 0.5, 1.0],
                 seq_len=32, batch_size=2, batches=3)
    batches = held_out_batches(setup / "domain", 32, 2, 3, torch.device("cpu"), name="domain")
    assert [r["alpha"] for r in rows] == [0.0, 0.5, 1.0]
    assert rows[0]["domain"] == pytest.approx(stock_loss(setup / "base", batches), rel=1e-5)
    assert rows[2]["domain"] == pytest.approx(stock_loss(tuned, batches), rel=1e-5)
    assert rows[2]["domain"] < rows[0]["domain"]  # the tuned model is better on its domain
    assert rows[1]["domain"] == pytest.approx(stock_loss(tmp_path / "half", batches), rel=1e-5)


def test_command_line(setup, tuned, tmp_path):
    done = subprocess.run([sys.executable, "-m", "cptfast", "merge",
                           "--base", str(setup / "base"), "--tuned", str(tuned), "--alpha", "0.25", "--output",
                           str(tmp_path / "m"), "--eval", f"domain={setup / 'domain'}",
                           "--alphas", "0,1", "--seq-len", "32", "--batches", "2"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[0].split() == ["alpha", "domain"]
    merged = load_file(tmp_path / "m" / "model.safetensors")
    base = load_file(setup / "base" / "model.safetensors")
    end = load_file(tuned / "model.safetensors")
    torch.testing.assert_close(merged["model.norm.weight"],
                               0.75 * base["model.norm.weight"] + 0.25 * end["model.norm.weight"])
