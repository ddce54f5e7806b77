"""`cptfast train` on shards other projects wrote, named as their users name them: an llm.c
glob, a Megatron prefix with dots (int32 tokens beside uint16 ones), a nanoGPT train.bin, a
datatrove directory; held-out sets given the same ways; and a token outside the model's
embedding named as such."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "data"))
from independent_writers import (write_datatrove, write_headerless,  # noqa: E402
                                 write_llmc_shards, write_megatron)

from cptfast.cli import main as cli_main  # noqa: E402

EOT = 50256


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """Shards of four foreign writers and a tiny GPT-2-vocabulary model, built offline."""
    import transformers

    root = tmp_path_factory.mktemp("foreign")
    rng = np.random.default_rng(0)

    def docs(count):
        return [rng.integers(0, 50000, rng.integers(2, 40)).tolist() for _ in range(count)]

    (root / "llmc").mkdir()
    write_llmc_shards(root / "llmc", docs(80), shard_tokens=500)
    (root / "llmc" / "fineweb_val_000000.bin").write_bytes(
        (root / "llmc" / "fineweb_train_000000.bin").read_bytes())
    (root / "megatron").mkdir()
    write_megatron(root / "megatron" / "code-v1.1_text_document", docs(60), "int32")
    write_headerless(root / "train.bin", [t for d in docs(60) for t in d + [EOT]], "uint16")
    (root / "datatrove").mkdir()
    write_datatrove(root / "datatrove" / "00000_tokenized.ds", docs(40), "uint16")
    write_datatrove(root / "datatrove" / "00001_tokenized.ds", docs(40), "uint16")
    config = transformers.LlamaConfig(
        vocab_size=50304, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "base")
    return root


def config_text(root: Path, run: Path, sources: str, evals: str) -> str:
    return f"""
[model]
path = "{root / 'base'}"
[data]
seq_len = 32
batch_size = 2
{sources}
[data.eval]
{evals}
[optim]
lr = 1e-3
[schedule]
warmup_steps = 1
[train]
steps = 2
output = "{run}"
precision = "fp32"
[checkpoint]
every = 0
export = false
[eval]
every = 0
batches = 1
[logging]
progress = false
tensorboard = false
"""


def test_cptfast_train_takes_foreign_shards_as_they_are(foreign, tmp_path, capsys):
    sources = f"""
[data.sources.web]
path = "{foreign / 'llmc' / 'fineweb_train_*.bin'}"
[data.sources.code]
path = "{foreign / 'megatron' / 'code-v1.1_text_document'}"
[data.sources.books]
path = "{foreign / 'train.bin'}"
format = "headerless"
dtype = "uint16"
eos_id = {EOT}
[data.sources.news]
path = ["{foreign / 'datatrove'}"]
"""
    evals = f"""
web = "{foreign / 'llmc' / 'fineweb_val_000000.bin'}"
news = {{ path = "{foreign / 'datatrove' / '*.ds'}" }}
"""
    (tmp_path / "run.toml").write_text(config_text(foreign, tmp_path / "run", sources, evals))
    assert cli_main(["train", str(tmp_path / "run.toml")]) == 0, capsys.readouterr().err
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    evaluated = [line["eval"] for line in lines if "eval" in line]
    assert evaluated and set(evaluated[-1]) == {"web", "news"}
    assert all(np.isfinite(v["loss"]) for v in evaluated[-1].values())
    plan = json.loads((tmp_path / "run" / "mixture_plan.json").read_text())
    assert {row["source"] for row in plan} == {"web", "code", "books", "news"}
    assert all(row["tokens"] > 0 for row in plan)


def test_a_token_outside_the_embedding_is_named(foreign, tmp_path, capsys):
    write_megatron(tmp_path / "wide", [[1, 2, 3], [4, 60000, 6]], "int32")
    sources = f"""
[data.sources.web]
path = "{foreign / 'llmc' / 'fineweb_train_*.bin'}"
[data.sources.wide]
path = "{tmp_path / 'wide'}"
"""
    (tmp_path / "run.toml").write_text(config_text(foreign, tmp_path / "run", sources, ""))
    assert cli_main(["train", str(tmp_path / "run.toml")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    for part in ("source 'wide'", "wide.bin", "token id 60000", "50304 rows"):
        assert part in err[0], err


def test_a_headerless_source_without_its_keys_is_refused(foreign, tmp_path, capsys):
    sources = f"""
[data.sources.books]
path = "{foreign / 'train.bin'}"
format = "headerless"
"""
    (tmp_path / "run.toml").write_text(config_text(foreign, tmp_path / "run", sources, ""))
    assert cli_main(["train", str(tmp_path / "run.toml")]) == 1
    err = capsys.readouterr().err
    assert "data.sources.books" in err and "eos_id" in err and "Traceback" not in err
