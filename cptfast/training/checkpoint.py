"""Checkpoints that survive anything, on any number of ranks.

A checkpoint directory ``checkpoints/step-NNNNNNNN`` holds:
- ``state/``: model and optimizer state written with `torch.distributed.checkpoint` (each rank
  its own part; loadable on a different number of ranks, which reshards);
- ``trainer_state.pt``: step, token count, data position, evaluations, config and every rank's
  RNG state (plain values and tensors: loaded with ``weights_only=True``);
- unless disabled, a consolidated Hugging Face export (safetensors, config, tokenizer files)
  that `transformers` loads as it is.
Everything is written under ``step-NNNNNNNN.partial-PID``, fsynced, and renamed into place by
rank 0 once every rank has finished, so a directory named ``step-NNNNNNNN`` is always complete;
a run killed while writing leaves only the partial directory, which is ignored and removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import warnings
from pathlib import Path

import torch

from cptfast.data.formats import fsync_path

FORMAT = 2
STATE_FILE = "trainer_state.pt"
MARKER = "cptfast_checkpoint.json"
_NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest(run_dir: str | Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def save(run_dir: str | Path, step: int, model, optimizer, tokenizer, meta: dict, context, *,
         keep: int, export: bool, ema: dict | None = None, kill_at: int | None = None) -> Path:
    """Write checkpoint ``step`` (a collective: every rank calls it) and keep the newest
    ``keep``. ``kill_at`` (tests only) SIGKILLs every rank half-way through checkpoint
    ``kill_at``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from cptfast.training.distributed import unwrap

    root = checkpoint_root(run_dir)
    if context.main:
        root.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(root)
    owner = context.gather(os.getpid())[0]  # the staging name every rank agrees on
    final = root / f"step-{step:08d}"
    staging = root / f"{final.name}.partial-{owner}"
    context.barrier()

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    if ema is not None:
        state["ema"] = ema
    with _single_process_is_fine():
        dcp.save(state, checkpoint_id=staging / "state")
    if export:
        _export(unwrap(model), staging, tokenizer, context)
        if ema is not None:  # the averaged weights, as their own Hugging Face directory
            _export(unwrap(model), staging / "ema", tokenizer, context, weights=ema)
    if kill_at == step:
        os.kill(os.getpid(), signal.SIGKILL)
    rng = context.gather(_rng_state())
    context.barrier()
    if context.main:
        torch.save({**meta, "rng": rng, "world_size": context.world_size,
                    "has_ema": ema is not None}, staging / STATE_FILE)
        (staging / MARKER).write_text(json.dumps({"format": FORMAT, "step": step,
                                                  "hf_export": export}) + "\n")
        for path in sorted(staging.rglob("*"), reverse=True):  # files, then their folders
            fsync_path(path)
        fsync_path(staging)
        if final.exists():  # the same step saved again (e.g. a stop right after a save)
            shutil.rmtree(final)
        os.rename(staging, final)
        fsync_path(root)
        for old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    context.barrier()
    return final


def load(checkpoint: str | Path, meta: dict, model, optimizer, context,
         ema: dict | None = None) -> None:
    """Restore model, optimizer and ``ema`` (in place; resharded to this world size) and this
    rank's RNG state from a checkpoint whose trainer state (``load_state``) is ``meta``. An
    EMA the checkpoint lacks stays as given."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    if ema is not None and meta.get("has_ema"):
        state["ema"] = ema
    with _single_process_is_fine():
        dcp.load(state, checkpoint_id=Path(checkpoint) / "state")
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])
    if context.rank < len(meta["rng"]):  # a new rank (more ranks than before) keeps its seed
        _set_rng_state(meta["rng"][context.rank])


def load_state(checkpoint: str | Path) -> dict:
    """The trainer state of a checkpoint (tensors and plain values only: weights_only)."""
    checkpoint = Path(checkpoint)
    marker = checkpoint / MARKER
    if not marker.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a complete cptfast checkpoint (no {MARKER})")
    found = json.loads(marker.read_text()).get("format")
    if found != FORMAT:
        raise ValueError(f"{checkpoint}: checkpoint format {found}, this cptfast reads {FORMAT}")
    return torch.load(checkpoint / STATE_FILE, weights_only=True)


@contextlib.contextmanager
def _single_process_is_fine():
    """torch.distributed.checkpoint warns when used without a process group; that is how a
    one-process run uses it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _export(model, directory: Path, tokenizer, context, weights: dict | None = None) -> None:
    """A consolidated Hugging Face directory, written by rank 0 (FSDP2 shards are gathered).
    ``weights`` ({parameter name: tensor}) replace the model's parameters in it (the EMA)."""
    from torch.distributed.tensor import DTensor

    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    state = None
    if weights is not None:
        names = {id(p): name for name, p in model.named_parameters()}
        state = {}
        for key, tensor in model.state_dict(keep_vars=True).items():
            value = weights.get(names.get(id(tensor)), tensor).detach()
            if isinstance(value, DTensor):
                value = value.full_tensor()
            state[key] = value.to(tensor.dtype).cpu()
    elif sharded:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_model_state_dict)
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                     cpu_offload=True))
    if context.main:
        model.save_pretrained(directory, state_dict=state, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _remove_abandoned(root: Path) -> None:
    """Partial checkpoints of processes that no longer run (checked on rank 0's machine)."""
    for path in root.glob("step-*.partial-*"):
        pid = int(path.name.rsplit("-", 1)[1])
        if pid == os.getpid() or not _alive(pid):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
