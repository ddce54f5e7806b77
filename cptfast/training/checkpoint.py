"""Checkpoints that survive anything: each is a Hugging Face model directory (safetensors,
config, tokenizer files) plus ``trainer_state.pt`` (optimizer, data position, RNG states,
step), written under a temporary name, fsynced, then renamed into place. A directory named
``step-NNNNNNNN`` therefore always holds a complete checkpoint; a run killed while writing
leaves only a ``.partial-PID`` directory, which is ignored and later removed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

import torch

from cptfast.data.formats import fsync_path

FORMAT = 1
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


def save(run_dir: str | Path, step: int, model, tokenizer, state: dict, *, keep: int,
         kill_at: int | None = None) -> Path:
    """Write checkpoint ``step`` atomically and keep the newest ``keep``. ``kill_at`` (tests
    only) SIGKILLs the process half-way through writing checkpoint ``kill_at``."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(root)
    final = root / f"step-{step:08d}"
    staging = root / f"{final.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    model.save_pretrained(staging, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
    if kill_at == step:
        os.kill(os.getpid(), signal.SIGKILL)
    torch.save(state, staging / STATE_FILE)
    (staging / MARKER).write_text(json.dumps({"format": FORMAT, "step": step}) + "\n")
    for path in staging.iterdir():
        fsync_path(path)
    fsync_path(staging)
    if final.exists():  # the same step saved again (e.g. a stop right after a save)
        shutil.rmtree(final)
    os.rename(staging, final)
    fsync_path(root)
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)
    return final


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


def _remove_abandoned(root: Path) -> None:
    """Partial checkpoints of processes that no longer run."""
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
