"""Checkpoints that survive anything, on any number of ranks.

A checkpoint directory ``checkpoints/step-NNNNNNNN`` holds:
- ``state/``: the sharded parts (model, optimizer, EMA) written with
  `torch.distributed.checkpoint` (each rank its own part; loadable on a different number of
  ranks, which reshards);
- ``trainer_state.pt``: the state of every other part of the run (counters, data position,
  evaluations, config, ...: `parts`) and every rank's RNG state (plain values and tensors:
  loaded with ``weights_only=True``);
- unless disabled, a consolidated Hugging Face export (safetensors, config, tokenizer files)
  that `transformers` loads as it is.
Everything is written under ``step-NNNNNNNN.partial-PID``, fsynced, and renamed into place by
rank 0 once every rank has finished, so a directory named ``step-NNNNNNNN`` is always complete;
a run killed while writing leaves only the partial directory, which is ignored and removed. An
old checkpoint is deleted the same way round: renamed to ``step-NNNNNNNN.deleting-PID`` first,
then removed. A full disk ends the save with a `DiskFullError` and the partial directory
removed; the previous checkpoints are untouched. `exclusive` holds a run directory for one
training process at a time, which is what lets it remove whatever a killed run left.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import warnings
from pathlib import Path
from typing import Callable, Protocol

import torch

from cptfast.data.formats import fsync_path
from cptfast.errors import CheckpointError, DiskFullError, RunInUseError

FORMAT = 3  # 3: trainer_state.pt holds named states
STATE_FILE = "trainer_state.pt"
MARKER = "cptfast_checkpoint.json"
LOCK = ".cptfast-run.lock"
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


@contextlib.contextmanager
def exclusive(run_dir: str | Path, enabled: bool = True):
    """Hold the run directory while training into it (rank 0: ``enabled``). A second
    ``cptfast train`` into the same directory fails at once instead of both writing it, and
    every staging or half-deleted checkpoint found is known to be abandoned, whichever process
    (or reused PID) left it: they are removed."""
    if not enabled:
        yield
        return
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise RunInUseError(
                f"{run_dir} is in use by {lock.read().strip() or 'another process'}; wait for "
                "it to finish, stop it, or choose another train.output") from None
        except OSError:  # a filesystem without locks (some NFS): carry on unguarded
            pass
        lock.truncate(0)
        lock.write(f"cptfast train (pid {os.getpid()} on {socket.gethostname()})\n")
        lock.flush()
        _remove_abandoned(checkpoint_root(run_dir))
        yield


class Stateful(Protocol):
    """A part of the run's state. ``sharded`` parts (model, optimizer, EMA: tensors each rank
    holds a piece of) are written by every rank with torch.distributed.checkpoint; the others
    hold the same plain values on every rank and are written by rank 0."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def save(run_dir: str | Path, step: int, states: dict[str, Stateful], context, *, keep: int,
         export: Callable[[Path], None] | None = None) -> Path:
    """Write checkpoint ``step`` of every state in ``states`` (a collective: every rank calls
    it) and keep the newest ``keep``. ``export(directory)``, if given, adds the Hugging Face
    export to the checkpoint before it is committed."""
    import torch.distributed.checkpoint as dcp

    root = checkpoint_root(run_dir)
    if context.main:
        root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    what = f"writing checkpoint {final.name}"  # for a failing collective's message
    owner = context.gather(os.getpid(), what)[0]  # the staging name every rank agrees on
    staging = root / f"{final.name}.partial-{owner}"
    context.barrier(what)

    sharded = {name: state for name, state in states.items() if _is_sharded(state)}
    try:
        with _single_process_is_fine():
            dcp.save(sharded, checkpoint_id=staging / "state")
        if export is not None:
            export(staging)
        rng = context.gather(_rng_state(), what)
        context.barrier(what)
        if context.main:
            plain = {name: state.state_dict() for name, state in states.items()
                     if name not in sharded}
            torch.save({"states": plain, "sharded": sorted(sharded), "rng": rng,
                        "world_size": context.world_size}, staging / STATE_FILE)
            (staging / MARKER).write_text(json.dumps({"format": FORMAT, "step": step,
                                                      "hf_export": export is not None}) + "\n")
            for path in sorted(staging.rglob("*"), reverse=True):  # files, then their folders
                fsync_path(path)
            fsync_path(staging)
    except BaseException as error:  # (dcp's CheckpointException is a BaseException)
        # torch's own writer reports a full disk as "unexpected pos 704 vs 598"
        full = DiskFullError.caused(
            error, f"{staging}: no space left on device while writing checkpoint {final.name}; "
                   f"the newest complete checkpoint ({latest(run_dir) or 'none yet'}) is "
                   "intact: free some space and rerun the same command to resume")
        if full is None:
            raise
        if context.main:
            shutil.rmtree(staging, ignore_errors=True)  # give the space back
        raise full from error
    if context.main:
        if final.exists():  # the same step saved again
            _delete(final)
        os.rename(staging, final)
        fsync_path(root)
        for old in complete_checkpoints(run_dir)[:-keep]:
            if old != final:
                _delete(old)
    context.barrier(what)
    return final


def load(checkpoint: str | Path, states: dict[str, Stateful], context) -> None:
    """Restore every state in ``states`` that the checkpoint holds (sharded ones resharded to
    this world size; one it lacks, e.g. an EMA turned on since, stays as it is) and this
    rank's RNG state."""
    import torch.distributed.checkpoint as dcp

    stored = load_state(checkpoint)
    sharded = {name: state for name, state in states.items()
               if _is_sharded(state) and name in stored["sharded"]}
    with _single_process_is_fine():
        dcp.load(sharded, checkpoint_id=Path(checkpoint) / "state")  # calls load_state_dict
    for name, state in states.items():
        if name in stored["states"]:
            state.load_state_dict(stored["states"][name])
    if context.rank < len(stored["rng"]):  # a new rank (more ranks than before) keeps its seed
        _set_rng_state(stored["rng"][context.rank])


def _is_sharded(state) -> bool:
    return getattr(state, "sharded", False)


def load_state(checkpoint: str | Path) -> dict:
    """The rank-0 part of a checkpoint: {"states": {name: state dict}, "sharded": [names],
    "rng": [per rank], "world_size": N} (tensors and plain values only: weights_only)."""
    checkpoint = Path(checkpoint)
    marker = checkpoint / MARKER
    if not marker.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a complete cptfast checkpoint (no {MARKER})")
    found = json.loads(marker.read_text()).get("format")
    if found != FORMAT:
        raise CheckpointError(f"{checkpoint}: checkpoint format {found}, this cptfast reads "
                              f"{FORMAT}")
    return torch.load(checkpoint / STATE_FILE, weights_only=True)


@contextlib.contextmanager
def _single_process_is_fine():
    """torch.distributed.checkpoint warns when used without a process group; that is how a
    one-process run uses it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def export_hf(model, directory: Path, tokenizer, context, weights: dict | None = None) -> None:
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


def _delete(checkpoint: Path) -> None:
    """Remove a checkpoint so that a kill midway leaves nothing that looks like one: renamed
    away first (one atomic step), then removed."""
    doomed = checkpoint.with_name(f"{checkpoint.name}.deleting-{os.getpid()}")
    os.rename(checkpoint, doomed)
    shutil.rmtree(doomed)


def _remove_abandoned(root: Path) -> None:
    """What killed runs left in ``root``: staging directories, checkpoints being deleted, and
    ``step-N`` directories without their marker (half deleted by an older cptfast). Only
    called while holding the run directory (`exclusive`), so none of them is in use."""
    if not root.is_dir():
        return
    for path in root.iterdir():
        if ".partial-" in path.name or ".deleting-" in path.name or (
                _NAME.match(path.name) and not (path / MARKER).is_file()):
            shutil.rmtree(path, ignore_errors=True)
