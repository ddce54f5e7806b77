"""What a run reports: one JSON line per step (and per evaluation) in ``metrics.jsonl``, a tqdm
progress bar with tokens/s and ETA, TensorBoard events when installed, and the estimates that
need a model or a device (FLOPs per token, peak FLOP/s, peak memory)."""

from __future__ import annotations

import json
import math
import resource
from pathlib import Path

import torch

# Dense bf16 tensor-core peak FLOP/s by GPU name (for the MFU estimate).
_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12,
              "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


class MetricsLog:
    """Writes nothing unless ``enabled`` (rank 0 of a distributed run)."""

    def __init__(self, run_dir: Path, *, resume_step: int, enabled: bool, progress: bool,
                 tensorboard: bool, total_steps: int):
        self.file = self.bar = self.board = None
        if not enabled:
            return
        self.path = run_dir / "metrics.jsonl"
        _truncate_after(self.path, resume_step)  # lines a killed run wrote past its checkpoint
        self.file = self.path.open("a")
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
            self.bar.set_postfix(loss=f"{values['loss']:.3f}",
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
        self.file.write(json.dumps(entry) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.board is not None:
            self.board.close()
        if self.file is not None:
            self.file.close()
            self.file = None


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def _truncate_after(path: Path, step: int) -> None:
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


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
