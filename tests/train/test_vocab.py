"""Vocabulary expansion: new rows initialised as specified, old behaviour untouched, and a
warm-up that trains only the new rows."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from cptfast.training import train
from cptfast.training.vocab import expand_vocabulary
from test_train import in_process_config

NEW = ["echocardiogram", "bisoprolol", "ñandú"]


@pytest.fixture(scope="module")
def expanded(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("vocab") / "expanded"
    report = expand_vocabulary(setup / "base", out, new_tokens=NEW)
    return out, report


def test_decomposed_rows_are_the_mean_of_the_old_pieces(setup, expanded):
    from transformers import AutoTokenizer

    out, report = expanded
    old = AutoTokenizer.from_pretrained(setup / "base")
    new = AutoTokenizer.from_pretrained(out)
    before, after = (load_file(p / "model.safetensors") for p in (setup / "base", out))
    assert report["added"] == 3 and report["new_vocab"] == len(old) + 3 == len(new)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(after[name][:len(old)], before[name][:len(old)])  # old rows kept
        for token in NEW:
            pieces = old(token, add_special_tokens=False).input_ids
            assert len(pieces) > 1
            want = before[name][pieces].mean(0)
            torch.testing.assert_close(after[name][new.convert_tokens_to_ids(token)], want)


def test_expanded_model_loads_and_old_logits_do_not_move(setup, expanded):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = expanded
    old_model = AutoModelForCausalLM.from_pretrained(setup / "base").eval()
    new_model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert new_model.config.cptfast_vocab_expanded_from == len(
        AutoTokenizer.from_pretrained(setup / "base"))
    ids = torch.tensor([[5, 17, 42, 99]])
    with torch.no_grad():
        a, b = old_model(ids).logits, new_model(ids).logits
    torch.testing.assert_close(b[..., :a.shape[-1]], a)


def test_mean_init_with_and_without_noise(setup, tmp_path):
    exact = expand_vocabulary(setup / "base", tmp_path / "m0", new_tokens=NEW, init="mean",
                              noise_std=0.0)
    rows = load_file(tmp_path / "m0" / "model.safetensors")["model.embed_tokens.weight"]
    old = exact["old_vocab"]
    for token_id in range(old, old + 3):
        torch.testing.assert_close(rows[token_id], rows[:old].mean(0))
    many = [f"tok{i}" for i in range(200)]
    expand_vocabulary(setup / "base", tmp_path / "m1", new_tokens=many, init="mean",
                      noise_std=0.5)
    rows = load_file(tmp_path / "m1" / "model.safetensors")["model.embed_tokens.weight"]
    noise = rows[old:] - rows[:old].mean(0)
    assert noise.std().item() == pytest.approx(0.5 * rows[:old].std().item(), rel=0.1)


def test_a_tokenizer_that_does_not_extend_the_old_one_is_refused(setup, tmp_path,
                                                                 big_vocab_tokenizer_dir):
    with pytest.raises(ValueError, match="does not extend the model's tokenizer"):
        expand_vocabulary(setup / "base", tmp_path / "x", tokenizer_dir=big_vocab_tokenizer_dir)


def test_warmup_trains_only_the_new_rows(setup, expanded, tmp_path):
    out, report = expanded
    old = report["old_vocab"]
    before = load_file(out / "model.safetensors")
    config = in_process_config(setup, tmp_path / "warm", f'--model.path="{out}"',
                               "--train.steps=2", "--model.new_rows_warmup_steps=2",
                               "--checkpoint.every=0")
    after = load_file(train(config).final_checkpoint / "model.safetensors")
    for name, tensor in before.items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(after[name][:old], tensor[:old]), name
            assert not torch.equal(after[name][old:], tensor[old:]), name  # the new rows moved
        else:
            assert torch.equal(after[name], tensor), name
    # After the warm-up everything trains.
    config = in_process_config(setup, tmp_path / "warm2", f'--model.path="{out}"',
                               "--train.steps=2", "--model.new_rows_warmup_steps=1",
                               "--checkpoint.every=0")
    after = load_file(train(config).final_checkpoint / "model.safetensors")
    assert not torch.equal(after["model.norm.weight"], before["model.norm.weight"])
    bare = in_process_config(setup, tmp_path / "bad", "--model.new_rows_warmup_steps=1")
    with pytest.raises(ValueError, match="needs a model written by `cptfast expand-vocab`"):
        train(bare)


def test_command_line(setup, tmp_path):
    done = subprocess.run([sys.executable, "-m", "cptfast", "expand-vocab", "--model",
                           str(setup / "base"), "--tokens", "tachycardia", "--output",
                           str(tmp_path / "cli")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "(1 new rows, initialised by decompose)" in done.stdout


def test_a_larger_tokenizer_gives_the_same_model_as_the_token_list(setup, expanded, tmp_path):
    from transformers import AutoTokenizer

    larger = AutoTokenizer.from_pretrained(setup / "base")
    larger.add_tokens(NEW)
    larger.save_pretrained(tmp_path / "larger")
    expand_vocabulary(setup / "base", tmp_path / "via_dir", tokenizer_dir=tmp_path / "larger")
    a = load_file(tmp_path / "via_dir" / "model.safetensors")
    b = load_file(expanded[0] / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)
