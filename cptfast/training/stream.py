"""The training data of each optimizer step: this rank's share of one global packed stream, in
the mixture phase and sequence-length stage the step falls in (`recipes`)."""

from __future__ import annotations

import torch

from cptfast.data.loader import PackedLoader
from cptfast.errors import ConfigError
from cptfast.training import recipes
from cptfast.training.config import Config


class DataStream:
    """``batches(step)``: the micro-batches of optimizer step ``step`` (0-based). Each
    sequence-length stage is its own stream (seeded by the stage's index); a phase changes the
    mixture from its first step on. Its state is the position after the last step drawn."""

    def __init__(self, config: Config, context, device: torch.device, vocab_size: int):
        self.config, self.context, self.device, self.vocab_size = (config, context, device,
                                                                   vocab_size)
        self.loader: PackedLoader | None = None
        self.stage = self.last_step = -1  # none opened, none drawn

    def batches(self, step: int) -> list:
        stage = recipes.stage_at(self.config, step)[0]
        phase = recipes.phase_starting_at(self.config, step)
        if stage != self.stage:  # new rows of T tokens, in this step's mixture
            self._open(stage, step)
        elif phase is not None:  # a new mixture from this global row on
            self.loader.set_weights(phase)
        self.last_step = step
        return [next(self.loader) for _ in range(self.accumulation)]

    def _open(self, stage: int, step: int) -> None:
        _, seq_len, batch_size = recipes.stage_at(self.config, step)
        data = self.config.data
        self.loader = PackedLoader(
            {name: s.spec() for name, s in data.sources.items()}, seq_len, batch_size,
            weights=recipes.weights_at(self.config, step), packing=data.packing,
            seed=data.seed + stage, rank=self.context.rank, world_size=self.context.world_size,
            device=self.device, vocab_size=self.vocab_size, num_threads=data.num_threads,
            prefetch=data.prefetch, window=data.window)
        self.stage = stage
        self.tokens_per_micro_batch = seq_len * batch_size
        self.accumulation = accumulation(self.config.optim.global_batch_tokens, seq_len,
                                         batch_size, self.context.world_size)

    def tokens_per_step(self) -> int:
        """Tokens of an optimizer step over all ranks, in the current stage (the first if
        none is open yet)."""
        if self.loader is None:
            self._open(0, 0)
        return self.tokens_per_micro_batch * self.accumulation * self.context.world_size

    def source_tokens(self) -> dict[str, int]:
        if self.loader is None:
            self._open(0, 0)
        return self.loader.source_tokens()

    def state_dict(self) -> dict:
        return {"stage": self.stage, "last_step": self.last_step,
                "loader": self.loader.state_dict() if self.loader is not None else None}

    def load_state_dict(self, state: dict) -> None:
        # A checkpoint holds the position after its last step, in that step's stage and mixture.
        self.last_step = state["last_step"]
        if state["loader"] is None:
            self.loader, self.stage = None, -1
            return
        self._open(state["stage"], max(self.last_step, 0))
        self.loader.load_state_dict(state["loader"])


def accumulation(global_batch_tokens: int, seq_len: int, batch_size: int,
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
