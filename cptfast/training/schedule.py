"""Learning-rate schedules for continued pretraining, as pure functions of the step.

Continued pretraining starts from a model whose optimizer state is gone, so every schedule
re-warms linearly from 0 to the peak over ``warmup_steps`` (Gupta et al. 2023, Ibrahim et al.
2024). Then:
- ``cosine`` / ``linear``: decay to ``min_lr_ratio * lr`` at the last step;
- ``wsd`` (warmup-stable-decay): flat at the peak, then over the final ``decay_fraction`` of
  the steps decay to the floor with shape ``linear``, ``cosine`` or ``1-sqrt`` (Hägele et al.
  2024);
- ``constant`` ("infinite"): flat after warmup; cool down later in a separate run (e.g. a
  ``wsd`` run with ``decay_fraction = 1`` and no warmup, resumed from the constant one).
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "wsd", "constant")
DECAY_SHAPES = ("linear", "cosine", "1-sqrt")


def lr_at(step: int, *, lr: float, steps: int, kind: str = "cosine", warmup_steps: int = 0,
          min_lr_ratio: float = 0.0, decay_fraction: float = 0.2,
          decay_shape: str = "1-sqrt") -> float:
    """The learning rate of optimizer step ``step`` (0-based) of a ``steps``-step run."""
    if not 0 <= step < steps:
        raise ValueError(f"step {step} is outside the run's {steps} steps")
    floor = lr * min_lr_ratio
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if kind == "constant":
        return lr
    if kind == "wsd":
        decay_steps = max(1, round(decay_fraction * steps))
        decay_start = max(warmup_steps, steps - decay_steps)
        if step < decay_start:
            return lr
        progress = _progress(step, decay_start, steps)
        return floor + (lr - floor) * _remaining(progress, decay_shape)
    progress = _progress(step, warmup_steps, steps)
    if kind == "cosine":
        return floor + (lr - floor) * _remaining(progress, "cosine")
    if kind == "linear":
        return floor + (lr - floor) * _remaining(progress, "linear")
    raise ValueError(f"unknown schedule kind {kind!r}")


def _progress(step: int, start: int, steps: int) -> float:
    """0 at ``start``, 1 at the last step."""
    last = steps - 1
    return 1.0 if last <= start else (step - start) / (last - start)


def _remaining(progress: float, shape: str) -> float:
    """Fraction of the way from the floor to the peak still left: 1 -> 0."""
    if shape == "linear":
        return 1.0 - progress
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if shape == "1-sqrt":
        return 1.0 - math.sqrt(progress)
    raise ValueError(f"unknown decay shape {shape!r}")
