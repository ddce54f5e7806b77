"""Data-parallel scaling: `cptfast train` on 1 rank against `torchrun --nproc_per_node=2` (DDP,
gloo) on the CPU, same model, corpus and global batch in tokens — reported, not a goal (the
2-core development machine gives each of 2 ranks one core). On a machine with 2+ GPUs the same
comparison runs on NCCL.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import SCALE, TRAIN_SEQ_LEN, record_metric, record_ratio

STEPS = max(4, int(12 * SCALE))


def run(root, ranks: int, device: str) -> float:
    """Training tokens/s of the loop (from the run's metrics, after the first step)."""
    run_dir = root / f"dist-{ranks}-{device}"
    overrides = [f'--model.path="{root / "model"}"',
                 f'--data.sources.corpus.path="{root / "shards"}"',
                 f"--data.seq_len={TRAIN_SEQ_LEN}", "--data.batch_size=2",
                 f"--optim.global_batch_tokens={TRAIN_SEQ_LEN * 4}", f"--train.steps={STEPS}",
                 f'--train.output="{run_dir}"', f'--train.device="{device}"',
                 '--train.precision="%s"' % ("fp32" if device == "cpu" else "bf16-mixed"),
                 "--checkpoint.every=0", "--checkpoint.resume=none", "--logging.progress=false",
                 "--logging.tensorboard=false"]
    launcher = ([sys.executable, "-m", "cptfast"] if ranks == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                 "-m", "cptfast"])
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // ranks))}
    done = subprocess.run([*launcher, "train", *overrides], env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [entry["tokens_per_s"] for entry in lines if "tokens_per_s" in entry][1:]
    return sum(rates) / len(rates)


def test_scaling_cpu(benchmark, train_inputs):
    one = run(train_inputs, 1, "cpu")
    two = benchmark.pedantic(lambda: run(train_inputs, 2, "cpu"), rounds=1, iterations=1)
    record_ratio("train: 2 ranks DDP / 1 rank (CPU, gloo)", "1 rank, same global batch",
                 two / one, f"{two:,.0f} vs {one:,.0f} tokens/s on {os.cpu_count()} cores "
                            "(reported, not a goal)")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_scaling_gpu(benchmark, train_inputs):
    one = run(train_inputs, 1, "cuda")
    ranks = torch.cuda.device_count()
    many = benchmark.pedantic(lambda: run(train_inputs, ranks, "cuda"), rounds=1, iterations=1)
    record_metric(f"train: {ranks} GPUs DDP scaling", f"{many / one:.2f}x",
                  f"{many:,.0f} vs {one:,.0f} tokens/s")
