"""The trainer's hooks: ``cptfast.train(config, callbacks=[MyCallback()])``.

Subclass `Callback` and override what you need; every hook gets the `Trainer` first (its
``config``, ``model``, ``counters``, ``context`` — ``context.main`` is rank 0 — and so on).
Hooks run on every rank, in the order given, after cptfast's own metrics writers:

- ``on_train_start(trainer)``: after the model is built and any checkpoint restored;
- ``on_step_end(trainer, result)``: after each optimizer step (a `StepResult`: step, loss, lr,
  grad_norm, tokens, tokens_per_s, ..., and ``applied``, False for a skipped step);
- ``on_eval(trainer, step, losses)``: after each held-out evaluation ({set name: mean loss});
- ``on_checkpoint(trainer, step, path)``: after checkpoint ``path`` is complete on disk;
- ``on_train_end(trainer, result)``: once, with the `TrainResult`, when the run finishes.

Setting ``trainer.should_stop = True`` in any hook (on any rank) ends the run cleanly after the
current step: every rank stops at the same step, a checkpoint is saved, and `train` returns.
"""

from __future__ import annotations


class Callback:
    def on_train_start(self, trainer) -> None:
        pass

    def on_step_end(self, trainer, result) -> None:
        pass

    def on_eval(self, trainer, step: int, losses: dict[str, float]) -> None:
        pass

    def on_checkpoint(self, trainer, step: int, path) -> None:
        pass

    def on_train_end(self, trainer, result) -> None:
        pass
