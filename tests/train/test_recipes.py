"""Recipes: mixture phases (domain upsampling at the end) and the replay plan."""

import pytest
import torch
from safetensors.torch import load_file

from cptfast.training import config as train_config
from cptfast.training import recipes, train
from test_train import in_process_config, run_cli

PHASES = """
[[data.phases]]
at = 0.5
[data.phases.weights]
domain = 1.0
"""


def test_mixture_plan_by_hand():
    config = train_config.from_dict({
        "model": {"path": "m"}, "train": {"steps": 100},
        "data": {"sources": {"domain": {"path": "d", "weight": 0.5},
                             "general": {"path": "g", "weight": 0.5}},
                 "phases": [{"at": 0.85, "weights": {"domain": 0.9, "general": 0.1}}]}})
    config.validate()
    assert recipes.weights_at(config, 84) == {"domain": 0.5, "general": 0.5}
    assert recipes.weights_at(config, 85) == {"domain": 0.9, "general": 0.1}
    assert recipes.phase_starting_at(config, 85) == {"domain": 0.9, "general": 0.1}
    assert recipes.phase_starting_at(config, 0) is None
    plan = {row["source"]: row for row in recipes.mixture_plan(
        config, {"domain": 10_000, "general": 1_000_000}, tokens_per_step=1000)}
    # domain: 85 steps x 1000 x 0.5 + 15 steps x 1000 x 0.9 = 42,500 + 13,500
    assert plan["domain"]["tokens"] == 56_000 and plan["domain"]["epochs"] == pytest.approx(5.6)
    assert plan["general"]["tokens"] == 44_000
    assert plan["general"]["epochs"] == pytest.approx(0.044)
    assert plan["domain"]["share"] == pytest.approx(0.56)
    assert "repeats" in recipes.format_plan(list(plan.values()))


@pytest.mark.parametrize("phases,message", [
    ([{"at": 1.2, "weights": {"domain": 1.0}}], r"at must lie in \(0, 1\)"),
    ([{"at": 0.6, "weights": {"domain": 1.0}}, {"at": 0.5, "weights": {"domain": 1.0}}],
     "increase"),
    ([{"at": 0.5, "weights": {"legal": 1.0}}], "unknown sources"),
    ([{"at": 0.5, "weights": {"domain": 0.0}}], "positive sum"),
    ([{"at": 0.5, "wieghts": {"domain": 1.0}}], r"did you mean data.phases\[0\].weights"),
])
def test_bad_phases_are_named(phases, message):
    table = {"model": {"path": "m"},
             "data": {"sources": {"domain": {"path": "d"}}, "phases": phases}}
    with pytest.raises(ValueError, match=message):
        train_config.from_dict(table).validate()


def test_the_switch_happens_at_the_phase_boundary_row(setup, tmp_path, monkeypatch):
    from cptfast.data.loader import PackedLoader

    switches = []
    real = PackedLoader.set_weights

    def recording(self, weights):
        switches.append((self.state_dict()["global_row"], dict(zip(self.source_names,
                                                                   self._weights(weights)))))
        return real(self, weights)

    monkeypatch.setattr(PackedLoader, "set_weights", recording)
    config = in_process_config(setup, tmp_path / "phased")
    config.data.phases = train_config.from_dict(
        {"data": {"phases": [{"at": 0.5, "weights": {"domain": 1.0}}]}}).data.phases
    result = train(config.validate())
    # 8 steps, boundary at step 4: after 4 steps x 2 micro-batches x 2 rows = global row 16
    assert switches == [(16, {"domain": 1.0, "general": 0.0})]
    assert (result.run_dir / "mixture_plan.json").is_file()


def test_resuming_across_and_after_a_phase_boundary_is_exact(setup, tmp_path):
    assert_resumes_exactly(setup, tmp_path, [3, 5], extra=PHASES)  # boundary: step 4


def test_plan_on_the_command_line(setup, tmp_path):
    import subprocess
    import sys

    from test_train import toml
    path = tmp_path / "plan.toml"
    path.write_text(toml(setup, tmp_path / "run", PHASES))
    done = subprocess.run([sys.executable, "-m", "cptfast", "train", str(path), "--plan"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = {line.split()[0]: line.split() for line in done.stdout.splitlines()[1:]}
    # 8 steps x 128 tokens: 4 steps at 0.75 / 0.25, then 4 steps domain only
    assert lines["domain"][1] == f"{4 * 128 * 3 // 4 + 4 * 128:,}"
    assert lines["general"][1] == f"{4 * 128 // 4:,}"
    assert not (tmp_path / "run").exists()  # nothing trained


def test_ema_export_matches_the_average_of_the_steps(setup, tmp_path):
    options = ["--train.ema_decay=0.6", "--checkpoint.every=1", "--checkpoint.keep=10",
               "--train.steps=3"]
    result = train(in_process_config(setup, tmp_path / "ema", *options))
    weights = [load_file(setup / "base" / "model.safetensors")] + [
        load_file(tmp_path / "ema" / "checkpoints" / f"step-{k:08d}" / "model.safetensors")
        for k in (1, 2, 3)]
    expected = {name: weights[0][name].clone() for name in weights[0]}
    for step_weights in weights[1:]:
        for name in expected:
            expected[name] = 0.6 * expected[name] + 0.4 * step_weights[name]
    got = load_file(result.final_checkpoint / "ema" / "model.safetensors")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7)
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(result.final_checkpoint / "ema")  # a real checkpoint


def test_ema_resumes_exactly(setup, tmp_path):
    assert_resumes_exactly(setup, tmp_path, [3], overrides=("--train.ema_decay=0.9",),
                           weights="ema/model.safetensors")


STAGES = """
[[data.stages]]
at = 0.5
seq_len = 64
batch_size = 1
"""


def test_a_long_context_stage_switches_rows_and_rope_settings_are_exported(setup, tmp_path,
                                                                        monkeypatch):
    import json as json_module

    from cptfast.data.loader import PackedLoader

    shapes = []
    real_next = PackedLoader.__next__

    def recording(self):
        batch = real_next(self)
        shapes.append(tuple(batch.input_ids.shape))
        return batch

    monkeypatch.setattr(PackedLoader, "__next__", recording)
    config = in_process_config(setup, tmp_path / "long", "--model.rope_theta=50000.0",
                               "--model.max_position_embeddings=256",
                               '--model.rope_scaling={ rope_type = "linear", factor = 2.0 }',
                               "--checkpoint.every=0", "--eval.every=0")
    config.data.stages = train_config.from_dict(
        {"data": {"stages": [{"at": 0.5, "seq_len": 64, "batch_size": 1}]}}).data.stages
    result = train(config.validate())
    training = [s for s in shapes if s in ((2, 32), (1, 64))]
    # 4 steps of 2 micro-batches of 2 x 32, then 4 steps of 2 micro-batches of 1 x 64:
    # the same 128 tokens per step.
    assert training[-16:] == [(2, 32)] * 8 + [(1, 64)] * 8
    saved = json_module.loads((result.final_checkpoint / "config.json").read_text())
    assert saved["rope_parameters"]["rope_theta"] == 50000.0
    assert saved["rope_parameters"]["rope_type"] == "linear"
    assert saved["rope_parameters"]["factor"] == 2.0
    assert saved["max_position_embeddings"] == 256


def test_resuming_inside_and_at_a_stage_boundary_is_exact(setup, tmp_path):
    # checkpoints every 2 steps: killed after 4 resumes at the boundary, after 5 inside
    assert_resumes_exactly(setup, tmp_path, [4, 5], extra=STAGES)


def assert_resumes_exactly(setup, tmp_path, kill_steps, *, extra="", overrides=(),
                           weights="model.safetensors"):
    """A run killed (SIGKILL) after each of ``kill_steps`` and resumed ends with the weights
    file ``weights`` of its final checkpoint bit-identical to an uninterrupted run's."""
    straight = run_cli(setup, tmp_path / "straight", extra=extra, overrides=overrides)
    assert straight.returncode == 0, straight.stderr[-3000:]
    final = f"checkpoints/step-00000008/{weights}"
    want = load_file(tmp_path / "straight" / final)
    for kill_step in kill_steps:
        run_dir = tmp_path / f"killed{kill_step}"
        killed = run_cli(setup, run_dir, kill=f"step:{kill_step}", extra=extra,
                         overrides=overrides)
        assert killed.returncode == -9
        resumed = run_cli(setup, run_dir, extra=extra, overrides=overrides)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        got = load_file(run_dir / final)
        assert all(torch.equal(got[k], want[k]) for k in want), kill_step


def test_metadata_conditioning_then_cooldown_runs_end_to_end(setup, tmp_path,
                                                            tokenizer_dir):
    # MeCo: documents with their source prefixed (kept out of the loss) for the first 75 %,
    # the same documents without it for the cooldown.
    import json as json_module
    import random

    from cptfast.data import prepare
    from synthetic_text import domain_document

    rng = random.Random(1)
    with open(tmp_path / "web.jsonl", "w") as f:
        for i in range(200):
            f.write(json_module.dumps({"url": f"site{i % 7}.example", "text":
                                       domain_document(rng)}) + "\n")
    prepare([tmp_path / "web.jsonl"], tmp_path / "meco", tokenizer_dir, prefix_field="url",
            prefix_template="URL: {}\n\n", workers=1, progress=False)
    prepare([tmp_path / "web.jsonl"], tmp_path / "plain", tokenizer_dir, workers=1,
            progress=False)
    assert (tmp_path / "meco" / "loss_mask").is_dir()
    config = in_process_config(setup, tmp_path / "run", "--checkpoint.every=0")
    config.data = train_config.from_dict({"data": {
        "sources": {"meco": {"path": str(tmp_path / "meco"), "weight": 1.0},
                    "plain": {"path": str(tmp_path / "plain"), "weight": 0.0}},
        "phases": [{"at": 0.75, "weights": {"plain": 1.0}}],
        "eval": {"plain": str(tmp_path / "plain")}, "seq_len": 32, "batch_size": 2}}).data
    result = train(config.validate())
    assert result.steps == 8 and result.evals[-1]["plain"] < result.evals[0]["plain"]
