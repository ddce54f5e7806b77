"""The trainer's shape: every registered state round-trips through a checkpoint, callbacks see
every step and evaluation and can stop a run cleanly, and the W&B (offline) and MLflow
(file store) writers record what metrics.jsonl records."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from cptfast.training import Callback, train
from cptfast.training import loop as training_loop
from cptfast.training.distributed import Context

from test_train import assert_bit_identical, in_process_config


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_state(got, want, where="state"):
    """Nested dicts/lists/tuples of plain values and tensors, equal bit for bit."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and torch.equal(got, want), where
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for key in want:
            assert_same_state(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for index, (a, b) in enumerate(zip(got, want)):
            assert_same_state(a, b, f"{where}[{index}]")
    else:
        assert got == want, where


class Recorder(Callback):
    """Records what the hooks see; asks for a stop after ``stop_at`` steps."""

    def __init__(self, stop_at=None):
        self.stop_at, self.started, self.steps, self.evals = stop_at, 0, [], []
        self.checkpoints, self.ended = [], []

    def on_train_start(self, trainer):
        self.started += 1

    def on_step_end(self, trainer, result):
        self.steps.append((result.step, result.loss, result.applied))
        if result.step == self.stop_at:
            trainer.should_stop = True

    def on_eval(self, trainer, step, losses):
        self.evals.append((step, dict(losses)))

    def on_checkpoint(self, trainer, step, path):
        assert (path / "cptfast_checkpoint.json").is_file()  # complete when announced
        self.checkpoints.append(step)

    def on_train_end(self, trainer, result):
        self.ended.append(result.steps)


class Snapshot(Callback):
    """Each state's state_dict, deep-copied, at the last checkpoint."""

    def on_checkpoint(self, trainer, step, path):
        self.states = {name: copy.deepcopy(state.state_dict())
                       for name, state in trainer.states.items()}


def test_a_checkpoint_round_trips_every_registered_state(setup, tmp_path):
    config = in_process_config(setup, tmp_path / "states", "--train.steps=3",
                               "--train.ema_decay=0.5", "--checkpoint.every=3",
                               "--train.stall_steps=2", "--eval.every=2")
    snapshot = Snapshot()
    train(config, callbacks=[snapshot])
    saved = snapshot.states
    assert sorted(saved) == ["config", "counters", "data", "ema", "evals", "model",
                             "optimizer", "schedule", "stall"]
    assert saved["counters"]["step"] == 3 and saved["data"]["last_step"] == 2
    assert [e["step"] for e in saved["evals"]["evals"]] == [0, 2, 3]

    context, device = Context.start("cpu", 60)
    resumed = training_loop.Trainer(config.validate(), context, device,
                                    training_loop._StopSignals())
    try:
        for name, state in resumed.states.items():
            if name == "config":  # the stored config is kept apart from the new one
                assert state.resumed == saved["config"]["config"]
            else:
                assert_same_state(state.state_dict(), saved[name], name)
        ema, model = (resumed.states[n].state_dict() for n in ("ema", "model"))
        assert ema.keys() == model.keys()
        assert not any(torch.equal(ema[n], model[n]) for n in ema)  # an average, not a copy
    finally:
        resumed.close()
        context.stop()


def test_a_callback_sees_every_step_and_eval_and_stops_the_run_cleanly(setup, tmp_path):
    run_dir = tmp_path / "stopped"
    config = in_process_config(setup, run_dir, "--checkpoint.every=0", "--eval.every=2")
    recorder = Recorder(stop_at=5)
    result = train(config, callbacks=[recorder])
    assert result.steps == 5 and recorder.ended == [5] and recorder.started == 1
    logged = [e for e in records(run_dir) if "loss" in e]
    assert [(e["step"], e["loss"], True) for e in logged] == recorder.steps
    assert [s for s, _ in recorder.evals] == [0, 2, 4, 5]  # and one at the stop
    assert recorder.evals == [(e["step"], {k: v["loss"] for k, v in e["eval"].items()})
                              for e in records(run_dir) if "eval" in e]
    assert recorder.checkpoints == [5]  # the stop saves, with the Hugging Face export
    assert (result.final_checkpoint / "model.safetensors").is_file()

    # Rerun without the stop: it resumes at step 5 and ends equal to a run never stopped.
    again = Recorder()
    train(config, callbacks=[again])
    assert [s for s, _, _ in again.steps] == [6, 7, 8]
    straight_dir = tmp_path / "straight"
    train(in_process_config(setup, straight_dir, "--checkpoint.every=0", "--eval.every=2"))
    final = "checkpoints/step-00000008/model.safetensors"
    assert_bit_identical(load_file(run_dir / final), load_file(straight_dir / final))


def test_metrics_reach_wandb_offline_and_an_mlflow_file_store(setup, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks before using files
    run_dir, store = tmp_path / "tracked", f"file:{tmp_path / 'mlruns'}"
    overrides = ["--train.steps=3", "--checkpoint.every=2", "--eval.every=2",
                 '--logging.wandb={ project = "cpt", mode = "offline" }',
                 f'--logging.mlflow={{ tracking_uri = "{store}", experiment = "cpt" }}']
    train(in_process_config(setup, run_dir, *overrides))
    train(in_process_config(setup, run_dir, *overrides[1:], "--train.steps=4"))  # resumed

    wandb_id = (run_dir / "wandb_run_id").read_text().strip()
    runs = sorted((run_dir / "wandb").glob(f"offline-run-*-{wandb_id}"))
    assert len(runs) == 2  # both parts of the run under the one W&B id
    data = b"".join((r / f"run-{wandb_id}.wandb").read_bytes() for r in runs)
    assert b"train/loss" in data and b"eval/domain_loss" in data

    client = MlflowClient(tracking_uri=store)
    run = client.get_run((run_dir / "mlflow_run_id").read_text().strip())
    assert run.info.status == "FINISHED"
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id,
                                                                  "train/loss")}
    assert history == {e["step"]: e["loss"] for e in records(run_dir) if "loss" in e}
    evals = {m.step: m.value for m in client.get_metric_history(run.info.run_id,
                                                                "eval/domain_loss")}
    assert evals == {e["step"]: e["eval"]["domain"]["loss"] for e in records(run_dir)
                     if "eval" in e}
    assert sorted(evals) == [0, 2, 3, 4]


def test_the_loader_options_come_from_the_config(setup, tmp_path, monkeypatch):
    from cptfast.training import stream

    seen = []

    class Recording(stream.PackedLoader):
        def __init__(self, *args, **kwargs):
            seen.append({k: kwargs[k] for k in ("num_threads", "prefetch", "window")})
            super().__init__(*args, **kwargs)
    monkeypatch.setattr(stream, "PackedLoader", Recording)
    train(in_process_config(setup, tmp_path / "loader", "--train.steps=1", "--data.num_threads=0",
                            "--data.prefetch=2", "--data.window=7", '--data.packing="bestfit"'))
    assert seen == [{"num_threads": 0, "prefetch": 2, "window": 7}]


def test_a_stop_on_a_checkpoint_step_still_ends_with_the_export(setup, tmp_path):
    # checkpoint.export = false: periodic checkpoints carry no Hugging Face export, the last does
    config = in_process_config(setup, tmp_path / "stop_on_save", "--checkpoint.every=2",
                               "--checkpoint.export=false", "--eval.every=0")
    result = train(config, callbacks=[Recorder(stop_at=4)])
    assert result.steps == 4 and result.final_checkpoint.name == "step-00000004"
    assert (result.final_checkpoint / "model.safetensors").is_file()
    assert not (result.final_checkpoint.with_name("step-00000002") / "model.safetensors").exists()
