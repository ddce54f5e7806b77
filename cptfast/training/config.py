"""The trainer's configuration: TOML (read with tomllib) into dataclasses, one per section.

Unknown sections and keys are errors that name the closest valid key; ``--section.key=value``
overrides take TOML values (``--optim.lr=3e-4``, ``--data.packing=bestfit``) and fall back to
a plain string. `describe()` lists every key with its default and help (``--print-config``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import operator
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cptfast.data.loader import PACKINGS
from cptfast.ops import ATTENTION_IMPLEMENTATIONS
from cptfast.data.shards import FORMATS as SOURCE_FORMATS
from cptfast.errors import ConfigError
from cptfast.training.schedule import DECAY_SHAPES, SCHEDULES

# The allowed values of each choice, defined once: here for the trainer's own, beside the code
# that acts on them for the others.
PRECISIONS = ("fp32", "bf16-mixed", "bf16-pure")
DEVICES = ("auto", "cpu", "cuda")
PARALLELS = ("ddp", "fsdp2")
ON_STALL = ("warn", "stop")


def _help(text: str, default=dataclasses.MISSING, factory=dataclasses.MISSING):
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class ModelConfig:
    path: str = _help("a local Hugging Face model directory (config.json + safetensors)", "")
    attention: str | bool = _help(
        "packed attention, documents never see each other: cptfast (Triton on GPUs) | "
        "flash_attn (flash-attn's varlen kernel, CUDA) | off (the model's own attention; "
        "true / false mean cptfast / off)", "cptfast")
    loss: bool = _help("the fused linear cross-entropy (no logits in training)", True)
    rope: bool = _help("the fused in-place RoPE kernel (CUDA)", True)
    activation_checkpointing: bool = _help("recompute each layer in the backward", False)
    rope_theta: float = _help("long context: a new RoPE base (0: keep the model's)", 0.0)
    rope_scaling: dict[str, Any] = _help(
        "long context: RoPE scaling merged into the model's rope parameters, e.g. "
        "{ rope_type = \"yarn\", factor = 4.0, original_max_position_embeddings = 4096 }",
        factory=dict)
    max_position_embeddings: int = _help("long context: the model's new maximum (0: keep)", 0)
    new_rows_warmup_steps: int = _help(
        "after `cptfast expand-vocab`: train only the new embedding rows for this many steps",
        0)
    expand_layers: dict[str, Any] = _help(
        "block expansion (LLaMA-Pro): { every = 8 } inserts an identity-initialised copy after "
        "every 8 decoder layers, and only the new layers train ({}: off)", factory=dict)
    trainable: list[str] = _help("regexes over parameter names: only the matching ones train "
                                 r"([]: all), e.g. ['layers\.(2[4-9]|3\d)\.']", factory=list)
    frozen: list[str] = _help("regexes over parameter names: the matching ones never train, "
                              "e.g. [\"embed_tokens\", \"lm_head\"]", factory=list)


@dataclass
class EvalSourceConfig:
    path: str | list[str] = _help(
        "a shard directory (`cptfast prepare`), a directory of Megatron .bin/.idx pairs, a "
        "Megatron prefix, a .bin/.idx/.ds file, a glob (\"fineweb_train_*.bin\") or a list "
        "of these", "")
    format: str = _help("auto | megatron | llmc | headerless | datatrove", "auto")
    dtype: str = _help("headerless / datatrove: uint16 | uint32 | int32 (\"\": from the "
                       "format)", "")
    eos_id: int = _help("headerless: the token that ends each document (-1: none given)", -1)
    delimiter: int = _help("llmc: the token that splits documents (-1: the magic's own)", -1)
    delimiter_role: str = _help(
        "llmc / headerless: end (the delimiter is a document's last token, a label) | start "
        "(its first, a BOS) (\"\": GPT-2 llm.c and headerless end, Llama-3 llm.c start)", "")

    def spec(self) -> dict:
        """The source as `cptfast.data.open_source` takes it."""
        return {"path": self.path, "format": self.format, "dtype": self.dtype or None,
                "eos_id": None if self.eos_id < 0 else self.eos_id,
                "delimiter": None if self.delimiter < 0 else self.delimiter,
                "delimiter_role": self.delimiter_role or None}


@dataclass
class SourceConfig(EvalSourceConfig):
    weight: float = _help("share of the training tokens (normalised over sources)", 1.0)
    loss_weight: float = _help("multiplies the loss of this source's tokens", 1.0)


@dataclass
class PhaseConfig:
    at: float = _help("fraction of the run where the phase starts, in (0, 1)", 0.5)
    weights: dict[str, float] = _help("source weights from then on (unnamed sources: 0)",
                                      factory=dict)


@dataclass
class StageConfig:
    at: float = _help("fraction of the run where the stage starts, in (0, 1)", 0.8)
    seq_len: int = _help("tokens per packed row from then on", 8192)
    batch_size: int = _help("rows per micro-batch from then on (0: keep)", 0)


@dataclass
class DataConfig:
    sources: dict[str, SourceConfig] = _help(
        "training sources: [data.sources.NAME] tables with path and weight", factory=dict)
    eval: dict[str, EvalSourceConfig] = _help(
        "held-out sets by name: NAME = \"path\" or NAME = { path = ..., format = ... } "
        "(e.g. domain, general)", factory=dict)
    phases: list[PhaseConfig] = _help(
        "mixture phases: [[data.phases]] tables with at and weights, e.g. domain upsampling "
        "for the final 15 %", factory=list)
    stages: list[StageConfig] = _help(
        "sequence-length stages: [[data.stages]] tables with at, seq_len (and batch_size), "
        "e.g. long-context extension for the final 20 %", factory=list)
    seq_len: int = _help("tokens per packed row", 2048)
    batch_size: int = _help("rows per micro-batch on each rank", 8)
    packing: str = _help("concat (no padding) or bestfit (no document split)", "concat")
    seed: int = _help("seed of the data order (shared by all ranks)", 0)
    num_threads: int = _help("packing threads of the loader (0: pack in the training thread)",
                             2)
    prefetch: int = _help("micro-batches the loader keeps ready ahead of the step", 4)
    window: int = _help("bestfit: documents considered together when packing rows (a part of "
                        "the data order: changing it changes the stream)", 1024)


@dataclass
class OptimConfig:
    lr: float = _help("peak learning rate (re-warmed to from the loaded model)", 2e-5)
    min_lr_ratio: float = _help("floor of the decay, as a fraction of lr", 0.1)
    weight_decay: float = _help("AdamW weight decay (not on norms, biases, 1-D params)", 0.1)
    beta1: float = _help("AdamW beta1", 0.9)
    beta2: float = _help("AdamW beta2", 0.95)
    eps: float = _help("AdamW epsilon", 1e-8)
    grad_clip: float = _help("clip the global gradient norm to this (0: off)", 1.0)
    global_batch_tokens: int = _help(
        "tokens per optimizer step over all ranks; micro-batches accumulate to it "
        "(0: one micro-batch per step)", 0)
    lr_multipliers: dict[str, float] = _help(
        "regex over parameter names = factor on their learning rate (the first match counts), "
        "e.g. { embed_tokens = 0.1 }", factory=dict)
    decay_to_base: bool = _help("weight decay pulls toward the loaded weights (L2-SP), not "
                                "toward zero: a lever against forgetting", False)


@dataclass
class ScheduleConfig:
    kind: str = _help("cosine | linear (warmup then decay to the floor) | wsd "
                      "(warmup-stable-decay) | constant (warmup then flat)", "cosine")
    warmup_steps: int = _help("linear re-warming from 0 to lr", 100)
    decay_fraction: float = _help("wsd: the final fraction of the steps that decays", 0.2)
    decay_shape: str = _help("wsd: linear | cosine | 1-sqrt", "1-sqrt")


@dataclass
class TrainSection:
    steps: int = _help("optimizer steps in this run", 1000)
    output: str = _help("run directory: checkpoints/ (each step-N a model transformers loads), "
                        "metrics.jsonl", "runs/cptfast")
    precision: str = _help("fp32 | bf16-mixed (fp32 weights, bf16 compute) | bf16-pure "
                           "(bf16 weights and optimizer states)", "bf16-mixed")
    seed: int = _help("seed of the model-side randomness", 0)
    max_nonfinite_steps: int = _help("stop after this many non-finite losses in a row", 5)
    device: str = _help("auto (cuda when present) | cpu | cuda", "auto")
    deterministic: bool = _help("torch deterministic algorithms (exact resumption checks)",
                                False)
    ema_decay: float = _help("keep an exponential moving average of the weights with this "
                             "decay, exported as checkpoints/step-N/ema (0: off)", 0.0)
    parallel: str = _help("under torchrun: ddp | fsdp2 (per-layer fully_shard)", "ddp")
    cpu_offload: bool = _help("fsdp2: keep parameters and optimizer states on the CPU", False)
    timeout_s: int = _help("seconds a rank waits for the others before failing", 600)
    stall_steps: int = _help("warn when the loss and grad_norm have not changed for this many "
                             "steps (0: off)", 50)
    on_stall: str = _help("warn | stop (with a checkpoint) when the run stalls", "warn")


@dataclass
class CheckpointConfig:
    every: int = _help("save every N steps (0: only at the end)", 500)
    keep: int = _help("keep the newest K checkpoints", 3)
    resume: str = _help("auto (newest complete checkpoint in output) | none | a path", "auto")
    export: bool = _help("a Hugging Face export in every checkpoint (always in the last)", True)


@dataclass
class EvalConfig:
    every: int = _help("evaluate every N steps (0: only before and after)", 200)
    batches: int = _help("micro-batches per held-out set", 8)


@dataclass
class LoggingConfig:
    every: int = _help("write a metrics line every N steps", 1)
    progress: bool = _help("a tqdm progress bar", True)
    tensorboard: bool = _help("also write TensorBoard events when installed", True)
    wandb: dict[str, Any] = _help(
        "Weights & Biases: { project = \"...\", name = ..., mode = \"offline\", ... } (the "
        "keyword arguments of wandb.init; {}: off)", factory=dict)
    mlflow: dict[str, Any] = _help(
        "MLflow: { tracking_uri = \"file:./mlruns\", experiment = \"...\", run_name = ... } "
        "({}: off)", factory=dict)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> Config:
        """Every numeric value's range (`RANGES`) and the checks that need more than one key;
        raises ConfigError naming the key, the value and what is allowed."""
        if isinstance(self.model.attention, bool):
            self.model.attention = "cptfast" if self.model.attention else "off"
        _one_of("model.attention", self.model.attention, (*ATTENTION_IMPLEMENTATIONS, "off"))
        _one_of("train.precision", self.train.precision, PRECISIONS)
        _one_of("schedule.kind", self.schedule.kind, SCHEDULES)
        _one_of("schedule.decay_shape", self.schedule.decay_shape, DECAY_SHAPES)
        _one_of("data.packing", self.data.packing, PACKINGS)
        _one_of("train.device", self.train.device, DEVICES)
        _one_of("train.parallel", self.train.parallel, PARALLELS)
        _one_of("train.on_stall", self.train.on_stall, ON_STALL)
        for key, interval in RANGES:
            _check_range(key, operator.attrgetter(key)(self), interval)
        if not self.model.path:
            raise ConfigError("model.path is required: a local Hugging Face model directory")
        if not self.data.sources:
            raise ConfigError("data.sources is empty: add [data.sources.NAME] with a path")
        total = sum(source.weight for source in self.data.sources.values())
        if not 0 < total < math.inf:  # the mixture is normalised by this sum
            weights = ", ".join(f"{name} {s.weight}" for name, s in self.data.sources.items())
            raise ConfigError(f"data.sources.NAME.weight: the weights must be finite with a "
                              f"positive sum, got {weights}")
        previous = 0.0
        for index, phase in enumerate(self.data.phases):
            if not previous < phase.at < 1:
                raise ConfigError(f"data.phases[{index}].at must lie in (0, 1) and increase, "
                                  f"got {phase.at}")
            previous = phase.at
            unknown = set(phase.weights) - set(self.data.sources)
            if unknown:
                raise ConfigError(f"data.phases[{index}].weights names unknown sources "
                                  f"{sorted(unknown)}; sources are {sorted(self.data.sources)}")
            if not all(0 <= w < math.inf for w in phase.weights.values()) or not sum(
                    phase.weights.values()) > 0:
                raise ConfigError(f"data.phases[{index}].weights must be finite and >= 0 with a "
                                  f"positive sum, got {phase.weights}")
        previous = 0.0
        for index, stage in enumerate(self.data.stages):
            if not previous < stage.at < 1 or stage.seq_len < 2 or stage.batch_size < 0:
                raise ConfigError(f"data.stages[{index}] needs at in (0, 1) increasing, "
                                  f"seq_len >= 2 and batch_size >= 0; got {stage}")
            previous = stage.at
        named = [(f"data.sources.{n}", s) for n, s in self.data.sources.items()]
        for key, source in named + [(f"data.eval.{n}", s) for n, s in self.data.eval.items()]:
            if not source.path:
                raise ConfigError(f"{key}.path is required")
            _one_of(f"{key}.format", source.format, SOURCE_FORMATS)
            _one_of(f"{key}.dtype", source.dtype, ("", "uint16", "uint32", "int32"))
            _one_of(f"{key}.delimiter_role", source.delimiter_role, ("", "end", "start"))
            if source.format == "headerless" and (not source.dtype or source.eos_id < 0):
                raise ConfigError(f"{key}: a headerless source needs dtype (\"uint16\" or "
                                 "\"uint32\") and eos_id (the token that ends each document)")
        for key in ("model.trainable", "model.frozen", "optim.lr_multipliers"):
            for pattern in operator.attrgetter(key)(self):
                try:
                    re.compile(pattern)
                except re.error as error:
                    raise ConfigError(f"{key}: {pattern!r} is not a regular expression: "
                                      f"{error}") from None
        expand = self.model.expand_layers
        if expand and (set(expand) != {"every"} or not isinstance(expand["every"], int)
                       or isinstance(expand["every"], bool) or expand["every"] < 1):
            raise ConfigError(f"model.expand_layers must be {{ every = N }} with N >= 1, got "
                              f"{expand}")
        if self.optim.decay_to_base and self.model.new_rows_warmup_steps:
            raise ConfigError("optim.decay_to_base and model.new_rows_warmup_steps cannot be "
                              "combined (the warm-up steps only the new rows)")
        if not all(0 <= m < math.inf for m in self.optim.lr_multipliers.values()):
            raise ConfigError(f"optim.lr_multipliers must be finite and >= 0, got "
                              f"{self.optim.lr_multipliers}")
        for key, source in named:
            if not source.weight >= 0 or not source.loss_weight >= 0:
                raise ConfigError(f"{key}.weight and loss_weight must be >= 0")
        return self


# The allowed range of every numeric key, checked in one place (`Config.validate`): "[" and "]"
# include a bound, "(" and ")" exclude it. inf is never allowed, nor NaN (it fails every
# comparison). Sources, phases and stages are checked with their tables.
RANGES = (
    ("model.rope_theta", "[0, inf)"),
    ("model.max_position_embeddings", "[0, inf)"),
    ("model.new_rows_warmup_steps", "[0, inf)"),
    ("data.seq_len", "[2, inf)"),
    ("data.batch_size", "[1, inf)"),
    ("data.seed", "[0, inf)"),
    ("data.num_threads", "[0, inf)"),
    ("data.prefetch", "[1, inf)"),
    ("data.window", "[1, inf)"),
    ("optim.lr", "(0, inf)"),
    ("optim.min_lr_ratio", "[0, 1]"),
    ("optim.weight_decay", "[0, inf)"),
    ("optim.beta1", "[0, 1)"),
    ("optim.beta2", "[0, 1)"),
    ("optim.eps", "(0, inf)"),
    ("optim.grad_clip", "[0, inf)"),
    ("optim.global_batch_tokens", "[0, inf)"),
    ("schedule.warmup_steps", "[0, inf)"),
    ("schedule.decay_fraction", "(0, 1]"),
    ("train.steps", "[1, inf)"),
    ("train.seed", "[0, inf)"),
    ("train.max_nonfinite_steps", "[1, inf)"),
    ("train.ema_decay", "[0, 1)"),
    ("train.timeout_s", "[1, inf)"),
    ("train.stall_steps", "[0, inf)"),
    ("checkpoint.every", "[0, inf)"),
    ("checkpoint.keep", "[1, inf)"),
    ("eval.every", "[0, inf)"),
    ("eval.batches", "[1, inf)"),  # 0 batches would report a loss that was never measured
    ("logging.every", "[1, inf)"),
)


def _check_range(key: str, value, interval: str) -> None:
    low, high = (float(bound) for bound in interval[1:-1].split(","))
    above = value >= low if interval[0] == "[" else value > low
    below = value <= high if interval[-1] == "]" else value < high
    if above and below:
        return
    if high == math.inf:  # said in words
        allowed = f"{'at least' if interval[0] == '[' else 'greater than'} {low:g}"
        if isinstance(value, float):
            allowed = f"finite and {allowed}"
    else:
        allowed = f"in {interval}"
    raise ConfigError(f"{key} must be {allowed}, got {value!r}")


def _one_of(key: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")


def _unknown(key: str, valid) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(valid), n=1, cutoff=0.5)
    prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
    hint = f"; did you mean {prefix}{close[0]}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint} (cptfast train --print-config lists "
                      "every key)")


def _build(cls, table: dict, where: str):
    """A dataclass from a TOML table, recursively, with unknown keys named."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where or 'config'} must be a table, got {table!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in table.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            raise _unknown(path, fields)
        values[key] = _convert(fields[key].type, value, path)
    return cls(**values)


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig,
             "schedule": ScheduleConfig, "train": TrainSection, "checkpoint": CheckpointConfig,
             "eval": EvalConfig, "logging": LoggingConfig}


def _convert(annotation: str, value: Any, path: str):
    kinds = {"str": str, "int": int, "float": float, "bool": bool}
    if annotation in _SECTION_TYPES:
        return _build(_SECTION_TYPES[annotation], value, path)
    if annotation == "dict[str, SourceConfig]":
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a table of [{path}.NAME] tables")
        return {name: _build(SourceConfig, table, f"{path}.{name}")
                for name, table in value.items()}
    if annotation == "dict[str, EvalSourceConfig]":
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a table of NAME = \"path\" or NAME = {{ path = "
                             "... }")
        return {name: _build(EvalSourceConfig, table if isinstance(table, dict)
                             else {"path": table}, f"{path}.{name}")
                for name, table in value.items()}
    if annotation == "list[str]":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{path} must be a list of strings, got {value!r}")
        return list(value)
    if annotation == "str | bool":
        if isinstance(value, (str, bool)):
            return value
        raise ConfigError(f"{path} must be a string (or true / false), got {value!r}")
    if annotation == "str | list[str]":
        if isinstance(value, str) or (isinstance(value, list) and value and
                                      all(isinstance(v, str) for v in value)):
            return value
        raise ConfigError(f"{path} must be a path or a non-empty list of paths, got {value!r}")
    if annotation == "list[StageConfig]":
        if not isinstance(value, list):
            raise ConfigError(f"{path} must be an array of [[{path}]] tables")
        return [_build(StageConfig, table, f"{path}[{i}]") for i, table in enumerate(value)]
    if annotation == "dict[str, Any]":
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a table")
        return dict(value)
    if annotation == "list[PhaseConfig]":
        if not isinstance(value, list):
            raise ConfigError(f"{path} must be an array of [[{path}]] tables")
        return [_build(PhaseConfig, table, f"{path}[{i}]") for i, table in enumerate(value)]
    if annotation == "dict[str, float]":
        if not isinstance(value, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values()):
            raise ConfigError(f"{path} must be a table of NAME = number")
        return {name: float(v) for name, v in value.items()}
    kind = kinds[annotation]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is bool and not isinstance(value, bool) or not isinstance(value, kind) or (
            kind is int and isinstance(value, bool)):
        raise ConfigError(f"{path} must be {annotation}, got {value!r}")
    return value


_SECTION_TYPES = {cls.__name__: cls for cls in _SECTIONS.values()}


def from_dict(table: dict) -> Config:
    return _build(Config, table, "")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``--section.key=value`` -> (["section", "key"], value parsed as TOML, else a string)."""
    if not text.startswith("--") or "=" not in text:
        raise ConfigError(f"overrides look like --section.key=value, got {text!r}")
    key, raw = text[2:].split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def load(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """The config from a TOML file (or the defaults) with ``--section.key=value`` overrides
    applied, validated."""
    table: dict = {}
    if path is not None:
        path = Path(path)
        try:
            table = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path}: not valid TOML: {error}") from None
    for text in overrides:
        keys, value = parse_override(text)
        node = table
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {key} is not a table")
        node[keys[-1]] = value
    return from_dict(table).validate()


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def describe() -> str:
    """Every key with its default and what it does, as TOML (``--print-config``)."""
    lines = []
    for section, cls in _SECTIONS.items():
        lines.append(f"[{section}]")
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING \
                else f.default
            shown = _toml_value(default)
            lines.append(f"{f.name} = {shown:<24} # {f.metadata.get('help', '')}")
        lines.append("")
    lines.append("# [data.sources.NAME]: path = \"shard directory\", weight = 1.0 (one table per "
                 "source)")
    lines.append("# [[data.phases]]: at = 0.85, weights = { domain = 0.9, general = 0.1 }")
    lines.append("# [[data.stages]]: at = 0.8, seq_len = 32768, batch_size = 1")
    return "\n".join(lines)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, dict):
        return "{}"
    if isinstance(value, list):
        return "[]"
    return repr(value)
