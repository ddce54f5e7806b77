"""Training on 2 ranks (real processes through torchrun, gloo on the CPU): DDP and FSDP2 follow
the 1-rank run with the same global batch, checkpoints move between world sizes, the
consolidated export loads in transformers, and a dead rank stops the run instead of hanging."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_train import FAULT_INJECTION, toml

STEPS = 6


def train_command(setup, run_dir: Path, name: str, parallel: str = "ddp",
                  kill: str = "") -> list[str]:
    """What each launch runs after the interpreter (alone or as torchrun's script):
    `cptfast train CONFIG OVERRIDES`, through fault_injection.py when ``kill`` is set."""
    # 128 tokens per step: 2 micro-batches of 2 x 32 on 1 rank, 1 on each of 2 ranks.
    config = run_dir.parent / f"{run_dir.name}-{name}.toml"
    config.write_text(toml(setup, run_dir))
    overrides = [f"--train.steps={STEPS}", f'--train.parallel="{parallel}"',
                 "--train.timeout_s=60", "--train.deterministic=false", "--checkpoint.every=3",
                 "--eval.every=0"]
    program = [str(FAULT_INJECTION), kill] if kill else ["-m", "cptfast"]  # the same command
    return [*program, "train", str(config), *overrides]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(setup, run_dir: Path, ranks: int, parallel: str = "ddp", kill: str = "",
        timeout: int = 240) -> subprocess.CompletedProcess:
    command = train_command(setup, run_dir, f"{ranks}-{parallel}", parallel, kill)
    if ranks > 1:
        command = ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                   "--master_port", str(29500 + os.getpid() % 1000), *command]
    return subprocess.run([sys.executable, *command], env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def losses(run_dir: Path, key: str = "loss") -> list[float]:
    entries = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [e[key] for e in entries if "loss" in e]


def final_weights(run_dir: Path) -> dict:
    return load_file(run_dir / "checkpoints" / f"step-{STEPS:08d}" / "model.safetensors")


def assert_close_weights(got: dict, want: dict):
    """Equal up to the summation order of the gradient reduction (which Adam's normalisation
    amplifies for elements with near-zero gradients): relative to each tensor's scale."""
    assert got.keys() == want.keys()
    for name in want:
        error = (got[name] - want[name]).abs().max() / want[name].abs().max()
        assert error < 1e-4, (name, float(error))


def completed(setup, run_dir: Path, ranks: int, parallel: str = "ddp") -> Path:
    """``run_dir`` after a run that must succeed."""
    done = run(setup, run_dir, ranks, parallel)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def one_rank(setup, tmp_path_factory):
    return completed(setup, tmp_path_factory.mktemp("dist") / "one", 1)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_two_ranks_follow_one_rank(setup, one_rank, tmp_path, parallel):
    run_dir = completed(setup, tmp_path / parallel, 2, parallel)
    assert losses(run_dir) == pytest.approx(losses(one_rank), rel=1e-5)
    # The gradient itself, not only its direction (Adam would hide a scale error).
    assert losses(run_dir, "grad_norm") == pytest.approx(losses(one_rank, "grad_norm"), rel=1e-4)
    assert_close_weights(final_weights(run_dir), final_weights(one_rank))
    if parallel == "fsdp2":  # the consolidated export loads in transformers
        from transformers import AutoModelForCausalLM
        loaded = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" /
                                                      f"step-{STEPS:08d}").eval()
        reference = AutoModelForCausalLM.from_pretrained(one_rank / "checkpoints" /
                                                         f"step-{STEPS:08d}").eval()
        ids = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, reference(ids).logits,
                                       rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("before,after", [((2, "ddp"), (1, "ddp")), ((1, "ddp"), (2, "fsdp2"))])
def test_a_checkpoint_resumes_on_another_world_size(setup, one_rank, tmp_path, before,
                                                    after):
    run_dir = tmp_path / "moved"
    killed = run(setup, run_dir, *before, kill="step:4")  # the last checkpoint is step 3
    assert killed.returncode != 0
    assert (run_dir / "checkpoints" / "step-00000003").is_dir()
    completed(setup, run_dir, *after)
    assert losses(run_dir) == pytest.approx(losses(one_rank), rel=1e-5)
    assert_close_weights(final_weights(run_dir), final_weights(one_rank))


def test_ranks_share_one_global_stream(setup):
    from cptfast.data import PackedLoader

    sources = {"domain": setup / "domain", "general": setup / "general"}
    alone = PackedLoader(sources, 32, 4, seed=3, num_threads=0)
    pair = [PackedLoader(sources, 32, 2, seed=3, rank=r, world_size=2, num_threads=0)
            for r in range(2)]
    for _ in range(3):
        want = next(alone)
        got = [next(loader) for loader in pair]
        rows = torch.cat([b.global_rows for b in got])
        assert set(got[0].global_rows.tolist()).isdisjoint(got[1].global_rows.tolist())
        assert sorted(rows.tolist()) == sorted(want.global_rows.tolist())
        order = rows.argsort()
        stacked = torch.cat([b.input_ids for b in got])[order]
        assert torch.equal(stacked, want.input_ids[want.global_rows.argsort()])


def test_a_dead_rank_stops_the_run(setup, tmp_path):
    started = time.monotonic()
    done = run(setup, tmp_path / "dead", 2, kill="step:2,rank:1", timeout=180)
    assert done.returncode != 0
    assert time.monotonic() - started < 150
    assert "Signal 9" in done.stderr or "SIGKILL" in done.stderr or "exitcode" in done.stderr
