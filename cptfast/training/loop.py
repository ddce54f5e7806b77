"""`cptfast.train(config)`: continued pretraining of a Hugging Face causal LM on token shards.

One function, top to bottom: load the base model, accelerate and wrap it, build the packed
loader, restore the newest checkpoint of the run if there is one, then for each
optimizer step: gather the micro-batches of the step, run forward/backward with the loss
normalised by the step's label count, clip, step (or skip a non-finite step), log, evaluate the
held-out sets, checkpoint. Resuming restores weights, optimizer, schedule position, data
position and RNG states, so a resumed run continues bit for bit (on the CPU with deterministic
settings), on any number of ranks: under torchrun each rank takes its share of one global
data stream, gradients are reduced by DDP or FSDP2, and rank 0 writes the files.

What is saved is good: the base model and every checkpoint are checked finite; a step without
a counted label or with a non-finite loss changes nothing. SIGTERM (preemption) or SIGINT stops
every rank after the same step, with a checkpoint; a second signal stops at once.
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
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cptfast import hf
from cptfast.data.loader import PackedLoader
from cptfast.errors import (ConfigError, DiskFullError, NonFiniteLossError,
                            NonFiniteWeightsError, StalledError, TrainingStopped)
from cptfast.training import checkpoint, recipes
from cptfast.training.config import Config, to_dict
from cptfast.training.distributed import Context, unwrap, wrap
from cptfast.training.evaluation import autocast, eval_loss, held_out_batches
from cptfast.training.metrics import (MetricsLog, model_flops_per_token, peak_flops,
                                      peak_memory)
from cptfast.training.schedule import lr_at


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


def train(config: Config) -> TrainResult:
    """Run (or resume) the training described by ``config``; returns a summary. Under
    torchrun every rank calls it; rank 0 writes the files. SIGTERM or SIGINT ends it with
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
            return _train(config, context, device, stop, cleanup)
    except OSError as error:  # a full disk outside metrics and checkpoints (e.g. the plan)
        full = DiskFullError.caused(error, f"{error.filename or config.train.output}: no "
                                           "space left on device")
        if full is None:
            raise
        raise full from error
    finally:
        context.stop()


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


def _train(config: Config, context: Context, device: torch.device, stop: _StopSignals,
           cleanup: contextlib.ExitStack) -> TrainResult:
    run_dir = Path(config.train.output)
    if config.train.deterministic:
        torch.use_deterministic_algorithms(True)
    resume_from = _resume_point(config, run_dir)
    state = checkpoint.load_state(resume_from) if resume_from else None
    resume_step = state["step"] if state else 0
    torch.manual_seed(config.train.seed)

    # --- model, tokenizer, optimizer -----------------------------------------------------------
    parallel = config.train.parallel
    sharded = context.distributed and parallel == "fsdp2"  # rank 0's weights placed by wrap()
    model, tokenizer = _load_model(Path(config.model.path), config,
                                   torch.device("cpu") if sharded else device,
                                   on_meta=sharded and not context.main)
    if tokenizer is None:  # checkpoints carry a tokenizer: the one the shards were made with
        tokenizer = _shard_tokenizer(config)
    flops_per_token = model_flops_per_token(model, config.data.seq_len)
    model = wrap(model, parallel, config.train.precision, context, device,
                 cpu_offload=config.train.cpu_offload)
    bad = _non_finite_parameter(model, context)
    if bad is not None:
        raise NonFiniteWeightsError(
            f"{config.model.path}: the base model's parameter {bad} holds NaN or Inf values; "
            "training cannot start from it. Load a model whose weights are finite (a "
            "checkpoint saved before a run diverged?)")
    new_rows = _new_rows(unwrap(model), config, context)
    optimizer = torch.optim.AdamW(
        _parameter_groups(model, config.optim.weight_decay), lr=config.optim.lr,
        betas=(config.optim.beta1, config.optim.beta2), eps=config.optim.eps,
        fused=device.type == "cuda" and not config.train.cpu_offload)

    # --- data: this rank's share of one global stream ------------------------------------------
    def stage_loader(at_step: int):
        """The loader of the sequence-length stage of ``at_step`` (each stage one stream,
        seeded by its index), its tokens per micro-batch and micro-batches per step."""
        index, seq_len, batch_size = recipes.stage_at(config, at_step)
        loader = PackedLoader({name: s.spec() for name, s in config.data.sources.items()},
                              seq_len, batch_size, weights=recipes.weights_at(config, at_step),
                              packing=config.data.packing, seed=config.data.seed + index,
                              rank=context.rank, world_size=context.world_size, device=device,
                              vocab_size=_embedding_rows(model))
        return (loader, seq_len * batch_size,
                _accumulation(config.optim.global_batch_tokens, seq_len, batch_size,
                              context.world_size))

    loss_weights = torch.tensor([s.loss_weight for s in config.data.sources.values()],
                                device=device)
    weighted = bool((loss_weights != 1).any())

    # A checkpoint holds the position after its last step, in that step's stage.
    loader, tokens_per_micro_batch, accumulation = stage_loader(max(resume_step - 1, 0))
    if context.main:  # the replay plan: tokens and epochs of each source over the whole run
        plan = recipes.mixture_plan(config, loader.source_tokens(),
                                    tokens_per_micro_batch * accumulation * context.world_size)
        (run_dir / "mixture_plan.json").write_text(json.dumps(plan, indent=1) + "\n")
    eval_sets = {name: held_out_batches(source.spec(), config.data.seq_len,
                                        config.data.batch_size, config.eval.batches, device,
                                        embedding_rows=_embedding_rows(model), name=name)
                 for name, source in config.data.eval.items()}

    # --- resume --------------------------------------------------------------------------------
    step, tokens_seen, skipped, nonfinite_in_a_row = 0, 0, 0, 0
    evals: list[dict] = []
    ema = _ema_start(model, config)
    if resume_from is not None:
        checkpoint.load(resume_from, state, model, optimizer, context, ema=ema)
        loader.load_state_dict(state["loader"])
        step, tokens_seen, skipped = state["step"], state["tokens"], state["skipped_steps"]
        evals = state["evals"]
    log = cleanup.enter_context(MetricsLog(
        run_dir, keep_through=step if resume_from is not None else -1, enabled=context.main,
        progress=config.logging.progress, tensorboard=config.logging.tensorboard,
        total_steps=config.train.steps))
    peak = peak_flops(device)
    stall = _StallWatch(config.train.stall_steps)

    def save(at_step: int, export: bool = config.checkpoint.export) -> Path:
        bad = _non_finite_parameter(model, context)
        if bad is not None:  # never saved, so never resumed from nor called good
            raise NonFiniteLossError(
                f"the weights became non-finite by step {at_step} ({bad} holds NaN or Inf), "
                f"so no checkpoint was saved; the newest good one is "
                f"{checkpoint.latest(run_dir) or 'none'}. Lower optim.lr or check the data")
        meta = {"step": at_step, "tokens": tokens_seen, "skipped_steps": skipped,
                "loader": loader.state_dict(), "evals": evals, "config": to_dict(config)}
        return checkpoint.save(run_dir, at_step, model, optimizer, tokenizer, meta, context,
                               keep=config.checkpoint.keep, export=export, ema=ema)

    def evaluate(at_step: int) -> None:
        if eval_sets:  # every rank runs the same batches (FSDP2 needs all of them anyway)
            losses = {name: eval_loss(model, batches, config.train.precision)
                      for name, batches in eval_sets.items()}
            evals.append({"step": at_step, **losses})
            log.eval(at_step, losses)

    if step == 0:
        evaluate(0)  # "before": the forgetting monitor's baseline
    saved_step = step if resume_from is not None else None
    started, tokens_at_start = time.perf_counter(), tokens_seen

    # --- the loop ------------------------------------------------------------------------------
    while step < config.train.steps:
        step_start = time.perf_counter()
        phase = recipes.phase_starting_at(config, step)
        if recipes.stage_starts_at(config, step):  # new rows of T tokens (with this phase)
            loader, tokens_per_micro_batch, accumulation = stage_loader(step)
        elif phase is not None:  # a new mixture from this global row on
            loader.set_weights(phase)
        batches = [next(loader) for _ in range(accumulation)]
        data_wait = time.perf_counter() - step_start
        # The loss is the sum over every label of the step on every rank, divided by their
        # count; data-parallel gradient reduction averages over ranks: hence the world size.
        label_count = context.sum(sum(int((b.labels != -100).sum()) for b in batches), device,
                                  f"step {step + 1}'s label count")
        lr = lr_at(step, lr=config.optim.lr, steps=config.train.steps,
                   kind=config.schedule.kind, warmup_steps=config.schedule.warmup_steps,
                   min_lr_ratio=config.optim.min_lr_ratio,
                   decay_fraction=config.schedule.decay_fraction,
                   decay_shape=config.schedule.decay_shape)
        for group in optimizer.param_groups:
            group["lr"] = lr

        model.train()
        loss = torch.zeros((), device=device)
        for index, batch in enumerate(batches):
            last = index == len(batches) - 1
            with _gradient_sync(model, parallel, context, last), \
                    context.guard(f"step {step + 1}'s gradient reduction"), \
                    autocast(config.train.precision, device):
                extra = ({"token_loss_weights": loss_weights[batch.sources.long()][:, None]
                          .expand_as(batch.labels)} if weighted else {})
                out = model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                            labels=batch.labels, shift_labels=batch.labels,
                            num_items_in_batch=max(label_count, 1), **extra,
                            cu_seq_lens_q=batch.cu_seqlens, cu_seq_lens_k=batch.cu_seqlens,
                            max_length_q=batch.max_seqlen, max_length_k=batch.max_seqlen)
                (out.loss * context.world_size).backward()
            loss += out.loss.detach().float()
        clip = config.optim.grad_clip if config.optim.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        loss_value = context.sum(float(loss), device, f"step {step + 1}'s loss")
        grad_norm_value = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor")
                                else grad_norm)
        finite = math.isfinite(loss_value) and math.isfinite(grad_norm_value)
        counted = label_count > 0  # else every label of the step is -100: nothing to learn
        if finite and counted:
            if new_rows is not None and step < config.model.new_rows_warmup_steps:
                _step_new_rows_only(model, optimizer, *new_rows)
            else:
                optimizer.step()
            if ema is not None:
                _ema_update(ema, model, config.train.ema_decay)
            nonfinite_in_a_row = 0
        else:  # skip: the weights and AdamW's moments stay the last good ones
            skipped += 1
            nonfinite_in_a_row += not finite
        if not counted:
            loss_value = grad_norm_value = None  # not measured (0.0 would look like one)
        optimizer.zero_grad(set_to_none=True)
        step += 1
        step_tokens = tokens_per_micro_batch * accumulation * context.world_size
        tokens_seen += step_tokens

        seconds = time.perf_counter() - step_start
        tokens_per_s = step_tokens / seconds
        log.step(step, {"loss": loss_value, "lr": lr, "grad_norm": grad_norm_value,
                        "tokens": tokens_seen, "tokens_per_s": tokens_per_s,
                        "mfu": flops_per_token * tokens_per_s / (peak * context.world_size)
                        if peak else None,
                        "data_wait_frac": data_wait / seconds, "skipped_steps": skipped,
                        "memory_bytes": peak_memory(device)},
                 write=step % config.logging.every == 0 or not (finite and counted))
        if nonfinite_in_a_row >= config.train.max_nonfinite_steps:
            path = save(step, export=True)
            raise NonFiniteLossError(
                f"{nonfinite_in_a_row} non-finite losses in a row (last at step {step}); the "
                f"last good weights are saved in {path}. Lower optim.lr, check the data, or "
                "use train.precision = \"fp32\" to find the cause")
        if stall.update(loss_value if finite else None, grad_norm_value):
            message = (f"loss and grad_norm have not changed for {stall.steps} steps (loss "
                       f"{loss_value:.6g}, grad_norm {grad_norm_value:.6g} at step {step}): the "
                       "model is not learning; check optim.lr, the data's labels and the model")
            if config.train.on_stall == "stop":
                raise StalledError(f"{message}. Checkpoint {save(step)} (train.on_stall = "
                                   "\"warn\" only warns)")
            if context.main:
                print(f"cptfast train: warning: {message} (train.on_stall = \"stop\" stops the "
                      "run, train.stall_steps = 0 turns this off)", file=sys.stderr)
        # The last step's evaluation comes before its checkpoint, which then holds it.
        if (config.eval.every and step % config.eval.every == 0) or step == config.train.steps:
            evaluate(step)
        if config.checkpoint.every and step % config.checkpoint.every == 0:
            save(step, export=config.checkpoint.export or step == config.train.steps)
            saved_step = step
        # A signal on any rank: every rank stops after this same step.
        signum = int(context.max(stop.signum or 0, device, f"step {step}'s stop check"))
        if signum and step < config.train.steps:
            path = save(step) if saved_step != step else checkpoint.latest(run_dir)
            raise TrainingStopped(f"stopped by {signal.Signals(signum).name} at step {step}; "
                                  f"checkpoint {path}; rerun the same command to resume", signum)

    # --- the end -------------------------------------------------------------------------------
    elapsed = time.perf_counter() - started  # the loop alone: training throughput
    if not evals or evals[-1]["step"] != step:
        evaluate(step)
    final = checkpoint.checkpoint_root(run_dir) / f"step-{step:08d}"
    if saved_step != step:
        final = save(step, export=True)
    return TrainResult(run_dir, final, step, tokens_seen, skipped, evals,
                       (tokens_seen - tokens_at_start) / elapsed if elapsed > 0 else 0.0,
                       unwrap(model))


def _new_rows(model, config: Config, context: Context):
    """(old vocabulary size, embedding tables) when the run starts by training only the rows
    `cptfast expand-vocab` added; else None."""
    if config.model.new_rows_warmup_steps == 0:
        return None
    old_size = getattr(model.config, "cptfast_vocab_expanded_from", None)
    if old_size is None:
        raise ConfigError("model.new_rows_warmup_steps needs a model written by `cptfast "
                          "expand-vocab` (its config records the old vocabulary size)")
    if context.distributed and config.train.parallel == "fsdp2":
        raise ConfigError("model.new_rows_warmup_steps works with ddp, not fsdp2")
    tables = [model.get_input_embeddings().weight]
    if model.get_output_embeddings().weight is not tables[0]:
        tables.append(model.get_output_embeddings().weight)
    return old_size, tables


def _step_new_rows_only(model, optimizer, old_size: int, tables: list) -> None:
    """An optimizer step that moves only the new embedding rows: other parameters get no
    gradient (AdamW skips them), old rows get a zero one and are restored after the step
    (undoing weight decay)."""
    table_ids = {id(t) for t in tables}
    for parameter in model.parameters():
        if id(parameter) not in table_ids:
            parameter.grad = None
    saved = []
    for table in tables:
        if table.grad is not None:
            table.grad[:old_size] = 0
        saved.append(table.detach()[:old_size].clone())
    optimizer.step()
    with torch.no_grad():
        for table, rows in zip(tables, saved):
            table[:old_size] = rows


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


class _StallWatch:
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


def _ema_start(model, config: Config) -> dict | None:
    """{parameter name: fp32 copy} when train.ema_decay is set (else None)."""
    if not config.train.ema_decay:
        return None
    return {name: p.detach().float().clone()
            for name, p in unwrap(model).named_parameters()}


@torch.no_grad()
def _ema_update(ema: dict, model, decay: float) -> None:
    for name, p in unwrap(model).named_parameters():
        ema[name].lerp_(p.detach().float(), 1.0 - decay)


def _accumulation(global_batch_tokens: int, seq_len: int, batch_size: int,
                  world_size: int) -> int:
    """Micro-batches per rank per step, so that a step is global_batch_tokens on any number
    of ranks (and in any sequence-length stage)."""
    per_step = seq_len * batch_size * world_size
    if global_batch_tokens == 0:
        return 1
    if global_batch_tokens % per_step:
        raise ConfigError(
            f"optim.global_batch_tokens = {global_batch_tokens} is not a multiple of seq_len x "
            f"batch_size x ranks = {seq_len} x {batch_size} x {world_size} = {per_step}")
    return global_batch_tokens // per_step


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
    hf.accelerate(model, attention=config.model.attention, loss=config.model.loss,
                  rope=config.model.rope)
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


def _parameter_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on norms, biases or other 1-D parameters."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _embedding_rows(model) -> int:
    return unwrap(model).get_input_embeddings().weight.shape[0]
