"""The trainer's configuration: TOML, overrides, and clear errors for bad keys and values."""

import subprocess
import sys

import pytest

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
    ("[model]\nattention = 1", r"model.attention must be bool"),
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
