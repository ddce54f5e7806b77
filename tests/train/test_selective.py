"""Choosing what trains: model.trainable / model.frozen, optim.lr_multipliers and
optim.decay_to_base (L2 toward the loaded weights), against hand-computed AdamW steps and bit
for bit in whole runs."""

import pytest
import torch
from safetensors.torch import load_file

from cptfast.errors import ConfigError
from cptfast.training import config as train_config
from cptfast.training import train
from cptfast.training.parts import DecayToBase, LearningRate, parameter_groups, select_trainable

from test_train import in_process_config


def final_and_base(setup, run_dir):
    final = load_file(run_dir / "checkpoints" / "step-00000003" / "model.safetensors")
    return final, load_file(setup / "base" / "model.safetensors")


@pytest.mark.parametrize("overrides,moves", [
    (['--model.frozen=["embed_tokens", "layers\\\\.0\\\\."]'],
     lambda name: "embed_tokens" not in name and "layers.0." not in name),
    (['--model.trainable=["layers\\\\.1\\\\.mlp"]'], lambda name: "layers.1.mlp" in name),
])
def test_frozen_parameters_stay_bit_identical_and_the_others_train(setup, tmp_path, overrides,
                                                                     moves):
    run_dir = tmp_path / "selective"
    train(in_process_config(setup, run_dir, "--train.steps=3", "--checkpoint.every=0",
                            "--eval.every=0", *overrides))
    final, base = final_and_base(setup, run_dir)
    assert final.keys() == base.keys()
    for name in base:
        assert torch.equal(final[name], base[name]) != moves(name), name


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(5, 3)
        self.proj = torch.nn.Linear(3, 4)  # weight decays, bias does not


def tiny_config(**optim):
    return train_config.from_dict({"model": {"path": "m"}, "data": {"sources": {"a": {
        "path": "x"}}}, "optim": {"lr": 0.1, "weight_decay": 0.5, "beta1": 0.9, "beta2": 0.99,
                                  "eps": 1e-8, **optim}, "schedule": {"warmup_steps": 0,
                                                                      "kind": "constant"}})


@pytest.mark.parametrize("decay_to_base", [False, True])
def test_lr_multipliers_and_decay_to_base_against_a_hand_computed_adamw_step(decay_to_base):
    config = tiny_config(lr_multipliers={"embed": 0.25}, decay_to_base=decay_to_base)
    torch.manual_seed(0)
    model = Tiny().double()
    optimizer = torch.optim.AdamW(parameter_groups(model, config), lr=0.1, betas=(0.9, 0.99),
                                  eps=1e-8)
    decay = DecayToBase(optimizer) if decay_to_base else None
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():  # the weights have moved away from where the run started
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    LearningRate(optimizer, config).apply(0)
    if decay is not None:
        decay.apply()
    optimizer.step()

    for name, p in model.named_parameters():
        lr = 0.1 * (0.25 if "embed" in name else 1.0)
        wd = 0.5 if p.ndim >= 2 else 0.0
        toward = base[name] if decay_to_base else torch.zeros_like(p)
        g = grads[name]  # step 1: bias-corrected moments are g and g^2
        want = start[name] - lr * wd * (start[name] - toward) - lr * g / (g.abs() + 1e-8)
        torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-12, msg=name)


def test_choices_that_select_nothing_are_refused():
    model = Tiny()
    with pytest.raises(ConfigError, match=r"model.frozen: 'lm_head' matches no parameter"):
        select_trainable(model, train_config.from_dict(
            {"model": {"path": "m", "frozen": ["lm_head"]}}))
    with pytest.raises(ConfigError, match="leave no parameter to train"):
        select_trainable(model, train_config.from_dict(
            {"model": {"path": "m", "frozen": ["."]}}))
    with pytest.raises(ConfigError, match=r"optim.lr_multipliers: 'head' matches no parameter"):
        parameter_groups(model, tiny_config(lr_multipliers={"head": 2.0}))
    with pytest.raises(ConfigError, match=r"model.trainable: '\(' is not a regular expression"):
        train_config.from_dict({"model": {"path": "m", "trainable": ["("]},
                                "data": {"sources": {"a": {"path": "x"}}}}).validate()


def test_block_expansion_starts_as_the_identity_and_trains_only_the_new_layers(setup, tmp_path):
    import transformers

    from cptfast.training.expansion import expand_layers

    base = transformers.AutoModelForCausalLM.from_pretrained(setup / "base").eval()
    expanded = transformers.AutoModelForCausalLM.from_pretrained(setup / "base").eval()
    expand_layers(expanded, every=1)
    assert expanded.config.num_hidden_layers == 4 and len(expanded.model.layers) == 4
    assert [layer.self_attn.layer_idx for layer in expanded.model.layers] == [0, 1, 2, 3]
    trained = sorted({n.split(".")[2] for n, p in expanded.named_parameters() if p.requires_grad})
    assert trained == ["1", "3"]
    ids = torch.randint(0, base.config.vocab_size, (2, 17), generator=torch.Generator()
                        .manual_seed(0))
    with torch.no_grad():
        assert torch.equal(expanded(ids).logits, base(ids).logits)  # exactly: + 0 is exact

    run_dir = tmp_path / "expanded"
    train(in_process_config(setup, run_dir, "--train.steps=3", "--checkpoint.every=0",
                            "--eval.every=0", "--model.expand_layers={ every = 1 }"))
    export = run_dir / "checkpoints" / "step-00000003"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(export)
    assert reloaded.config.num_hidden_layers == 4
    final, old = load_file(export / "model.safetensors"), load_file(setup / "base" /
                                                                    "model.safetensors")
    for name, tensor in final.items():  # old layer i is now layer 2i; only odd layers move
        parts = name.split(".")
        if len(parts) > 2 and parts[1] == "layers":
            index = int(parts[2])
            if index % 2:
                assert not torch.equal(tensor, old[name.replace(f"layers.{index}.",
                                                                f"layers.{index // 2}.")])
            else:
                assert torch.equal(tensor, old[name.replace(f"layers.{index}.",
                                                            f"layers.{index // 2}.")]), name
        else:
            assert torch.equal(tensor, old[name]), name


@pytest.mark.parametrize("model,optim,message", [
    ({"expand_layers": {"every": 0}}, {}, r"model.expand_layers must be \{ every = N \} with "
                                          r"N >= 1, got \{'every': 0\}"),
    ({"expand_layers": {"each": 2}}, {}, r"model.expand_layers must be \{ every = N \}"),
    ({"new_rows_warmup_steps": 5}, {"decay_to_base": True},
     "optim.decay_to_base and model.new_rows_warmup_steps cannot be combined"),
    ({}, {"lr_multipliers": {"embed": -1.0}}, "optim.lr_multipliers must be finite and >= 0"),
])
def test_bad_selective_settings_are_named(model, optim, message):
    table = {"model": {"path": "m", **model}, "optim": optim,
             "data": {"sources": {"a": {"path": "x"}}}}
    with pytest.raises(ConfigError, match=message):
        train_config.from_dict(table).validate()
