"""Fused linear cross-entropy: the loss of hidden [N, H] @ weight[V, H].T (+ bias) without ever
holding the [N, V] logits.

Rows are processed in chunks sized from a memory budget. For each chunk the logits are
computed into one reusable buffer, the Triton cross-entropy kernel (cross_entropy.py) turns
them into their gradient in place, and that gradient immediately becomes the chunk's part of
grad_hidden (= g @ weight) and of grad_weight (+= g.T @ hidden, accumulated in fp32) and
grad_bias. For "mean"/"sum" this all happens in the forward and the backward is a scale; for
"none" the backward's per-row weights are unknown in the forward, so the forward keeps only the
losses and the backward recomputes each chunk. Peak extra memory: one chunk of logits plus an
fp32 grad_weight. No host synchronisation: the "mean" scale stays on the device.
"""

import torch

from .cross_entropy import cross_entropy_rows, mean_scale, scale_saved_gradients

DEFAULT_CHUNK_BYTES = 256 << 20  # one chunk of logits, in the logits' dtype


def rows_per_chunk(vocab: int, itemsize: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    return max(1, chunk_bytes // (itemsize * max(vocab, 1)))


def _accumulate_fp32(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out (fp32) += a @ b, with a and b in their own (possibly half) dtype."""
    if a.dtype == torch.float32:
        out.addmm_(a, b)
    else:
        try:  # fp32 result straight from the half-precision matmul, without a half round trip
            out += torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            out.addmm_(a.float(), b.float())


def _chunks(hidden, weight, bias, labels, row_scale, options, chunk_bytes, want_grads):
    """Per-row losses and lse; with want_grads also the gradients of hidden, weight, bias for
    d(sum of row_scale * loss), row_scale being a one-element tensor or one value per row."""
    n, vocab = hidden.shape[0], weight.shape[0]
    losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
    lse = torch.empty_like(losses)
    grad_hidden = torch.empty_like(hidden) if want_grads else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
        if want_grads else None
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=weight.device) \
        if want_grads and bias is not None else None
    per_row = row_scale.numel() > 1
    step = rows_per_chunk(vocab, hidden.element_size(), chunk_bytes)
    buffer = torch.empty((min(step, n), vocab), dtype=hidden.dtype, device=hidden.device)
    for start in range(0, n, step):
        rows = slice(start, start + step)
        logits = buffer[: min(step, n - start)]
        if bias is not None:
            torch.addmm(bias, hidden[rows], weight.T, out=logits)
        else:
            torch.mm(hidden[rows], weight.T, out=logits)
        losses[rows], lse[rows] = cross_entropy_rows(
            logits, labels[rows], row_scale[rows] if per_row else row_scale,
            grad=logits if want_grads else None, **options)
        if not want_grads:
            continue
        grad = logits  # the kernel overwrote the logits with their (scaled) gradient
        torch.mm(grad, weight, out=grad_hidden[rows])
        _accumulate_fp32(grad_weight, grad.T, hidden[rows])
        if grad_bias is not None:
            grad_bias += grad.sum(dim=0, dtype=torch.float32)
    if not want_grads:
        return losses, lse, (None, None, None)
    return losses, lse, (grad_hidden, grad_weight.to(weight.dtype),
                         None if grad_bias is None else grad_bias.to(bias.dtype))


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, ignore_index, label_smoothing, z_loss,
                softcap, reduction, chunk_bytes):
        options = dict(ignore_index=ignore_index, label_smoothing=label_smoothing,
                       z_loss=z_loss, softcap=softcap)
        need_grad = hidden.requires_grad or weight.requires_grad or (
            bias is not None and bias.requires_grad)
        precompute = need_grad and reduction != "none"
        scale = mean_scale(labels, ignore_index, reduction)
        losses, lse, grads = _chunks(hidden, weight, bias, labels, scale, options, chunk_bytes,
                                     want_grads=precompute)
        ctx.reduction, ctx.options, ctx.chunk_bytes = reduction, options, chunk_bytes
        ctx.has_bias = bias is not None
        if precompute:
            ctx.save_for_backward(*grads)
        else:
            ctx.save_for_backward(hidden, weight, labels, bias)
        ctx.mark_non_differentiable(lse)
        loss = losses if reduction == "none" else losses.sum() * scale[0]
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        if ctx.reduction != "none":
            grad_hidden, grad_weight, grad_bias = scale_saved_gradients(
                ctx, grad_loss, *ctx.saved_tensors)
        else:
            hidden, weight, labels, bias = ctx.saved_tensors
            _, _, (grad_hidden, grad_weight, grad_bias) = _chunks(
                hidden, weight, bias, labels, grad_loss.float().contiguous(), ctx.options,
                ctx.chunk_bytes,
                want_grads=True)
        return (grad_hidden, grad_weight, None, grad_bias if ctx.has_bias else None,
                None, None, None, None, None, None)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               *, bias: torch.Tensor | None = None, ignore_index: int = -100,
                               label_smoothing: float = 0.0, z_loss: float = 0.0,
                               softcap: float | None = None, reduction: str = "mean",
                               return_lse: bool = False,
                               chunk_bytes: int = DEFAULT_CHUNK_BYTES):
    """Cross-entropy of hidden [N, H] @ weight [V, H].T (+ bias [V]) against labels [N];
    semantics of cross_entropy.py. Inputs are assumed checked (cptfast.ops does)."""
    loss, lse = _FusedLinearCrossEntropy.apply(hidden, weight, labels, bias, ignore_index,
                                               label_smoothing, z_loss, softcap, reduction,
                                               chunk_bytes)
    return (loss, lse) if return_lse else loss
