"""`cptfast.train(config)`: continued pretraining of a Hugging Face causal LM on token shards.

`Trainer` builds the run's parts (`parts`, `stream`): the model (loaded, accelerated, wrapped
for DDP or FSDP2), the optimizer and its schedule, the data stream, the held-out sets, the
counters; restores the newest checkpoint of the run if there is one; then `Trainer.train`
loops: draw the step's micro-batches, `train_step` (forward/backward with the loss normalised
by the step's label count, clip, step or skip a non-finite step), the callbacks (metrics
writers first), evaluation and checkpoint at their intervals, and the stop check. Resuming
restores every part and the RNG states, so a resumed run continues bit for bit (on the CPU
with deterministic settings), on any number of ranks: under torchrun each rank takes its share
of one global data stream, gradients are reduced by DDP or FSDP2, and rank 0 writes the files.

What is saved is good: the base model and every checkpoint are checked finite; a step without
a counted label or with a non-finite loss changes nothing. SIGTERM (preemption) or SIGINT stops
every rank after the same step, with a checkpoint; a second signal stops at once. A callback
can stop the run cleanly (`callbacks`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cptfast import hf
from cptfast.errors import (DiskFullError, NonFiniteLossError, NonFiniteWeightsError,
                            StalledError, TrainingStopped)
from cptfast.training import checkpoint, recipes
from cptfast.training.callbacks import Callback
from cptfast.training.config import Config
from cptfast.training.distributed import Context, unwrap, wrap
from cptfast.training.expansion import expand_layers
from cptfast.training.evaluation import autocast, eval_loss, held_out_batches
from cptfast.training.metrics import model_flops_per_token, peak_flops, peak_memory, writers
from cptfast.training.parts import (EMA, Counters, DecayToBase, EvalHistory, LearningRate,
                                    ModelState, NewRowsWarmup, OptimizerState, RunRecord,
                                    StallWatch, parameter_groups, select_trainable)
from cptfast.training.stream import DataStream


@dataclass
class TrainResult:
    run_dir: Path
    final_checkpoint: Path
    steps: int
    tokens: int
    skipped_steps: int
    evals: list[dict] = field(default_factory=list)  # one {"step", name: loss...} per eval
    tokens_per_s: float = 0.0
    model: object = None  # the trained model (accelerated), still in memory


@dataclass
class StepResult:
    """What one optimizer step did (``step``: steps done after it). ``loss`` and
    ``grad_norm`` are None when no label of the step counted."""

    step: int
    loss: float | None
    lr: float
    grad_norm: float | None
    tokens: int  # consumed by the run so far
    tokens_per_s: float
    mfu: float | None
    data_wait_frac: float
    skipped_steps: int
    memory_bytes: int
    applied: bool  # False: skipped (nothing counted, or non-finite); the weights did not move
    finite: bool

    def metrics(self) -> dict:
        """The values a metrics line records."""
        values = asdict(self)
        for key in ("step", "applied", "finite"):
            del values[key]
        return values


def train(config: Config, callbacks: list[Callback] = ()) -> TrainResult:
    """Run (or resume) the training described by ``config``; returns a summary. Under
    torchrun every rank calls it; rank 0 writes the files. ``callbacks``: `Callback`s whose
    hooks run after each step, evaluation and checkpoint. SIGTERM or SIGINT ends it with
    `TrainingStopped` after a checkpoint."""
    from transformers.utils import logging as transformers_logging

    config.validate()
    transformers_logging.disable_progress_bar()  # per-save bars would drown our own
    context, device = Context.start(config.train.device, config.train.timeout_s)
    try:
        with contextlib.ExitStack() as cleanup:  # closed however the run ends
            cleanup.enter_context(checkpoint.exclusive(config.train.output, context.main))
            stop = cleanup.enter_context(_StopSignals())
            cleanup.enter_context(context.guard("a collective in torch (model set-up, "
                                                "evaluation or checkpointing)"))
            trainer = Trainer(config, context, device, stop, callbacks)
            cleanup.callback(trainer.close)
            return trainer.train()
    except OSError as error:  # a full disk outside metrics and checkpoints (e.g. the plan)
        full = DiskFullError.caused(error, f"{error.filename or config.train.output}: no "
                                           "space left on device")
        if full is None:
            raise
        raise full from error
    finally:
        context.stop()


class Trainer:
    """One run: its parts, `train_step` and the loop `train`. Built by `train`."""

    def __init__(self, config: Config, context: Context, device: torch.device,
                 stop: _StopSignals, callbacks: list[Callback] = ()):
        self.config, self.context, self.device, self.stop = config, context, device, stop
        self.run_dir = Path(config.train.output)
        self.should_stop = False  # set by a callback: stop cleanly after this step
        if config.train.deterministic:
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(config.train.seed)

        self.model, self.tokenizer = self._build_model()
        self.optimizer = torch.optim.AdamW(
            parameter_groups(unwrap(self.model), config), lr=config.optim.lr,
            betas=(config.optim.beta1, config.optim.beta2), eps=config.optim.eps,
            fused=device.type == "cuda" and not config.train.cpu_offload)
        rows = _embedding_rows(self.model)
        self.decay_to_base = DecayToBase(self.optimizer) if config.optim.decay_to_base else None
        self.counters, self.schedule = Counters(), LearningRate(self.optimizer, config)
        self.stream = DataStream(config, context, device, rows)  # this rank's share
        self.evals, self.stall = EvalHistory(), StallWatch(config.train.stall_steps)
        self.ema = EMA(self.model, config.train.ema_decay) if config.train.ema_decay else None
        self.new_rows = (NewRowsWarmup(self.model, config, context)
                         if config.model.new_rows_warmup_steps else None)
        self.states = {"model": ModelState(self.model),
                       "optimizer": OptimizerState(self.model, self.optimizer),
                       **({"ema": self.ema} if self.ema is not None else {}),
                       "counters": self.counters, "schedule": self.schedule, "data": self.stream,
                       "evals": self.evals, "stall": self.stall, "config": RunRecord(config)}
        loss_weights = [s.loss_weight for s in config.data.sources.values()]
        self.loss_weights = torch.tensor(loss_weights, device=device)
        self.weighted = any(w != 1 for w in loss_weights)
        self.eval_sets = {name: held_out_batches(source.spec(), config.data.seq_len,
                                                 config.data.batch_size, config.eval.batches,
                                                 device, embedding_rows=rows, name=name)
                          for name, source in config.data.eval.items()}
        self.peak = peak_flops(device)

        resume_from = _resume_point(config, self.run_dir)
        if resume_from is not None:
            checkpoint.load(resume_from, self.states, context)
        self.saved_step = self.counters.step if resume_from is not None else None
        if context.main:  # the replay plan: tokens and epochs of each source over the whole run
            plan = recipes.mixture_plan(config, self.stream.source_tokens(),
                                        self.stream.tokens_per_step())
            (self.run_dir / "mixture_plan.json").write_text(json.dumps(plan, indent=1) + "\n")
        self.callbacks = list(callbacks)
        if context.main:  # the metrics writers come first: a user's hook sees the step logged
            self.callbacks[:0] = writers(config, self.run_dir, self.counters.step if resume_from
                                         is not None else -1, self.counters.step)

    def _build_model(self):
        config, context = self.config, self.context
        sharded = context.distributed and config.train.parallel == "fsdp2"  # rank 0 loads
        model, tokenizer = _load_model(Path(config.model.path), config,
                                       torch.device("cpu") if sharded else self.device,
                                       on_meta=sharded and not context.main)
        if tokenizer is None:  # checkpoints carry a tokenizer: the one the shards were made with
            tokenizer = _shard_tokenizer(config)
        select_trainable(model, config)
        self.flops_per_token = model_flops_per_token(model, config.data.seq_len)
        model = wrap(model, config.train.parallel, config.train.precision, context, self.device,
                     cpu_offload=config.train.cpu_offload)
        bad = _non_finite_parameter(model, context)
        if bad is not None:
            raise NonFiniteWeightsError(
                f"{config.model.path}: the base model's parameter {bad} holds NaN or Inf "
                "values; training cannot start from it. Load a model whose weights are finite "
                "(a checkpoint saved before a run diverged?)")
        return model, tokenizer

    def train(self) -> TrainResult:
        """Train to ``train.steps`` (from where a resumed run left off)."""
        config, counters = self.config, self.counters
        self._call("on_train_start")
        if counters.step == 0:
            self.evaluate()  # "before": the forgetting monitor's baseline
        started, tokens_at_start = time.perf_counter(), counters.tokens
        stopped = False  # by a callback, before train.steps
        while counters.step < config.train.steps:
            waiting = time.perf_counter()
            batches = self.stream.batches(counters.step)
            result = self.train_step(batches, data_wait=time.perf_counter() - waiting)
            self._call("on_step_end", result)
            self._check_health(result)
            step = result.step
            # The last step's evaluation comes before its checkpoint, which then holds it.
            if (config.eval.every and step % config.eval.every == 0) or step == config.train.steps:
                self.evaluate()
            if config.checkpoint.every and step % config.checkpoint.every == 0:
                self.save(export=config.checkpoint.export or step == config.train.steps)
            if self._stop_check(step):
                stopped = True
                break
        elapsed = time.perf_counter() - started  # the loop alone: training throughput
        if self.evals.last_step() != counters.step:
            self.evaluate()
        final = checkpoint.checkpoint_root(self.run_dir) / f"step-{counters.step:08d}"
        if self.saved_step != counters.step or (stopped and not config.checkpoint.export):
            final = self.save(export=True)  # the last checkpoint has the Hugging Face export
        result = TrainResult(self.run_dir, final, counters.step, counters.tokens,
                             counters.skipped, self.evals.evals,
                             (counters.tokens - tokens_at_start) / elapsed if elapsed > 0 else 0.0,
                             unwrap(self.model))
        self._call("on_train_end", result)
        return result

    def train_step(self, batches: list, data_wait: float = 0.0) -> StepResult:
        """One optimizer step on this rank's micro-batches (``data_wait``: seconds spent
        drawing them, for the throughput figures): forward/backward of each, the loss the sum
        over every label of the step on every rank divided by their count; clip; then the
        optimizer step, or a skip when no label counts or the loss or gradient is non-finite
        (the weights and AdamW's moments stay the last good ones)."""
        config, context, counters, device = self.config, self.context, self.counters, self.device
        start = time.perf_counter()
        lr = self.schedule.apply(counters.step)
        # Host sync: the step's label count over all ranks divides the loss before backward.
        label_count = context.sum(sum(int((b.labels != -100).sum()) for b in batches), device,
                                  f"step {counters.step + 1}'s label count")
        self.model.train()
        loss = torch.zeros((), device=device)
        for index, batch in enumerate(batches):
            last = index == len(batches) - 1
            with _gradient_sync(self.model, config.train.parallel, context, last), \
                    context.guard(f"step {counters.step + 1}'s gradient reduction"), \
                    autocast(config.train.precision, device):
                extra = ({"token_loss_weights": self.loss_weights[batch.sources.long()][:, None]
                          .expand_as(batch.labels)} if self.weighted else {})
                out = self.model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                                 labels=batch.labels, shift_labels=batch.labels,
                                 num_items_in_batch=max(label_count, 1), **extra,
                                 cu_seq_lens_q=batch.cu_seqlens, cu_seq_lens_k=batch.cu_seqlens,
                                 max_length_q=batch.max_seqlen, max_length_k=batch.max_seqlen)
                # Data-parallel reduction averages over ranks; the loss is already global.
                (out.loss * context.world_size).backward()
            loss += out.loss.detach().float()
        clip = config.optim.grad_clip if config.optim.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        # Host sync: whether the step is applied depends on the loss and the norm being finite.
        loss_value = context.sum(float(loss), device, f"step {counters.step + 1}'s loss")
        grad_norm_value = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor")
                                else grad_norm)
        finite = math.isfinite(loss_value) and math.isfinite(grad_norm_value)
        counted = label_count > 0  # else every label of the step is -100: nothing to learn
        if finite and counted:
            if self.decay_to_base is not None:
                self.decay_to_base.apply()
            if self.new_rows is not None and self.new_rows.applies(counters.step):
                self.new_rows.step(self.optimizer)
            else:
                self.optimizer.step()
            if self.ema is not None:
                self.ema.update()
            counters.nonfinite_in_a_row = 0
        else:
            counters.skipped += 1
            counters.nonfinite_in_a_row += not finite
        if not counted:
            loss_value = grad_norm_value = None  # not measured (0.0 would look like one)
        self.optimizer.zero_grad(set_to_none=True)
        step_tokens = self.stream.tokens_per_step()
        counters.step += 1
        counters.tokens += step_tokens
        seconds = data_wait + time.perf_counter() - start
        tokens_per_s = step_tokens / seconds
        return StepResult(
            step=counters.step, loss=loss_value, lr=lr, grad_norm=grad_norm_value,
            tokens=counters.tokens, tokens_per_s=tokens_per_s,
            mfu=self.flops_per_token * tokens_per_s / (self.peak * context.world_size)
            if self.peak else None,
            data_wait_frac=data_wait / seconds, skipped_steps=counters.skipped,
            memory_bytes=peak_memory(device), applied=finite and counted, finite=finite)

    def _check_health(self, result: StepResult) -> None:
        """Stop on too many non-finite steps in a row (saving the last good weights) and warn
        about, or stop on, a run whose loss and gradient no longer change."""
        config, step = self.config, result.step
        if self.counters.nonfinite_in_a_row >= config.train.max_nonfinite_steps:
            path = self.save(export=True)
            raise NonFiniteLossError(
                f"{self.counters.nonfinite_in_a_row} non-finite losses in a row (last at step "
                f"{step}); the last good weights are saved in {path}. Lower optim.lr, check "
                "the data, or use train.precision = \"fp32\" to find the cause")
        if self.stall.update(result.loss if result.finite else None, result.grad_norm):
            message = (f"loss and grad_norm have not changed for {self.stall.steps} steps (loss "
                       f"{result.loss:.6g}, grad_norm {result.grad_norm:.6g} at step {step}): "
                       "the model is not learning; check optim.lr, the data's labels and the "
                       "model")
            if config.train.on_stall == "stop":
                raise StalledError(f"{message}. Checkpoint {self.save()} (train.on_stall = "
                                   "\"warn\" only warns)")
            if self.context.main:
                print(f"cptfast train: warning: {message} (train.on_stall = \"stop\" stops "
                      "the run, train.stall_steps = 0 turns this off)", file=sys.stderr)

    def _stop_check(self, step: int) -> bool:
        """A signal on any rank: every rank raises `TrainingStopped` after this same step,
        with a checkpoint. A callback's ``should_stop`` on any rank: True on every rank."""
        # Host sync (one all-reduce): the signal number times 2, plus 1 for a stop request.
        code = int(self.context.max((self.stop.signum or 0) * 2 + self.should_stop,
                                    self.device, f"step {step}'s stop check"))
        signum = code // 2
        if signum and step < self.config.train.steps:
            path = self.save() if self.saved_step != step else checkpoint.latest(self.run_dir)
            raise TrainingStopped(f"stopped by {signal.Signals(signum).name} at step {step}; "
                                  f"checkpoint {path}; rerun the same command to resume", signum)
        return bool(code % 2)

    def evaluate(self) -> None:
        """The held-out losses at this step (every rank runs the same batches: FSDP2 needs all
        of them anyway)."""
        if self.eval_sets:
            losses = {name: eval_loss(self.model, batches, self.config.train.precision)
                      for name, batches in self.eval_sets.items()}
            self.evals.add(self.counters.step, losses)
            self._call("on_eval", self.counters.step, losses)

    def save(self, export: bool | None = None) -> Path:
        """Checkpoint this step (a collective); ``export``: with the Hugging Face export
        (default: checkpoint.export). Non-finite weights are never saved."""
        step = self.counters.step
        bad = _non_finite_parameter(self.model, self.context)
        if bad is not None:  # never saved, so never resumed from nor called good
            raise NonFiniteLossError(
                f"the weights became non-finite by step {step} ({bad} holds NaN or Inf), "
                f"so no checkpoint was saved; the newest good one is "
                f"{checkpoint.latest(self.run_dir) or 'none'}. Lower optim.lr or check the data")
        export = self.config.checkpoint.export if export is None else export
        path = checkpoint.save(self.run_dir, step, self.states, self.context,
                               keep=self.config.checkpoint.keep,
                               export=self._export if export else None)
        self.saved_step = step
        self._call("on_checkpoint", step, path)
        return path

    def _export(self, directory: Path) -> None:
        model = unwrap(self.model)
        checkpoint.export_hf(model, directory, self.tokenizer, self.context)
        if self.ema is not None:  # the averaged weights, as their own Hugging Face directory
            checkpoint.export_hf(model, directory / "ema", self.tokenizer, self.context,
                                 weights=self.ema.weights)

    def _call(self, hook: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def close(self) -> None:
        """Close the metrics writers (also after an error)."""
        for callback in self.callbacks:
            close = getattr(callback, "close", None)
            if close is not None:
                close()


class _StopSignals:
    """SIGTERM (what Slurm and Kubernetes send before preempting) and SIGINT ask the run to
    stop at the end of the step: ``signum`` is the signal received (None: none yet). A second
    one stops the process at once: the first restores the default action. Handlers can only
    be installed from the main thread; elsewhere there are none."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __enter__(self) -> _StopSignals:
        self.signum, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._received) for s in self.SIGNALS}
        return self

    def _received(self, signum, frame) -> None:
        self.signum = signum
        for s in self.SIGNALS:
            signal.signal(s, signal.SIG_DFL)
        os.write(2, f"cptfast train: {signal.Signals(signum).name} received: stopping at the "
                    "end of this step with a checkpoint (send it again to stop at once)\n"
                 .encode())  # os.write: print could be interrupted in the middle of a print

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def _non_finite_parameter(model, context: Context) -> str | None:
    """The name of the first parameter holding NaN or Inf (FSDP2: in any rank's shard), the
    same on every rank; None when all are finite."""
    from torch.distributed.tensor import DTensor

    found = None
    for name, parameter in unwrap(model).named_parameters():
        local = parameter.to_local() if isinstance(parameter, DTensor) else parameter
        if not bool(torch.isfinite(local).all()):
            found = name
            break
    return next((name for name in context.gather(found, "the finite-weights check") if name),
                None)


def _gradient_sync(model, parallel: str, context: Context, last_micro_batch: bool):
    """Reduce gradients across ranks only after the step's last micro-batch."""
    if not context.distributed or last_micro_batch:
        return contextlib.nullcontext()
    if parallel == "ddp":
        return model.no_sync()
    return _fsdp_no_sync(model)


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _resume_point(config: Config, run_dir: Path) -> Path | None:
    choice = config.checkpoint.resume
    if choice == "none":
        return None
    if choice == "auto":
        return checkpoint.latest(run_dir)
    path = Path(choice)
    if not (path / checkpoint.MARKER).is_file():
        raise FileNotFoundError(f"checkpoint.resume = {choice!r} is not a complete checkpoint")
    return path


def _load_model(path: Path, config: Config, device: torch.device, *, on_meta: bool = False):
    """The model accelerated, on ``device``, or without weights (meta device) for the ranks
    that receive theirs from rank 0 when sharding; and the tokenizer, if ``path`` has one."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json; model.path must be a local Hugging "
                                "Face model directory")
    model_config = AutoConfig.from_pretrained(path)
    recipes.apply_rope_settings(model_config, rope_theta=config.model.rope_theta,
                                rope_scaling=config.model.rope_scaling,
                                max_position_embeddings=config.model.max_position_embeddings)
    dtype = torch.bfloat16 if config.train.precision == "bf16-pure" else torch.float32
    if on_meta:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config, dtype=dtype,
                                                     attn_implementation="sdpa")
    else:
        model = AutoModelForCausalLM.from_pretrained(path, config=model_config, dtype=dtype,
                                                     attn_implementation="sdpa")
        model.to(device)
    attention = config.model.attention
    if config.model.expand_layers:  # before accelerating: the new layers get its hooks too
        expand_layers(model, config.model.expand_layers["every"])
    hf.accelerate(model, attention=attention if attention != "off" else False,
                  loss=config.model.loss, rope=config.model.rope)
    if config.model.activation_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x
        (enable or model.gradient_checkpointing_enable)()
    tokenizer = None
    if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def _shard_tokenizer(config: Config):
    from transformers import AutoTokenizer

    for source in config.data.sources.values():
        if isinstance(source.path, str) and (Path(source.path) / "tokenizer").is_dir():
            return AutoTokenizer.from_pretrained(Path(source.path) / "tokenizer")  # prepare's copy
    return None


def _embedding_rows(model) -> int:
    return unwrap(model).get_input_embeddings().weight.shape[0]
