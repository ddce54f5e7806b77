"""What a run reports: one JSON line per step (and per evaluation) in ``metrics.jsonl``, a tqdm
progress bar with tokens/s and ETA, TensorBoard events when installed, and the estimates that
need a model or a device (FLOPs per token, peak FLOP/s, peak memory).

``metrics.jsonl`` is only ever appended to. On resume, the lines a killed run wrote after its
checkpoint (and a line torn by a kill or a full disk) are dropped by writing the kept part to a
new file and renaming it over the old one: a kill at any moment leaves the old history or the
new one, never less.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import resource
import sys
from pathlib import Path

import torch

from cptfast.data.formats import fsync_path
from cptfast.errors import DiskFullError

# Dense bf16 tensor-core peak FLOP/s by GPU name (for the MFU estimate).
_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12,
              "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


class MetricsLog:
    """Writes nothing unless ``enabled`` (rank 0 of a distributed run)."""

    def __init__(self, run_dir: Path, *, keep_through: int, enabled: bool, progress: bool,
                 tensorboard: bool, total_steps: int):
        """``keep_through``: the step of the state the run resumes from (-1: a new run); the
        records of later steps are dropped."""
        self.file = self.bar = self.board = None
        if not enabled:
            return
        self.path = run_dir / "metrics.jsonl"
        _keep_through(self.path, keep_through)
        self.file = self.path.open("ab", buffering=0)  # each line reaches the file at once
        resume_step = max(keep_through, 0)
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=resume_step, unit="step",
                            dynamic_ncols=True, leave=False)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.board = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self.board = None

    def step(self, step: int, values: dict, *, write: bool = True) -> None:
        if self.file is None:
            return
        if write:
            self._write({"step": step, **values})
            if self.board is not None:
                for name, value in values.items():
                    if value is not None:
                        self.board.add_scalar(f"train/{name}", value, step)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            loss = values["loss"]
            self.bar.set_postfix(loss="-" if loss is None else f"{loss:.3f}",
                                 tok_s=f"{values['tokens_per_s']:,.0f}", refresh=False)

    def eval(self, step: int, losses: dict[str, float]) -> None:
        if self.file is None:
            return
        entry = {"step": step, "eval": {name: {"loss": loss, "perplexity": _perplexity(loss)}
                                        for name, loss in losses.items()}}
        self._write(entry)
        if self.board is not None:
            for name, loss in losses.items():
                self.board.add_scalar(f"eval/{name}_loss", loss, step)

    def _write(self, entry: dict) -> None:
        data = (json.dumps(entry) + "\n").encode()
        try:
            while data:  # an unbuffered write may be short (a disk filling up)
                data = data[self.file.write(data):]
        except OSError as error:
            full = DiskFullError.caused(error, f"{self.path}: no space left on device while "
                                               "writing the metrics; free some space and rerun "
                                               "the same command to resume")
            if full is None:
                raise
            raise full from error

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for part in (self.bar, self.board, self.file):
            if part is not None:
                part.close()
        self.file = self.bar = self.board = None


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def _keep_through(path: Path, step: int) -> None:
    """Keep the records of steps <= ``step`` (the history of the state being resumed), drop
    the later ones and a torn line (reported in one line). Records are in step order, so only
    the tail is read; when something is dropped the kept part is written to a new file that
    replaces the old one."""
    for stale in path.parent.glob(path.name + ".tmp-*"):  # a rewrite that a kill interrupted
        stale.unlink()
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        size = keep = len(data)
        torn = 0
        while keep and step >= 0:  # from the end: a torn line, the records after ``step``
            start = data.rfind(b"\n", 0, keep - 1) + 1
            line = data[start:keep]
            try:
                if line.endswith(b"\n") and json.loads(line)["step"] <= step:
                    break
            except (ValueError, KeyError, TypeError):
                torn += 1
            else:
                torn += not line.endswith(b"\n")
            keep = start
        if torn:
            print(f"cptfast train: warning: {path}: dropped {torn} torn line(s) (a write cut by "
                  "a kill or a full disk)", file=sys.stderr)
        if keep == size:
            return
        staging = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        with staging.open("wb") as out:
            for offset in range(0, keep, 1 << 20):
                out.write(data[offset:min(offset + (1 << 20), keep)])
    fsync_path(staging)
    os.replace(staging, path)
    fsync_path(path.parent)


def model_flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (parameters outside the embedding) plus the attention
    scores and weighted sum, 12 x layers x hidden x seq_len (an upper bound for packed
    documents, which are shorter than the row)."""
    config = model.config
    embedding = model.get_input_embeddings().weight.numel()
    parameters = sum(p.numel() for p in model.parameters()) - embedding
    if model.get_output_embeddings().weight is model.get_input_embeddings().weight:
        parameters += embedding  # a tied head still costs its matmul
    attention = 12 * config.num_hidden_layers * config.hidden_size * seq_len
    return 6 * parameters + attention


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in _PEAK_BF16.items() if key in name), None)


def peak_memory(device: torch.device) -> int:
    """Peak bytes: allocated on the GPU, resident on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
