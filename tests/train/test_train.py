"""The trainer end to end on a tiny model: exact resumption after SIGKILL (at a step and in the
middle of writing a checkpoint), non-finite losses, the final checkpoint in transformers, and a
shortened demo."""

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cptfast.training import NonFiniteLossError, load, train
from cptfast.training import loop as training_loop


def toml(setup: Path, run_dir: Path, extra: str = "") -> str:
    return f"""
[model]
path = "{setup / 'base'}"
[data]
seq_len = 32
batch_size = 2
[data.sources.domain]
path = "{setup / 'domain'}"
weight = 0.75
[data.sources.general]
path = "{setup / 'general'}"
weight = 0.25
[data.eval]
domain = "{setup / 'domain'}"
[optim]
lr = 1e-2
global_batch_tokens = 128
[schedule]
warmup_steps = 2
[train]
steps = 8
output = "{run_dir}"
precision = "fp32"
deterministic = true
[checkpoint]
every = 2
keep = 2
[eval]
every = 4
batches = 2
[logging]
progress = false
tensorboard = false
""" + extra


FAULT_INJECTION = Path(__file__).with_name("fault_injection.py")


def run_cli(setup: Path, run_dir: Path, kill: str | None = None, extra: str = "",
            overrides: tuple = ()) -> subprocess.CompletedProcess:
    config = run_dir.parent / f"{run_dir.name}.toml"
    config.write_text(toml(setup, run_dir, extra))
    # A kill is injected by tests/train/fault_injection.py, which runs the same command.
    launcher = [str(FAULT_INJECTION), kill] if kill else ["-m", "cptfast"]
    return subprocess.run([sys.executable, *launcher, "train", str(config), *overrides],
                          capture_output=True, text=True, timeout=300)


def final_weights(run_dir: Path) -> dict:
    return load_file(run_dir / "checkpoints" / "step-00000008" / "model.safetensors")


@pytest.fixture(scope="session")
def uninterrupted(setup, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "straight"
    done = run_cli(setup, run_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    return final_weights(run_dir)


def assert_bit_identical(got: dict, want: dict):
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("kill_step", sorted(random.Random(7).sample(range(1, 8), 2)))
def test_sigkill_at_a_step_then_resume_is_bit_identical(setup, uninterrupted, tmp_path,
                                                        kill_step):
    run_dir = tmp_path / "killed"
    killed = run_cli(setup, run_dir, kill=f"step:{kill_step}")
    assert killed.returncode == -9  # SIGKILL, no clean-up ran
    resumed = run_cli(setup, run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_bit_identical(final_weights(run_dir), uninterrupted)
    # The metrics file has each step once, as if the run had never stopped.
    import json
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text()
             .splitlines() if "loss" in json.loads(line)]
    assert steps == list(range(1, 9))


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(setup, uninterrupted,
                                                                   tmp_path):
    run_dir = tmp_path / "killed_in_save"
    killed = run_cli(setup, run_dir, kill="checkpoint:6")
    assert killed.returncode == -9
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints[:2] == ["step-00000002", "step-00000004"]
    assert any(name.startswith("step-00000006.partial-") for name in checkpoints)
    resumed = run_cli(setup, run_dir)  # from step 4, the newest complete one
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_bit_identical(final_weights(run_dir), uninterrupted)
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["step-00000006", "step-00000008"]  # partial removed, keep = 2


def in_process_config(setup, run_dir, *overrides):
    path = run_dir.parent / f"{run_dir.name}.toml"
    path.write_text(toml(setup, run_dir))
    return load(path, list(overrides))


def poison_steps(monkeypatch, bad_calls):
    """Make the embedding output NaN on the given forward calls (0-based, training only)."""
    real = training_loop._load_model
    calls = {"n": 0}

    def load_model(*args, **kwargs):
        model, tokenizer = real(*args, **kwargs)

        def hook(module, inputs, output):
            if module.training:
                calls["n"] += 1
                if calls["n"] - 1 in bad_calls:
                    return output * float("nan")
            return output
        model.get_input_embeddings().register_forward_hook(hook)
        return model, tokenizer

    monkeypatch.setattr(training_loop, "_load_model", load_model)


def test_non_finite_steps_are_skipped_and_counted(setup, tmp_path, monkeypatch):
    poison_steps(monkeypatch, {2, 3, 9})  # micro-batches: 2 per step -> steps 2 and 5
    result = train(in_process_config(setup, tmp_path / "nan"))
    assert result.steps == 8 and result.skipped_steps == 2
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    import json
    lines = [json.loads(line) for line in (tmp_path / "nan" / "metrics.jsonl").read_text()
             .splitlines()]
    skipped = [e["step"] for e in lines if "loss" in e and e["loss"] != e["loss"]]
    assert skipped == [2, 5]


def test_too_many_non_finite_steps_stop_with_the_last_good_state(setup, tmp_path,
                                                                  monkeypatch):
    poison_steps(monkeypatch, set(range(6, 100)))  # from step 4 on, every step
    config = in_process_config(setup, tmp_path / "nan_stop", "--train.max_nonfinite_steps=3",
                               "--checkpoint.every=0")
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row"):
        train(config)
    saved = tmp_path / "nan_stop" / "checkpoints" / "step-00000006"
    weights = load_file(saved / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_final_checkpoint_loads_in_transformers_with_equal_logits(setup, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = train(in_process_config(setup, tmp_path / "reload", "--train.steps=3",
                                     "--checkpoint.every=0"))
    loaded = AutoModelForCausalLM.from_pretrained(result.final_checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(result.final_checkpoint)
    ids = tokenizer("Patient Zoë presented with chest pain.", return_tensors="pt").input_ids
    result.model.eval()
    with torch.no_grad():
        want = result.model(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.equal(loaded.model.embed_tokens.weight,  # it did train
                           load_file(setup / "base" / "model.safetensors")
                           ["model.embed_tokens.weight"])


def test_bad_model_path_and_vocabulary_are_clear(setup, tmp_path):
    with pytest.raises(FileNotFoundError, match="model.path must be a local Hugging Face"):
        train(in_process_config(setup, tmp_path / "r1", f'--model.path="{tmp_path}"'))
    import transformers
    small = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                     num_hidden_layers=1, num_attention_heads=2)
    transformers.LlamaForCausalLM(small).save_pretrained(tmp_path / "small")
    with pytest.raises(ValueError, match="embedding has 50 rows"):
        train(in_process_config(setup, tmp_path / "r2", f'--model.path="{tmp_path / "small"}"'))


def test_shortened_demo_runs(tmp_path):
    from cptfast.training.demo import run_demo

    numbers = run_demo(tmp_path, quick=True, workers=1, progress=False)
    assert numbers["after"]["domain"] < numbers["before"]["domain"]
    # The forgetting that replay prevents: without it the general set ends worse.
    assert numbers["after_without_replay"]["general"] > numbers["after"]["general"]
    assert Path(numbers["final_checkpoint"]).is_dir() and numbers["sample"].startswith("def")
    again = run_demo(tmp_path, quick=True, workers=1, progress=False)  # cached inputs
    assert again["before"] == numbers["before"]


def test_activation_checkpointing_gives_the_same_weights(setup, tmp_path):
    plain = train(in_process_config(setup, tmp_path / "plain", "--train.steps=3",
                                    "--checkpoint.every=0"))
    recomputed = train(in_process_config(setup, tmp_path / "ckpt", "--train.steps=3",
                                         "--checkpoint.every=0",
                                         "--model.activation_checkpointing=true"))
    assert recomputed.model.is_activation_checkpointing
    assert not plain.model.is_activation_checkpointing
    for a, b in zip(plain.model.parameters(), recomputed.model.parameters()):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def test_bf16_pure_keeps_bf16_weights_and_optimizer_states(setup, tmp_path):
    result = train(in_process_config(setup, tmp_path / "bf16", "--train.steps=4",
                                     '--train.precision="bf16-pure"', "--checkpoint.every=0"))
    weights = load_file(result.final_checkpoint / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    from torch.distributed.checkpoint import FileSystemReader
    saved = FileSystemReader(result.final_checkpoint / "state").read_metadata()
    moments = {key: meta.properties.dtype for key, meta in saved.state_dict_metadata.items()
               if key.startswith("optimizer.state.") and key.endswith("exp_avg")}
    assert moments and set(moments.values()) == {torch.bfloat16}
    assert result.evals[-1]["domain"] < result.evals[0]["domain"]


def test_checkpoints_carry_the_shards_tokenizer_when_the_model_has_none(setup, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    bare = tmp_path / "bare"
    shutil.copytree(setup / "base", bare, ignore=shutil.ignore_patterns("tokenizer*",
                                                                        "special_tokens*"))
    assert not (bare / "tokenizer.json").exists()
    result = train(in_process_config(setup, tmp_path / "tok", f'--model.path="{bare}"',
                                     "--train.steps=1", "--checkpoint.every=0"))
    tokenizer = AutoTokenizer.from_pretrained(result.final_checkpoint)
    shards = AutoTokenizer.from_pretrained(setup / "domain" / "tokenizer")
    assert tokenizer("Zoë's café").input_ids == shards("Zoë's café").input_ids
