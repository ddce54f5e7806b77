"""One public function per operation; each checks its inputs and picks an implementation:
the Triton kernel (cptfast.kernels) for CUDA tensors, the pure-PyTorch reference
(cptfast.reference) for CPU tensors. ``CPTFAST_BACKEND=triton|torch`` forces a choice (the
tests run the Triton kernels on the CPU through the interpreter this way).
"""

from __future__ import annotations

import os

import torch

from cptfast import reference

BACKENDS = ("triton", "torch")


def backend_for(tensor: torch.Tensor) -> str:
    """The implementation an operation on ``tensor`` uses."""
    forced = os.environ.get("CPTFAST_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"CPTFAST_BACKEND must be one of {BACKENDS}, got {forced!r}")
        return forced
    return "triton" if tensor.is_cuda else "torch"


def _check_loss_options(label_smoothing: float, z_loss: float, softcap: float | None,
                        reduction: str) -> None:
    if reduction not in reference.REDUCTIONS:
        raise ValueError(f"reduction must be one of {reference.REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
    if z_loss < 0:
        raise ValueError(f"z_loss must be non-negative, got {z_loss}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive (or None), got {softcap}")


def _check_labels(labels: torch.Tensor, rows: int, vocab: int, ignore_index: int) -> None:
    """Labels are integers, one per row, each in [0, vocab) or ignore_index.

    On the CPU the range check is exact and raises ValueError. On a GPU, and under
    torch.compile, it is an asynchronous assertion instead (no host synchronisation, no graph
    break): a bad label fails loudly when the assertion runs.
    """
    if labels.dim() != 1 or labels.shape[0] != rows:
        raise ValueError(f"labels must have shape [{rows}] (one per row, already aligned with "
                         f"the rows: no shift inside), got {list(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if labels.is_cuda or torch.compiler.is_compiling():
        torch._assert_async(~bad.any(), "cptfast: a label is outside [0, vocab) and is not "
                                        "ignore_index")
    elif bad.any():
        first = int(bad.nonzero()[0, 0])
        raise ValueError(f"label {int(labels[first])} at row {first} is outside [0, {vocab}) "
                         f"and is not ignore_index ({ignore_index}); check the tokenizer / "
                         "vocabulary size or mark the row with ignore_index")


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                  label_smoothing: float = 0.0, z_loss: float = 0.0,
                  softcap: float | None = None, reduction: str = "mean",
                  return_lse: bool = False):
    """Cross-entropy of ``logits`` [N, V] (fp32/bf16/fp16; math in fp32) against ``labels``
    [N] (int, aligned with the rows; ``ignore_index`` rows count as 0).

    ``softcap`` applies c·tanh(x/c) first; ``label_smoothing`` as in
    ``torch.nn.functional.cross_entropy``; ``z_loss`` adds z_loss·lse² per counted row.
    ``reduction``: "mean" over counted rows (0 with zero gradients when none are counted),
    "sum", or "none" (per row, 0 where ignored). With ``return_lse`` also returns the fp32
    log-sum-exp of every row. Returns an fp32 loss.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got shape {list(logits.shape)}")
    _check_loss_options(label_smoothing, z_loss, softcap, reduction)
    _check_labels(labels, logits.shape[0], logits.shape[1], ignore_index)
    options = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
                   softcap=softcap, reduction=reduction, return_lse=return_lse)
    if backend_for(logits) == "triton":
        from cptfast.kernels.cross_entropy import cross_entropy as triton_cross_entropy
        return triton_cross_entropy(logits, labels, **options)
    return reference.cross_entropy(logits, labels, **options)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                               labels: torch.Tensor, *, bias: torch.Tensor | None = None,
                               ignore_index: int = -100, label_smoothing: float = 0.0,
                               z_loss: float = 0.0, softcap: float | None = None,
                               reduction: str = "mean", return_lse: bool = False):
    """Cross-entropy of ``hidden`` [N, H] @ ``weight`` [V, H].T (+ ``bias`` [V]) against
    ``labels`` [N] without materialising the [N, V] logits; semantics as
    :func:`cross_entropy`. ``weight`` may be tied to the input embedding."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"need hidden [N, H] and weight [V, H], got {list(hidden.shape)} and "
                         f"{list(weight.shape)}")
    if bias is not None and list(bias.shape) != [weight.shape[0]]:
        raise ValueError(f"bias must have shape [{weight.shape[0]}], got {list(bias.shape)}")
    _check_loss_options(label_smoothing, z_loss, softcap, reduction)
    _check_labels(labels, hidden.shape[0], weight.shape[0], ignore_index)
    options = dict(bias=bias, ignore_index=ignore_index, label_smoothing=label_smoothing,
                   z_loss=z_loss, softcap=softcap, reduction=reduction, return_lse=return_lse)
    if backend_for(hidden) == "triton":
        from cptfast.kernels.fused_linear_cross_entropy import \
            fused_linear_cross_entropy as triton_fused
        return triton_fused(hidden, weight, labels, **options)
    return reference.fused_linear_cross_entropy(hidden, weight, labels, **options)
