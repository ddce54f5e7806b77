"""The trainer when things go wrong, reproduced as a user meets them: a metrics line torn by a
kill, a disk that fills up (a real small tmpfs when this machine lets us mount one, else
patched writes), SIGTERM and SIGINT, a rank that stops, NaN weights, steps without labels, a
model that does not learn. Oracles: an uninterrupted run's weights (bit for bit), exact step
lists, directory listings, log(vocabulary) for a model that cannot learn."""

import contextlib
import errno
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cptfast.cli import main
from cptfast.errors import DiskFullError, RunInUseError
from cptfast.training import checkpoint, load, train
from cptfast.training import loop as training_loop
from test_train import assert_bit_identical, final_weights, run_cli, toml
from test_train import uninterrupted  # noqa: F401 (a fixture)


def cli(setup: Path, run_dir: Path, capsys, *overrides) -> tuple[int, list[str]]:
    """`cptfast train` in this process: the return code and cptfast's own stderr lines."""
    config = run_dir.parent / f"{run_dir.name}.toml"
    config.write_text(toml(setup, run_dir))
    capsys.readouterr()
    rc = main(["train", str(config), *overrides])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return rc, [line for line in err.splitlines() if line.startswith("cptfast")]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_lines(run_dir: Path) -> list[int]:
    return [e["step"] for e in records(run_dir) if "loss" in e]


@contextlib.contextmanager
def small_disk(path: Path, size: str):
    """A directory on a tmpfs of ``size``, or None where mounting is not allowed (not root, a
    container without the capability; CPTFAST_TEST_NO_TMPFS=1 forces that)."""
    path.mkdir()
    mounted = not os.environ.get("CPTFAST_TEST_NO_TMPFS") and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True).returncode == 0
    try:
        yield path if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=True)


# --- 4. disk faults and history ----------------------------------------------------------------

def test_torn_metrics_line_then_resume_and_rerun_keep_history_once(setup, uninterrupted,
                                                                    tmp_path, capsys):
    run_dir = tmp_path / "torn"
    killed = run_cli(setup, run_dir, kill="step:5")  # the newest checkpoint is step 4
    assert killed.returncode == -9
    with (run_dir / "metrics.jsonl").open("a") as file:
        file.write('{"step": 6, "loss": 4.6')  # what a kill in the middle of a write leaves
    rc, lines = cli(setup, run_dir, capsys)
    assert rc == 0
    assert len([line for line in lines if "torn line" in line]) == 1
    assert_bit_identical(final_weights(run_dir), uninterrupted)
    assert step_lines(run_dir) == list(range(1, 9))  # each step once: 5 from the resumed run
    assert [e["step"] for e in records(run_dir) if "eval" in e] == [0, 4, 8]
    history = (run_dir / "metrics.jsonl").read_bytes()
    rc, lines = cli(setup, run_dir, capsys)  # a finished run, rerun: nothing to do, no new eval
    assert rc == 0 and not [line for line in lines if "warning" in line]
    assert (run_dir / "metrics.jsonl").read_bytes() == history


def test_history_is_cut_by_writing_a_new_file_never_in_place(tmp_path, capsys):
    from cptfast.training.metrics import MetricsFile

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 8)]
    lines[5] = '{"step": 6, "lo\n'  # a line an older cptfast tore and then appended after
    path.write_text("".join(lines))
    with path.open() as old:  # a reader of the old file (or a kill mid-way) keeps all of it
        MetricsFile(tmp_path, keep_through=4).close()
        assert old.read() == "".join(lines)
    assert path.read_text() == "".join(lines[:4])
    assert capsys.readouterr().err.count("dropped 1 torn line") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_full_disk_while_checkpointing_is_one_line_and_the_previous_checkpoint_resumes(
        setup, uninterrupted, tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "disk" / "run"
    with small_disk(tmp_path / "disk", "1200k") as disk:  # one checkpoint (~850 kB) fits
        if disk is None:  # torch's writer fails as it does on a full disk
            real_save = torch.save

            def save(obj, f, *args, **kwargs):
                target = f if isinstance(f, (str, os.PathLike)) else getattr(f, "name", "")
                if "step-00000004" in str(target):
                    raise RuntimeError("[enforce fail at inline_container.cc:672] . "
                                       "unexpected pos 704 vs 598")
                return real_save(obj, f, *args, **kwargs)
            monkeypatch.setattr(torch, "save", save)
        rc, lines = cli(setup, run_dir, capsys)
        assert rc == 1 and len(lines) == 1
        assert lines[0].startswith(f"cptfast train: error: {run_dir}/checkpoints/"
                                   "step-00000004.partial-")
        assert "no space left on device" in lines[0] and "step-00000002" in lines[0]
        names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
        assert names == ["step-00000002"]  # complete; the partial one removed
        if disk is not None:  # free space: the tmpfs grows
            subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        monkeypatch.undo()
        rc, lines = cli(setup, run_dir, capsys)
        assert rc == 0, lines
        assert_bit_identical(final_weights(run_dir), uninterrupted)
        assert step_lines(run_dir) == list(range(1, 9))


def test_full_disk_while_writing_metrics_is_one_line_then_resumes(setup, tmp_path, capsys,
                                                                  monkeypatch):
    run_dir = tmp_path / "metrics_full"
    run_dir.mkdir()
    metrics = run_dir / "metrics.jsonl"
    with small_disk(tmp_path / "disk", "4k") as disk:  # one page: about 15 lines
        if disk is not None:
            (disk / "metrics.jsonl").touch()
            metrics.symlink_to(disk / "metrics.jsonl")
        else:  # a file that takes 4096 bytes, then fails as a full disk does
            real_open = Path.open

            class Full:
                def __init__(self, file):
                    self.file, self.left = file, 4096

                def write(self, data):
                    if not self.left:
                        raise OSError(errno.ENOSPC, "No space left on device")
                    written = self.file.write(data[:self.left])
                    self.left -= written
                    return written

                def close(self):
                    self.file.close()

            def open_(path, mode="r", *args, **kwargs):
                file = real_open(path, mode, *args, **kwargs)
                return Full(file) if path.name == "metrics.jsonl" and "a" in mode else file
            monkeypatch.setattr(Path, "open", open_)
        rc, lines = cli(setup, run_dir, capsys, "--train.steps=20", "--checkpoint.every=5")
        assert rc == 1
        assert lines == [f"cptfast train: error: {metrics}: no space left on device while "
                         "writing the metrics; free some space and rerun the same command to "
                         "resume ([Errno 28] No space left on device)"]
        content = metrics.read_bytes()
    monkeypatch.undo()
    assert len(content) == 4096
    metrics.unlink()  # space freed: the history moves to a disk with room
    metrics.write_bytes(content)
    rc, lines = cli(setup, run_dir, capsys, "--train.steps=20", "--checkpoint.every=5")
    assert rc == 0
    torn = not content.endswith(b"\n")  # (unless the page ended exactly with a line)
    assert len([line for line in lines if "dropped 1 torn line" in line]) == torn
    assert step_lines(run_dir) == list(range(1, 21))


def test_rotation_and_leftovers_of_killed_runs(tmp_path, monkeypatch):
    root = checkpoint.checkpoint_root(tmp_path)
    root.mkdir(parents=True)

    def make(name: str, complete: bool = True) -> Path:
        (root / name).mkdir()
        (root / name / "model.safetensors").write_bytes(b"weights")
        if complete:
            (root / name / checkpoint.MARKER).write_text("{}")
        return root / name
    for step in (2, 4, 6):
        make(f"step-{step:08d}")
    make("step-00000001", complete=False)  # half deleted by an older cptfast
    make("step-00000003.deleting-999999", complete=False)
    make(f"step-00000005.partial-{os.getppid()}", complete=False)  # a live (reused) PID
    make(f"step-00000007.partial-{os.getpid()}", complete=False)
    with checkpoint.exclusive(tmp_path):
        assert sorted(p.name for p in root.iterdir()) == [
            "step-00000002", "step-00000004", "step-00000006"]
        with pytest.raises(RunInUseError, match=f"in use by cptfast train \\(pid {os.getpid()}"):
            with checkpoint.exclusive(tmp_path):
                pass
        # A kill in the middle of deleting a checkpoint leaves nothing that looks like one.
        monkeypatch.setattr(checkpoint.shutil, "rmtree", lambda path: os.unlink(
            Path(path) / checkpoint.MARKER) or 1 / 0)
        with pytest.raises(ZeroDivisionError):
            checkpoint._delete(root / "step-00000002")
        monkeypatch.undo()
        assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == [
            "step-00000004", "step-00000006"]
        assert not [p for p in root.iterdir() if checkpoint._NAME.match(p.name) and
                    not (p / checkpoint.MARKER).is_file()]
    with checkpoint.exclusive(tmp_path):  # the next run removes what is left of it
        assert sorted(p.name for p in root.iterdir()) == ["step-00000004", "step-00000006"]


# --- 5. signals --------------------------------------------------------------------------------

def start(setup: Path, run_dir: Path, *overrides: str, env: dict | None = None):
    config = run_dir.parent / f"{run_dir.name}.toml"
    config.write_text(toml(setup, run_dir))
    return subprocess.Popen([sys.executable, "-m", "cptfast", "train", str(config), *overrides],
                            env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def wait_for_steps(run_dir: Path, steps: int, process) -> None:
    deadline = time.monotonic() + 120
    while not (run_dir / "metrics.jsonl").exists() or \
            (run_dir / "metrics.jsonl").read_text().count('"loss"') < steps:
        assert process.poll() is None and time.monotonic() < deadline, "the run ended early"
        time.sleep(0.005)


LONG = ("--train.steps=40", "--checkpoint.every=0", "--eval.every=0")


def test_sigterm_stops_with_a_checkpoint_and_the_rerun_is_bit_identical(setup, tmp_path):
    reference = train(load(_write(setup, tmp_path / "ref"), list(LONG)))  # uninterrupted
    run_dir = tmp_path / "preempted"
    process = start(setup, run_dir, *LONG)
    wait_for_steps(run_dir, 2, process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
    stopped = [line for line in err.splitlines() if "stopped by SIGTERM" in line]
    assert len(stopped) == 1, err[-3000:]
    step = int(stopped[0].split(" at step ")[1].split(";")[0])
    assert 2 <= step < 40
    assert stopped[0] == (f"cptfast train: stopped by SIGTERM at step {step}; checkpoint "
                          f"{run_dir / 'checkpoints' / f'step-{step:08d}'}; rerun the same "
                          "command to resume")
    assert checkpoint.latest(run_dir).name == f"step-{step:08d}"
    resumed = run_cli(setup, run_dir, overrides=LONG)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = load_file(run_dir / "checkpoints" / "step-00000040" / "model.safetensors")
    assert_bit_identical(got, load_file(reference.final_checkpoint / "model.safetensors"))
    assert step_lines(run_dir) == list(range(1, 41))


def _write(setup: Path, run_dir: Path) -> Path:
    config = run_dir.parent / f"{run_dir.name}.toml"
    config.write_text(toml(setup, run_dir))
    return config


def test_a_second_signal_stops_at_once(setup, tmp_path):
    run_dir = tmp_path / "twice"
    process = start(setup, run_dir, "--train.steps=400", "--checkpoint.every=0",
                    "--eval.every=0")
    wait_for_steps(run_dir, 2, process)
    process.send_signal(signal.SIGINT)
    for line in process.stderr:  # the first one is acknowledged...
        if line.startswith("cptfast train: SIGINT received: stopping at the end of this step"):
            process.send_signal(signal.SIGINT)  # ...the second one is not waited for
            break
    process.communicate(timeout=120)
    assert process.returncode == -signal.SIGINT


def launch_ranks(setup: Path, run_dir: Path, *overrides: str) -> list:
    """Two ranks, started the way torchrun starts them (its environment, our own processes,
    so that each can be signalled and timed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [start(setup, run_dir, *overrides, env={
        "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}) for rank in range(2)]


DISTRIBUTED = ("--train.steps=400", "--checkpoint.every=0", "--eval.every=0",
               "--train.timeout_s=5", "--train.deterministic=false")


def test_sigterm_on_one_rank_stops_every_rank_after_the_same_step(setup, tmp_path):
    run_dir = tmp_path / "two"
    ranks = launch_ranks(setup, run_dir, *DISTRIBUTED)
    wait_for_steps(run_dir, 2, ranks[0])
    ranks[1].send_signal(signal.SIGTERM)
    errors = [rank.communicate(timeout=60)[1] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [143, 143], errors[0][-2000:]
    stopped = [line for line in errors[0].splitlines() if "stopped by SIGTERM" in line]
    assert len(stopped) == 1 and not any("stopped by" in line for line in
                                         errors[1].splitlines())  # one line, from rank 0
    step = int(stopped[0].split(" at step ")[1].split(";")[0])
    assert checkpoint.latest(run_dir).name == f"step-{step:08d}"
    assert step_lines(run_dir)[-1] == step


def test_a_stopped_rank_makes_the_other_exit_within_the_timeout_naming_it(setup, tmp_path):
    run_dir = tmp_path / "frozen"
    ranks = launch_ranks(setup, run_dir, *DISTRIBUTED)
    try:
        wait_for_steps(run_dir, 2, ranks[0])
        ranks[1].send_signal(signal.SIGSTOP)  # alive but silent: no connection is closed
        stopped_at = time.monotonic()
        _, err = ranks[0].communicate(timeout=60)
        waited = time.monotonic() - stopped_at
    finally:
        ranks[1].kill()
        ranks[1].communicate()
    assert ranks[0].returncode == 1 and "Traceback" not in err, err[-3000:]
    assert 5 <= waited < 15  # train.timeout_s = 5, then a prompt exit
    line = [line for line in err.splitlines() if line.startswith("cptfast train: error:")]
    assert len(line) == 1 and line[0].startswith("cptfast train: error: rank 0 of 2: step ")
    assert ("failed: another rank died, stopped or did not answer within train.timeout_s = 5 s"
            in line[0])


# --- 6. states that are really good ------------------------------------------------------------

def copy_base(setup: Path, tmp_path: Path, change) -> Path:
    """The test base model with its weights changed by ``change`` (name -> tensor)."""
    base = tmp_path / "base"
    shutil.copytree(setup / "base", base)
    weights = load_file(base / "model.safetensors")
    save_file({name: change(name, tensor) for name, tensor in weights.items()},
              base / "model.safetensors", metadata={"format": "pt"})
    return base


def test_a_non_finite_base_model_is_refused_before_training(setup, tmp_path, capsys):
    bad = "model.layers.1.mlp.up_proj.weight"

    def poison(name, tensor):
        if name == bad:
            tensor = tensor.clone()
            tensor[3, 4] = float("nan")
        return tensor
    base = copy_base(setup, tmp_path, poison)
    rc, lines = cli(setup, tmp_path / "run", capsys, f'--model.path="{base}"')
    assert rc == 1
    assert lines == [f"cptfast train: error: {base}: the base model's parameter {bad} holds NaN "
                     "or Inf values; training cannot start from it. Load a model whose weights "
                     "are finite (a checkpoint saved before a run diverged?)"]
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # not one step ran


def test_weights_that_became_non_finite_are_never_saved_as_good(setup, tmp_path, monkeypatch,
                                                               capsys):
    real = training_loop._load_model

    def load_model(*args, **kwargs):  # step 3's first forward breaks a weight, as a bad
        model, tokenizer = real(*args, **kwargs)  # update would
        calls = {"n": 0}

        def hook(module, inputs):
            if module.training:
                calls["n"] += 1
                if calls["n"] == 5:
                    with torch.no_grad():
                        model.model.norm.weight[0] = float("inf")
        model.get_input_embeddings().register_forward_pre_hook(hook)
        return model, tokenizer
    monkeypatch.setattr(training_loop, "_load_model", load_model)
    rc, lines = cli(setup, tmp_path / "run", capsys, "--train.max_nonfinite_steps=2",
                    "--eval.every=0")
    assert rc == 1
    good = tmp_path / "run" / "checkpoints" / "step-00000002"
    assert lines == [f"cptfast train: error: the weights became non-finite by step 4 "
                     f"(model.norm.weight holds NaN or Inf), so no checkpoint was saved; the "
                     f"newest good one is {good}. Lower optim.lr or check the data"]
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == [good.name]
    assert all(torch.isfinite(t).all() for t in load_file(good / "model.safetensors").values())


def test_a_step_without_labels_changes_nothing_and_logs_no_loss(setup, tmp_path, monkeypatch):
    from cptfast.training import stream

    class NoLabelsInStep2(stream.PackedLoader):  # micro-batches 3 and 4: step 2's
        calls = 0

        def __next__(self):
            batch = super().__next__()
            NoLabelsInStep2.calls += 1
            if NoLabelsInStep2.calls in (3, 4):
                batch.labels.fill_(-100)
            return batch
    monkeypatch.setattr(stream, "PackedLoader", NoLabelsInStep2)
    run_dir = tmp_path / "unlabelled"
    result = train(load(_write(setup, run_dir), ["--train.steps=3", "--checkpoint.every=1",
                                                 "--checkpoint.keep=3", "--eval.every=0"]))
    assert result.skipped_steps == 1
    step2 = [e for e in records(run_dir) if e.get("step") == 2 and "loss" in e]
    assert step2 == [{**step2[0], "loss": None, "grad_norm": None, "skipped_steps": 1}]
    weights = [load_file(run_dir / "checkpoints" / f"step-{s:08d}" / "model.safetensors")
               for s in (1, 2, 3)]
    assert_bit_identical(weights[1], weights[0])  # no AdamW momentum, no weight decay
    assert not all(torch.equal(weights[2][k], weights[1][k]) for k in weights[1])


def test_a_model_that_cannot_learn_warns_once_or_stops(setup, tmp_path, capsys):
    base = copy_base(setup, tmp_path, lambda name, tensor: torch.zeros_like(tensor))
    vocab = load_file(base / "model.safetensors")["model.embed_tokens.weight"].shape[0]
    run_dir = tmp_path / "flat"
    rc, lines = cli(setup, run_dir, capsys, f'--model.path="{base}"', "--train.stall_steps=3",
                    "--checkpoint.every=0", "--eval.every=0")
    assert rc == 0
    losses = [e["loss"] for e in records(run_dir) if "loss" in e]
    assert losses == pytest.approx([math.log(vocab)] * 8, rel=1e-6)  # uniform predictions
    warned = [line for line in lines if "have not changed" in line]
    assert len(warned) == 1 and warned[0].startswith(
        "cptfast train: warning: loss and grad_norm have not changed for 3 steps (loss ")
    assert "grad_norm 0 at step 4" in warned[0]
    rc, lines = cli(setup, tmp_path / "stop", capsys, f'--model.path="{base}"',
                    "--train.stall_steps=3", '--train.on_stall="stop"', "--eval.every=0")
    assert rc == 1 and len(lines) == 1
    assert lines[0].startswith("cptfast train: error: loss and grad_norm have not changed")
    assert checkpoint.latest(tmp_path / "stop").name == "step-00000004"


def test_disk_full_is_recognised_through_torch_wrappers():
    from torch.distributed.checkpoint.api import CheckpointException

    full = OSError(errno.ENOSPC, "No space left on device")
    wrapped = CheckpointException("write failed", {0: (full, None)})
    quota = RuntimeError("write failed")
    quota.__cause__ = OSError(errno.EDQUOT, "Disk quota exceeded")
    for error in (full, wrapped, quota, RuntimeError("unexpected pos 704 vs 598")):
        assert isinstance(DiskFullError.caused(error, "p: no space left on device"),
                          DiskFullError), error
    assert DiskFullError.caused(RuntimeError("size mismatch"), "p") is None
