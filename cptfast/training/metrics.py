"""What a run reports, as callbacks (`callbacks.Callback`): one JSON line per step (and per
evaluation) in ``metrics.jsonl``, a tqdm progress bar with tokens/s and ETA, TensorBoard events
when installed, Weights & Biases and MLflow when configured; and the estimates that need a
model or a device (FLOPs per token, peak FLOP/s, peak memory).

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
import time
from pathlib import Path

import torch

from cptfast.data.formats import fsync_path
from cptfast.errors import ConfigError, DiskFullError
from cptfast.training.callbacks import Callback

# Dense bf16 tensor-core peak FLOP/s by GPU name (for the MFU estimate).
_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12,
              "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


class MetricsWriter(Callback):
    """A callback that records step metrics every ``every`` steps (and every skipped step,
    so that none goes unseen) and every evaluation. The trainer calls ``close()`` however
    the run ends."""

    def __init__(self, every: int = 1):
        self.every = every

    def due(self, result) -> bool:
        return result.step % self.every == 0 or not result.applied


class MetricsFile(MetricsWriter):
    """``metrics.jsonl``: one JSON line per recorded step and per evaluation. ``keep_through``
    is the step of the state the run resumes from (-1: a new run); the lines of later steps
    are dropped first."""

    def __init__(self, run_dir: Path, *, keep_through: int, every: int = 1):
        super().__init__(every)
        self.path = run_dir / "metrics.jsonl"
        _keep_through(self.path, keep_through)
        self.file = self.path.open("ab", buffering=0)  # each line reaches the file at once

    def on_step_end(self, trainer, result) -> None:
        if self.due(result):
            self._write({"step": result.step, **result.metrics()})

    def on_eval(self, trainer, step: int, losses: dict[str, float]) -> None:
        self._write({"step": step, "eval": {name: {"loss": loss, "perplexity": _perplexity(loss)}
                                            for name, loss in losses.items()}})

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

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()


class ProgressBar(Callback):
    """A tqdm bar: steps, the step's loss and tokens/s, the ETA."""

    def __init__(self, total_steps: int, initial: int):
        from tqdm import tqdm
        self.bar = tqdm(total=total_steps, initial=initial, unit="step", dynamic_ncols=True,
                        leave=False)

    def on_step_end(self, trainer, result) -> None:
        self.bar.update(result.step - self.bar.n)
        self.bar.set_postfix(loss="-" if result.loss is None else f"{result.loss:.3f}",
                             tok_s=f"{result.tokens_per_s:,.0f}", refresh=False)

    def close(self) -> None:
        self.bar.close()


class TensorBoard(MetricsWriter):
    """TensorBoard events under ``run_dir/tensorboard`` (train/NAME, eval/SET_loss)."""

    def __init__(self, run_dir: Path, every: int = 1):
        from torch.utils.tensorboard import SummaryWriter
        super().__init__(every)
        self.board = SummaryWriter(str(run_dir / "tensorboard"))

    def on_step_end(self, trainer, result) -> None:
        if self.due(result):
            for name, value in result.metrics().items():
                if value is not None:
                    self.board.add_scalar(f"train/{name}", value, result.step)

    def on_eval(self, trainer, step: int, losses: dict[str, float]) -> None:
        for name, loss in losses.items():
            self.board.add_scalar(f"eval/{name}_loss", loss, step)

    def close(self) -> None:
        self.board.close()  # (closing twice is harmless)


class WandB(MetricsWriter):
    """Weights & Biases (``logging.wandb``: the keyword arguments of wandb.init, e.g. project,
    name, mode = "offline"). A resumed run continues the same W&B run: its id is kept in the
    run directory."""

    def __init__(self, run_dir: Path, settings: dict, config: dict, every: int = 1):
        import wandb
        super().__init__(every)
        id_file = run_dir / "wandb_run_id"
        resume = {"id": id_file.read_text().strip(), "resume": "allow"} if id_file.is_file() \
            else {}
        self.run = wandb.init(**{"dir": str(run_dir), "config": config, **resume, **settings})
        id_file.write_text(self.run.id + "\n")

    def on_step_end(self, trainer, result) -> None:
        if self.due(result):
            self.run.log({f"train/{k}": v for k, v in result.metrics().items()
                          if v is not None}, step=result.step)

    def on_eval(self, trainer, step: int, losses: dict[str, float]) -> None:
        self.run.log({f"eval/{name}_loss": loss for name, loss in losses.items()}, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class MLflow(MetricsWriter):
    """MLflow (``logging.mlflow``: tracking_uri, experiment, run_name). A resumed run logs into
    the same MLflow run: its id is kept in the run directory."""

    def __init__(self, run_dir: Path, settings: dict, config: dict, every: int = 1):
        from mlflow import MlflowClient
        super().__init__(every)
        unknown = set(settings) - {"tracking_uri", "experiment", "run_name"}
        if unknown:
            raise ConfigError(f"logging.mlflow: unknown keys {sorted(unknown)}; known: "
                              "tracking_uri, experiment, run_name")
        self.client, self.finished = MlflowClient(tracking_uri=settings.get("tracking_uri")), False
        id_file = run_dir / "mlflow_run_id"
        if id_file.is_file():
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            name = settings.get("experiment", "cptfast")
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = (experiment.experiment_id if experiment is not None
                             else self.client.create_experiment(name))
            run = self.client.create_run(experiment_id, run_name=settings.get("run_name"))
            self.run_id = run.info.run_id
            id_file.write_text(self.run_id + "\n")
            self.client.log_dict(self.run_id, config, "config.json")

    def _log(self, values: dict, step: int) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[
            Metric(name, float(value), now, step) for name, value in values.items()
            if value is not None])

    def on_step_end(self, trainer, result) -> None:
        if self.due(result):
            self._log({f"train/{k}": v for k, v in result.metrics().items()}, result.step)

    def on_eval(self, trainer, step: int, losses: dict[str, float]) -> None:
        self._log({f"eval/{name}_loss": loss for name, loss in losses.items()}, step)

    def on_train_end(self, trainer, result) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED")
        self.finished = True

    def close(self) -> None:  # also after an error or a stop by signal
        if not self.finished:
            self.client.set_terminated(self.run_id, status="KILLED")
            self.finished = True


def writers(config, run_dir: Path, keep_through: int, initial_step: int) -> list[Callback]:
    """The metrics callbacks ``config.logging`` asks for (rank 0 only)."""
    from cptfast.training.config import to_dict

    log = config.logging
    found: list[Callback] = [MetricsFile(run_dir, keep_through=keep_through, every=log.every)]
    if log.progress:
        found.append(ProgressBar(config.train.steps, initial_step))
    if log.tensorboard:
        try:
            found.append(TensorBoard(run_dir, log.every))
        except ImportError:  # tensorboard is optional
            pass
    for key, cls in (("wandb", WandB), ("mlflow", MLflow)):
        settings = getattr(log, key)
        if settings:
            try:
                found.append(cls(run_dir, settings, to_dict(config), log.every))
            except ImportError:
                raise ConfigError(f"logging.{key} is set but {key} is not installed: pip "
                                  f"install {key if key == 'wandb' else 'mlflow-skinny'}, or "
                                  f"remove logging.{key}") from None
    return found


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
