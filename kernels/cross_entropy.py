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

import os

import torch
import triton
import triton.language as tl

REDUCTIONS = ("mean", "sum", "none")


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (the CPU test path)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _tanh(a):
    # 1 - 2 / (exp(2a) + 1): exact limits at +-inf; tl has no tanh and libdevice is not
    # available under the interpreter.
    return 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)


@triton.jit
def _capped(x, softcap, HAS_SOFTCAP: tl.constexpr):
    if HAS_SOFTCAP:
        x = softcap * _tanh(x / softcap)
    return x


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
            start = first + i * BLOCK_V
            if masked == 1:
                start = tl.where(i == 0, 0, jump)
            index = start + tl.arange(0, BLOCK_V)
            cols = index - shift
            if masked == 1:
                inside = (cols >= 0) & (cols < vocab)
                x = tl.load(logits_ptr + aligned + index, mask=inside, other=0.0)
            else:
                x = tl.load(logits_ptr + aligned + index)
            x = x.to(tl.float32)
            nans += tl.sum((x != x).to(tl.int32), axis=0)
            z = _capped(x, softcap, HAS_SOFTCAP)
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
    z_label = _capped(tl.load(logits_ptr + offset + safe_label).to(tl.float32), softcap,
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
                start = first + i * BLOCK_V
                if masked == 1:
                    start = tl.where(i == 0, 0, jump)
                index = start + tl.arange(0, BLOCK_V)
                cols = index - shift
                inside = (cols >= 0) & (cols < vocab)
                if counted:
                    if masked == 1:
                        x = tl.load(logits_ptr + aligned + index, mask=inside, other=0.0)
                    else:
                        x = tl.load(logits_ptr + aligned + index)
                    z = _capped(x.to(tl.float32), softcap, HAS_SOFTCAP)
                    grad = tl.exp(z - lse) * softmax_factor - label_smoothing / vocab
                    grad -= tl.where(cols == label, 1.0 - label_smoothing, 0.0)
                    if HAS_SOFTCAP:
                        capped = z / softcap
                        grad *= 1.0 - capped * capped
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




def cross_entropy_rows(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, *,
                       ignore_index: int, label_smoothing: float, z_loss: float,
                       softcap: float | None, grad: torch.Tensor | None):
    """Per-row loss and lse (fp32 [N]); with ``grad`` ([N, V] in the logits' strides and dtype,
    may alias ``logits``), also writes dloss/dlogits * scale into it. ``scale`` (fp32) has one
    element (1 / counted rows for "mean") or one per row; it is read on the device, so there is
    no host synchronisation."""
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
    config = launch_config(vocab, logits.dtype)
    cross_entropy_forward_kernel[(rows,)](
        logits, logits.stride(0), labels, losses, lse, grad if grad is not None else logits,
        scale, vocab, ignore_index, float(label_smoothing), float(z_loss),
        float(softcap) if softcap is not None else 1.0,
        HAS_SOFTCAP=softcap is not None, COMPUTE_GRAD=grad is not None,
        SCALE_PER_ROW=scale.numel() > 1, **config)
    return losses, lse


def mean_scale(labels: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    """1 / counted rows for "mean" (1 when none: all-ignored gives 0), else 1; on the device."""
    if reduction != "mean":
        return torch.ones(1, dtype=torch.float32, device=labels.device)
    return 1.0 / (labels != ignore_index).sum().clamp(min=1).float().reshape(1)


def scale_saved_gradients(ctx, grad_loss: torch.Tensor, *grads):
    """The backward of a loss whose gradients the forward already computed: scale them in
    place, so each becomes its input's .grad without a copy of its size. None passes through.
    A second backward through the same graph (retain_graph=True) is refused by autograd's
    saved-tensor version check rather than scaling twice."""
    if ctx.reduction == "none":
        grad_loss = grad_loss[:, None]
    return tuple(None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads)


class _TritonCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, label_smoothing, z_loss, softcap, reduction):
        scale = mean_scale(labels, ignore_index, reduction)
        need_grad = logits.requires_grad
        if logits.stride(1) != 1 or logits.stride(0) < logits.shape[1]:  # e.g. expanded rows
            logits = logits.contiguous()
        # The gradient in the logits' layout (cross_entropy_rows reads and writes one offset).
        grad = torch.empty_strided(logits.shape, logits.stride(), dtype=logits.dtype,
                                   device=logits.device) if need_grad else None
        losses, lse = cross_entropy_rows(logits, labels, scale, ignore_index=ignore_index,
                                         label_smoothing=label_smoothing, z_loss=z_loss,
                                         softcap=softcap, grad=grad)
        ctx.reduction = reduction
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(lse)
        loss = losses if reduction == "none" else losses.sum() * scale[0]
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        (grad,) = ctx.saved_tensors
        return *scale_saved_gradients(ctx, grad_loss, grad), None, None, None, None, None, None


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                  label_smoothing: float = 0.0, z_loss: float = 0.0,
                  softcap: float | None = None, reduction: str = "mean",
                  return_lse: bool = False):
    """Triton cross-entropy of logits [N, V] (fp32/bf16/fp16) against labels [N]; see the
    module docstring. Inputs are assumed checked (cptfast.ops does)."""
    loss, lse = _TritonCrossEntropy.apply(logits, labels, ignore_index, label_smoothing, z_loss,
                                          softcap, reduction)
    return (loss, lse) if return_lse else loss
