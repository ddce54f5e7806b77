"""The trainer's configuration: TOML, overrides, and clear errors for bad keys and values."""

import subprocess
import sys

import pytest

from cptfast.cli import main
from cptfast.errors import ConfigError
from cptfast.training import config

VALID = """
[model]
path = "models/base"
[data]
seq_len = 512
[data.sources.domain]
path = "shards/domain"
weight = 0.8
[data.sources.general]
path = "shards/general"
weight = 0.2
[data.eval]
domain = "shards/domain_eval"
[optim]
lr = 3e-4
"""


def write(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_a_valid_file_and_overrides(tmp_path):
    loaded = config.load(write(tmp_path, VALID), ["--optim.lr=1e-3", "--data.packing=bestfit",
                                                  "--schedule.kind=wsd", "--train.steps=7"])
    assert loaded.optim.lr == 1e-3 and loaded.data.seq_len == 512
    assert loaded.data.packing == "bestfit" and loaded.schedule.kind == "wsd"  # bare strings
    assert loaded.train.steps == 7 and isinstance(loaded.optim.weight_decay, float)
    assert loaded.data.sources["domain"].weight == 0.8
    assert {k: v.path for k, v in loaded.data.eval.items()} == {"domain": "shards/domain_eval"}


@pytest.mark.parametrize("text,message", [
    ("[optim]\nlearning_rate = 1.0", r"unknown config key 'optim.learning_rate'"),
    ("[optim]\nlr_ = 1.0", r"did you mean optim.lr\?"),
    ("[optimizer]\nlr = 1.0", r"unknown config key 'optimizer'; did you mean optim\?"),
    ("[data.sources.a]\npath = 'x'\nweigth = 2", r"did you mean data.sources.a.weight\?"),
    ("[train]\nsteps = 'ten'", r"train.steps must be int, got 'ten'"),
    ("[model]\nattention = 1", r"model.attention must be a string \(or true / false\)"),
    ("[model]\nattention = \"flash\"", r"model.attention must be one of cptfast, flash_attn, "
                                        r"off; got 'flash'"),
    ("[train]\nprecision = 'fp16'", r"train.precision must be one of fp32, bf16-mixed, bf16-pure"),
    ("[schedule]\nkind = 'exp'", r"schedule.kind must be one of"),
    ("[train]\nsteps = 0", r"train.steps must be at least 1"),
    ("[data]\nseq_len = 512", r"model.path is required"),
    ("[model]\npath = 'm'", r"data.sources is empty"),
    ("[model\npath = 'm'", r"not valid TOML"),
])
def test_bad_keys_and_values_are_named(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        config.load(write(tmp_path, text))


def test_bad_override_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"did you mean optim.lr\?"):
        config.load(write(tmp_path, VALID), ["--optim.lrr=1"])
    with pytest.raises(ValueError, match="look like --section.key=value"):
        config.parse_override("optim.lr=1")


def test_describe_lists_every_key_with_its_default():
    text = config.describe()
    for section, cls in config._SECTIONS.items():
        assert f"[{section}]" in text
        for field in cls.__dataclass_fields__:
            assert f"\n{field} = " in text, field
    assert 'precision = "bf16-mixed"' in text and "lr = 2e-05" in text


def test_command_line_help_print_config_and_errors(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "cptfast", "train", *a],  # noqa: E731
                                    capture_output=True, text=True, cwd=tmp_path)
    printed = run("--print-config")
    assert printed.returncode == 0 and "global_batch_tokens = 0" in printed.stdout
    assert "max_nonfinite_steps" in run("--help").stdout
    bad = run(str(write(tmp_path, VALID)), "--optim.lrr=1")
    assert bad.returncode == 1 and "did you mean optim.lr?" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize("override,message", [
    ("--logging.every=0", "logging.every must be at least 1, got 0"),  # was ZeroDivisionError
    ("--eval.batches=0", "eval.batches must be at least 1, got 0"),  # was a loss of 0.0000
    ("--checkpoint.every=-1", "checkpoint.every must be at least 0, got -1"),
    ("--checkpoint.keep=0", "checkpoint.keep must be at least 1, got 0"),
    ("--eval.every=-5", "eval.every must be at least 0, got -5"),
    ("--train.timeout_s=0", "train.timeout_s must be at least 1, got 0"),
    ("--train.stall_steps=-1", "train.stall_steps must be at least 0, got -1"),
    ("--optim.lr=inf", "optim.lr must be finite and greater than 0, got inf"),  # was accepted
    ("--optim.lr=nan", "optim.lr must be finite and greater than 0, got nan"),
    ("--optim.lr=0.0", "optim.lr must be finite and greater than 0, got 0.0"),
    ("--optim.weight_decay=-inf", "optim.weight_decay must be finite and at least 0, got -inf"),
    ("--optim.beta2=1.0", "optim.beta2 must be in [0, 1), got 1.0"),
    ("--optim.eps=0.0", "optim.eps must be finite and greater than 0, got 0.0"),
    ("--optim.min_lr_ratio=1.5", "optim.min_lr_ratio must be in [0, 1], got 1.5"),
    ("--schedule.decay_fraction=0.0", "schedule.decay_fraction must be in (0, 1], got 0.0"),
    ("--model.rope_theta=inf", "model.rope_theta must be finite and at least 0, got inf"),
    ("--train.on_stall=stall", "train.on_stall must be one of warn, stop; got 'stall'"),
    ("--data.sources.domain.weight=0 --data.sources.general.weight=0",  # ZeroDivisionError
     "data.sources.NAME.weight: the weights must be finite with a positive sum, got domain "
     "0.0, general 0.0"),
])
def test_each_bad_value_is_one_line_naming_key_value_and_range(tmp_path, capsys, override,
                                                                message):
    rc = main(["train", str(write(tmp_path, VALID)), *override.split()])
    err = capsys.readouterr().err
    assert rc == 1 and err == f"cptfast train: error: {message}\n"


def test_every_range_is_in_the_table():
    numeric = {f"{section}.{f.name}" for section, cls in config._SECTIONS.items()
               for f in cls.__dataclass_fields__.values() if f.type in ("int", "float")}
    assert numeric == {key for key, _ in config.RANGES}


def test_internal_errors_keep_their_traceback_and_debug_shows_every_one(tmp_path, capsys,
                                                                        monkeypatch):
    path = str(write(tmp_path, VALID))
    assert main(["--debug", "train", path, "--logging.every=0"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ConfigError" in err
    assert err.endswith("cptfast train: error: logging.every must be at least 1, got 0\n")

    def bug(*args, **kwargs):
        raise ValueError("a bug, not the user's input")
    monkeypatch.setattr(config, "load", bug)
    with pytest.raises(ValueError, match="a bug"):  # not swallowed into one line
        main(["train", path])
    assert issubclass(ConfigError, ValueError)  # `except ValueError` callers still work


MINIMAL = {"data": {"sources": {"a": {"path": "shards"}}}}


def test_attention_is_chosen_by_one_key():
    # One way to choose the attention: model.attention (true / false still read as before).
    assert config.from_dict({"model": {"path": "m", "attention": True}, **MINIMAL}).validate() \
        .model.attention == "cptfast"
    assert config.from_dict({"model": {"path": "m", "attention": False}, **MINIMAL}).validate() \
        .model.attention == "off"
    chosen = config.from_dict({"model": {"path": "m", "attention": "flash_attn"},
                               **MINIMAL}).validate()
    assert chosen.model.attention == "flash_attn"
