"""The stateful parts of a run, each with ``state_dict()`` / ``load_state_dict()``, so that a
checkpoint is a dict of them (`checkpoint.save`): counters, the learning-rate schedule, the
evaluation history, the stall watch, the EMA of the weights, the new-rows warm-up, and the
model and optimizer (``sharded``: saved by every rank with torch.distributed.checkpoint)."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import torch

from cptfast.errors import ConfigError
from cptfast.training.config import Config
from cptfast.training.distributed import unwrap
from cptfast.training.schedule import lr_at


@dataclass
class Counters:
    """Where the run is: optimizer steps done, tokens consumed, steps skipped (no counted label
    or non-finite), and non-finite steps in a row (the stop rule)."""

    step: int = 0
    tokens: int = 0
    skipped: int = 0
    nonfinite_in_a_row: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, int(value))


class LearningRate:
    """The schedule of `schedule.lr_at`, applied to the optimizer before each step."""

    def __init__(self, optimizer, config: Config):
        self.optimizer, self.config, self.last = optimizer, config, None

    def apply(self, step: int) -> float:
        c = self.config
        self.last = lr_at(step, lr=c.optim.lr, steps=c.train.steps, kind=c.schedule.kind,
                          warmup_steps=c.schedule.warmup_steps, min_lr_ratio=c.optim.min_lr_ratio,
                          decay_fraction=c.schedule.decay_fraction,
                          decay_shape=c.schedule.decay_shape)
        for group in self.optimizer.param_groups:
            group["lr"] = self.last * group.get("lr_multiplier", 1.0)
        return self.last

    def state_dict(self) -> dict:  # a pure function of the step: only the last value
        return {"last": self.last}

    def load_state_dict(self, state: dict) -> None:
        self.last = state["last"]


class EvalHistory:
    """Every evaluation of the run: [{"step": N, source name: loss, ...}]."""

    def __init__(self):
        self.evals: list[dict] = []

    def add(self, step: int, losses: dict[str, float]) -> None:
        self.evals.append({"step": step, **losses})

    def last_step(self) -> int | None:
        return self.evals[-1]["step"] if self.evals else None

    def state_dict(self) -> dict:
        return {"evals": list(self.evals)}

    def load_state_dict(self, state: dict) -> None:
        self.evals = list(state["evals"])


class StallWatch:
    """Whether the loss and grad_norm have stopped changing (a model that cannot learn: zero
    gradients, weights that do not matter): `update` is True once ``steps`` steps in a row
    repeated the previous step's values (0: never). Skipped steps (None) do not count."""

    def __init__(self, steps: int):
        self.steps, self.repeats, self.last = steps, 0, None

    def update(self, loss: float | None, grad_norm: float | None) -> bool:
        if loss is None:
            return False
        same = self.last is not None and all(
            math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)
            for a, b in zip((loss, grad_norm), self.last))
        self.repeats = self.repeats + 1 if same else 0
        self.last = (loss, grad_norm)
        return self.steps > 0 and self.repeats == self.steps

    def state_dict(self) -> dict:
        return {"repeats": self.repeats, "last": self.last}

    def load_state_dict(self, state: dict) -> None:
        self.repeats = state["repeats"]
        self.last = tuple(state["last"]) if state["last"] is not None else None


class RunRecord:
    """The config the run was started with, kept in each checkpoint; after a resume,
    ``resumed`` is the stored one (None: a new run)."""

    def __init__(self, config: Config):
        from cptfast.training.config import to_dict

        self.config, self.resumed = to_dict(config), None

    def state_dict(self) -> dict:
        return {"config": self.config}

    def load_state_dict(self, state: dict) -> None:
        self.resumed = state["config"]


class ModelState:
    """The model's weights (resharded on load to any number of ranks)."""

    sharded = True

    def __init__(self, model):
        self.model = model

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        return get_model_state_dict(self.model)

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict
        set_model_state_dict(self.model, state)


class OptimizerState:
    """AdamW's moments and step counts, keyed by parameter name (so they reshard too)."""

    sharded = True

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
        set_optimizer_state_dict(self.model, self.optimizer, state)


class EMA:
    """An exponential moving average of the weights in fp32 (train.ema_decay), updated after
    each applied step and exported beside the model (checkpoints/step-N/ema)."""

    sharded = True

    def __init__(self, model, decay: float):
        self.model, self.decay = model, decay
        self.weights = {name: p.detach().float().clone()
                        for name, p in unwrap(model).named_parameters()}

    @torch.no_grad()
    def update(self) -> None:
        for name, p in unwrap(self.model).named_parameters():
            self.weights[name].lerp_(p.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict:
        return self.weights  # loaded in place by torch.distributed.checkpoint

    def load_state_dict(self, state: dict) -> None:
        for name, tensor in state.items():
            if tensor is not self.weights[name]:
                self.weights[name].copy_(tensor)


class NewRowsWarmup:
    """After `cptfast expand-vocab`: for the first ``steps`` steps only the new embedding rows
    move (model.new_rows_warmup_steps). Other parameters get no gradient (AdamW skips them);
    old rows get a zero one and are restored after the step (undoing weight decay)."""

    def __init__(self, model, config: Config, context):
        self.steps = config.model.new_rows_warmup_steps
        inner = unwrap(model)
        self.old_size = getattr(inner.config, "cptfast_vocab_expanded_from", None)
        if self.old_size is None:
            raise ConfigError("model.new_rows_warmup_steps needs a model written by `cptfast "
                              "expand-vocab` (its config records the old vocabulary size)")
        if context.distributed and config.train.parallel == "fsdp2":
            raise ConfigError("model.new_rows_warmup_steps works with ddp, not fsdp2")
        self.model = model
        self.tables = [inner.get_input_embeddings().weight]
        if inner.get_output_embeddings().weight is not self.tables[0]:
            self.tables.append(inner.get_output_embeddings().weight)

    def applies(self, step: int) -> bool:
        return step < self.steps

    def step(self, optimizer) -> None:
        table_ids = {id(t) for t in self.tables}
        for parameter in self.model.parameters():
            if id(parameter) not in table_ids:
                parameter.grad = None
        saved = []
        for table in self.tables:
            if table.grad is not None:
                table.grad[:self.old_size] = 0
            saved.append(table.detach()[:self.old_size].clone())
        optimizer.step()
        with torch.no_grad():
            for table, rows in zip(self.tables, saved):
                table[:self.old_size] = rows


def select_trainable(model, config: Config) -> None:
    """model.trainable / model.frozen: parameters outside the first or inside the second stop
    requiring gradients (before wrapping, so DDP and FSDP2 see the final choice). A pattern
    that matches no parameter is an error (a typo would otherwise train everything)."""
    _each_pattern_matches(model, "model.trainable", config.model.trainable)
    _each_pattern_matches(model, "model.frozen", config.model.frozen)
    for name, parameter in model.named_parameters():
        keep = not config.model.trainable or any(re.search(p, name)
                                                 for p in config.model.trainable)
        if not keep or any(re.search(p, name) for p in config.model.frozen):
            parameter.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("model.trainable / model.frozen leave no parameter to train")


def _each_pattern_matches(model, key: str, patterns) -> None:
    names = [name for name, _ in model.named_parameters()]
    for pattern in patterns:
        if not any(re.search(pattern, name) for name in names):
            raise ConfigError(f"{key}: {pattern!r} matches no parameter of the model (names "
                              f"look like {names[0]!r})")


def parameter_groups(model, config: Config) -> list[dict]:
    """AdamW's groups: weight decay on matrices only (not on norms, biases or other 1-D
    parameters), and one group per learning-rate multiplier (optim.lr_multipliers, the first
    matching pattern; "lr_multiplier" in the group, applied by `LearningRate`)."""
    multipliers = config.optim.lr_multipliers
    _each_pattern_matches(model, "optim.lr_multipliers", multipliers)
    groups: dict[tuple[bool, float], list] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            factor = next((m for p, m in multipliers.items() if re.search(p, name)), 1.0)
            groups.setdefault((parameter.ndim >= 2, factor), []).append(parameter)
    return [{"params": params, "weight_decay": config.optim.weight_decay if decay else 0.0,
             "lr_multiplier": factor}
            for (decay, factor), params in sorted(groups.items(), key=lambda kv: kv[0],
                                                  reverse=True)]


class DecayToBase:
    """optim.decay_to_base (L2-SP): AdamW's decoupled decay, p -= lr * wd * p, becomes
    p -= lr * wd * (p - base), toward the weights the run started from. Applied before the
    optimizer step, as AdamW applies its own; the optimizer's groups then carry no decay of
    their own. ``base`` is taken when the model is loaded, before any checkpoint is restored:
    it is model.path's weights, so it needs no saving."""

    def __init__(self, optimizer):
        self.optimizer, self.base = optimizer, {}
        for group in optimizer.param_groups:
            group["decay_to_base"], group["weight_decay"] = group["weight_decay"], 0.0
            if group["decay_to_base"]:
                self.base.update({id(p): p.detach().clone() for p in group["params"]})

    @torch.no_grad()
    def apply(self) -> None:
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if group["decay_to_base"] and p.grad is not None:  # AdamW skips the others
                    p.sub_(p - self.base[id(p)], alpha=group["lr"] * group["decay_to_base"])
