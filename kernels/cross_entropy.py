"""Cross-entropy over [N, V] logits in one Triton program per row.

Math (fp32 whatever the logits' dtype), for a counted row with logits x and label y:
    z = c * tanh(x / c) with softcap c (else z = x);   lse = log sum_j exp(z_j)
    loss = (1 - eps) * (lse - z_y) + eps * (lse - mean_j z_j) + z_loss * lse^2
    dloss/dx_j = (softmax(z)_j * (1 + 2 z_loss lse) - (1 - eps) [j == y] - eps / V) * dz_j/dx_j
with dz/dx = 1 - (z / c)^2. The program streams the row twice in blocks of BLOCK_V: first an
online max / sum-of-exponentials (the log-sum-exp without holding the row), then, when a
gradient is wanted, the gradient itself, already multiplied by the reduction's scale (1 / the
number of counted rows for "mean"). So the forward leaves the whole gradient behind and the
backward is one multiplication by the incoming gradient. Ignored rows get loss 0 and a zero
gradient (written without reading their logits); a NaN anywhere in a counted row makes its loss
NaN. A row is read in chunks from the 16-byte boundary before it, so all chunks but its first
and last are whole and aligned (vectorised at any V, and only those two pay for a mask).
Offsets are 64-bit.
"""

from . import _guard  # noqa: F401  (only importable as cptfast.kernels)

import torch
import triton
import triton.language as tl

from ._autograd import LossOptions, mean_scale, reduce, scale_saved_gradients
from ._triton_helpers import capped


@triton.jit
def _chunks(shift, vocab, MASKED: tl.constexpr, BLOCK_V: tl.constexpr):
    """Where the chunks of one row start, in columns from the aligned address before it (shift
    columns before column 0): (count, first, jump). The unmasked chunks lie wholly inside the
    row, from BLOCK_V on; the masked ones are the first (with the columns before 0) and the
    last partial one, if any."""
    full_end = (vocab + shift) // BLOCK_V * BLOCK_V
    tail = tl.maximum(full_end, BLOCK_V)
    if MASKED:
        count = 1 + (tail < vocab + shift).to(tl.int32)
        first = 0
    else:
        count = tl.maximum(full_end // BLOCK_V - 1, 0)
        first = BLOCK_V
    return count, first, tail


@triton.jit
def _chunk(i, first, jump, shift, vocab, MASKED: tl.constexpr, BLOCK_V: tl.constexpr):
    """The i-th chunk of one loop of _chunks: (index, cols, inside), its offsets from the
    aligned address, its columns and which of them lie in the row."""
    start = first + i * BLOCK_V
    if MASKED:
        start = tl.where(i == 0, 0, jump)
    index = start + tl.arange(0, BLOCK_V)
    cols = index - shift
    return index, cols, (cols >= 0) & (cols < vocab)


@triton.jit
def _load_chunk(ptr, index, inside, MASKED: tl.constexpr):
    """One chunk of the row, in fp32; only a MASKED one pays for the mask."""
    if MASKED:
        x = tl.load(ptr + index, mask=inside, other=0.0)
    else:
        x = tl.load(ptr + index)
    return x.to(tl.float32)


@triton.jit
def cross_entropy_forward_kernel(
    logits_ptr, row_stride, labels_ptr, loss_ptr, lse_ptr, grad_ptr, scale_ptr, vocab,
    ignore_index, label_smoothing, z_loss, softcap, HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, SCALE_PER_ROW: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    counted = label != ignore_index
    # Chunks start at the 16-byte boundary at or before the row's first column, so that every
    # chunk but the first and the last is whole and aligned (vectorised loads and stores for
    # any V, e.g. GPT-2's 50,257): the row is read from `aligned`, column c at c + shift.
    ALIGN: tl.constexpr = 128 // logits_ptr.dtype.element_ty.primitive_bitwidth
    offset = row * row_stride
    shift = (offset % ALIGN).to(tl.int32)
    aligned = tl.multiple_of(offset - shift, ALIGN)

    # Pass 1: running max m, sum of exp(z - m), sum of z, and a NaN count.
    m = tl.full([], float("-inf"), tl.float32)
    sum_exp = tl.zeros([], tl.float32)
    sum_z = tl.zeros([], tl.float32)
    nans = tl.zeros([], tl.int32)
    for masked in tl.static_range(2):
        count, first, jump = _chunks(shift, vocab, masked == 1, BLOCK_V)
        for i in range(count):
            index, cols, inside = _chunk(i, first, jump, shift, vocab, masked == 1, BLOCK_V)
            x = _load_chunk(logits_ptr + aligned, index, inside, masked == 1)
            nans += tl.sum((x != x).to(tl.int32), axis=0)
            z = capped(x, softcap, HAS_SOFTCAP)
            if masked == 1:
                sum_z += tl.sum(tl.where(inside, z, 0.0), axis=0)
                z = tl.where(inside, z, float("-inf"))
            else:
                sum_z += tl.sum(z, axis=0)
            new_m = tl.maximum(m, tl.max(z, axis=0))
            sum_exp = sum_exp * tl.exp(m - new_m) + tl.sum(tl.exp(z - new_m), axis=0)
            m = new_m
    lse = m + tl.log(sum_exp)
    lse = tl.where(nans > 0, float("nan"), lse)

    safe_label = tl.where(counted, label, 0)
    z_label = capped(tl.load(logits_ptr + offset + safe_label).to(tl.float32), softcap,
                     HAS_SOFTCAP)
    loss = (1.0 - label_smoothing) * (lse - z_label) + z_loss * lse * lse
    loss += label_smoothing * (lse - sum_z / vocab)
    tl.store(loss_ptr + row, tl.where(counted, loss, 0.0))
    tl.store(lse_ptr + row, lse)

    if COMPUTE_GRAD:
        # Pass 2: the gradient, scaled for the reduction. An ignored row's is zero, written
        # without reading its logits: a NaN or inf there cannot reach the gradient (0 * NaN
        # is NaN) and from there grad_weight.
        scale = tl.load(scale_ptr + row if SCALE_PER_ROW else scale_ptr).to(tl.float32)
        softmax_factor = 1.0 + 2.0 * z_loss * lse
        for masked in tl.static_range(2):
            count, first, jump = _chunks(shift, vocab, masked == 1, BLOCK_V)
            for i in range(count):
                index, cols, inside = _chunk(i, first, jump, shift, vocab, masked == 1,
                                             BLOCK_V)
                if counted:
                    x = _load_chunk(logits_ptr + aligned, index, inside, masked == 1)
                    z = capped(x, softcap, HAS_SOFTCAP)
                    grad = tl.exp(z - lse) * softmax_factor - label_smoothing / vocab
                    grad -= tl.where(cols == label, 1.0 - label_smoothing, 0.0)
                    if HAS_SOFTCAP:
                        ratio = z / softcap
                        grad *= 1.0 - ratio * ratio
                    grad = grad * scale
                else:
                    grad = tl.zeros((BLOCK_V,), tl.float32)
                if masked == 1:
                    tl.store(grad_ptr + aligned + index, grad.to(grad_ptr.dtype.element_ty),
                             mask=inside)
                else:
                    tl.store(grad_ptr + aligned + index, grad.to(grad_ptr.dtype.element_ty))


def launch_config(vocab: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """BLOCK_V and num_warps for a vocabulary size and logits dtype (the shipped
    configurations)."""
    block = min(max(triton.next_power_of_2(max(vocab, 1)), 64), 4096)
    warps = 8 if block >= 2048 else 4
    if dtype == torch.float16 and block == 4096:
        # ptxas spills 8 B of the fp16 variant at 8 warps on sm_90 for a vocabulary that is not
        # a multiple of 16 (GPT-2's); 16 warps do not, but cost the reductions of the first
        # pass more in the static model, so only fp16 takes them.
        warps = 16
    return {"BLOCK_V": block, "num_warps": warps}


def cross_entropy_rows(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor,
                       options: LossOptions, grad: torch.Tensor | None):
    """Per-row loss and lse (fp32 [N]); with ``grad`` ([N, V] in the logits' strides and dtype,
    may alias ``logits``), also writes dloss/dlogits * scale into it. ``scale`` (fp32) has one
    element (1 / counted rows for "mean") or one per row; it is read on the device, so there is
    no host synchronisation. ``options.reduction`` is not read here."""
    rows, vocab = logits.shape
    losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(losses)
    if rows == 0:
        return losses, lse
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    labels, scale = labels.contiguous(), scale.contiguous()
    if grad is not None and (grad.stride() != logits.stride() or grad.dtype != logits.dtype):
        raise ValueError("grad must have the logits' strides and dtype (the kernel reads and "
                         "writes a row at the same offsets)")
    softcap = options.softcap
    config = launch_config(vocab, logits.dtype)
    cross_entropy_forward_kernel[(rows,)](
        logits, logits.stride(0), labels, losses, lse, grad if grad is not None else logits,
        scale, vocab, options.ignore_index, float(options.label_smoothing),
        float(options.z_loss), float(softcap) if softcap is not None else 1.0,
        HAS_SOFTCAP=softcap is not None, COMPUTE_GRAD=grad is not None,
        SCALE_PER_ROW=scale.numel() > 1, **config)
    return losses, lse


class _TritonCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, options: LossOptions):
        scale = mean_scale(labels, options.ignore_index, options.reduction)
        need_grad = logits.requires_grad
        if logits.stride(1) != 1 or logits.stride(0) < logits.shape[1]:  # e.g. expanded rows
            logits = logits.contiguous()
        # The gradient in the logits' layout (cross_entropy_rows reads and writes one offset).
        grad = torch.empty_strided(logits.shape, logits.stride(), dtype=logits.dtype,
                                   device=logits.device) if need_grad else None
        losses, lse = cross_entropy_rows(logits, labels, scale, options, grad)
        ctx.reduction = options.reduction
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(lse)
        return reduce(losses, scale, options.reduction), lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        (grad,) = ctx.saved_tensors
        return *scale_saved_gradients(ctx.reduction, grad_loss, grad), None, None


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                  label_smoothing: float = 0.0, z_loss: float = 0.0,
                  softcap: float | None = None, reduction: str = "mean",
                  return_lse: bool = False):
    """Triton cross-entropy of logits [N, V] (fp32/bf16/fp16) against labels [N]; see the
    module docstring. Inputs are assumed checked (cptfast.ops does)."""
    options = LossOptions(ignore_index=ignore_index, label_smoothing=label_smoothing,
                          z_loss=z_loss, softcap=softcap, reduction=reduction)
    loss, lse = _TritonCrossEntropy.apply(logits, labels, options)
    return (loss, lse) if return_lse else loss
