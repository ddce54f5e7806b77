"""Pure-PyTorch implementations of cptfast's operations: the CPU path, and the test oracle's
neighbour (tests compare both these and the Triton kernels with float64 computations).

Cross-entropy semantics (shared with kernels/cross_entropy.py), per counted row with logits x
(length V) and label y:
    z      = c * tanh(x / c)              when softcap c is set, else z = x
    lse    = log(sum_j exp(z_j))
    loss   = (1 - eps) * (lse - z_y) + eps * (lse - mean_j z_j) + z_loss * lse^2
    dloss/dz_j = softmax(z)_j * (1 + 2 * z_loss * lse) - (1 - eps) * [j == y] - eps / V
    dz/dx  = 1 - (z / c)^2                (softcap only)
Rows whose label is ignore_index count as 0 with zero gradient. "mean" divides by the number of
counted rows (0 when there are none: loss 0, gradients 0), "sum" adds, "none" returns per-row
losses. Everything is computed in fp32 (fp64 for fp64 inputs, so gradcheck applies).

Both functions work in row chunks sized from a memory budget (about ``chunk_bytes`` of logits
in the logits' dtype, the Triton path's budget), so the CPU path stays lean too: the fused
linear version never holds more than one chunk of logits. The autograd helpers (options, chunk
budget, mean scale, the in-place backward scaling) are the Triton path's own, from
cptfast.kernels._autograd, so the two cannot drift apart.
"""

from __future__ import annotations

import torch

from cptfast.kernels._autocast import autocast_cast, autocast_dtype, no_autocast
from cptfast.kernels._autograd import (REDUCTIONS, LossOptions, accumulate, counted_rows,
                                       in_dtypes, mean_scale, reduce, rows_per_chunk,
                                       scale_saved_gradients)

__all__ = ["REDUCTIONS", "apply_rotary_", "cross_entropy", "fused_linear_cross_entropy",
           "varlen_attention"]


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32, or fp64 for fp64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def loss_and_grad_rows_(z: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor,
                        options: LossOptions, need_grad: bool
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss and lse of one chunk of logits ``z`` (fp32/fp64, overwritten). With
    ``need_grad``, ``z`` is left holding dloss/dlogits * scale (scale: [1] or one per row).
    In place, so a chunk costs one buffer of logits and a few per-row vectors."""
    vocab = z.shape[-1]
    softcap, label_smoothing, z_loss = options.softcap, options.label_smoothing, options.z_loss
    capped_slope = None
    if softcap is not None:
        z.div_(softcap).tanh_()
        if need_grad:
            capped_slope = 1 - z * z  # d(c tanh(x/c))/dx, the one extra buffer softcap costs
        z.mul_(softcap)
    counted = labels != options.ignore_index
    safe_labels = torch.where(counted, labels, 0).long()[:, None]
    label_logit = z.gather(1, safe_labels)[:, 0]
    mean_logit = z.mean(dim=-1) if label_smoothing else None
    row_max = z.amax(dim=-1)  # NaN propagates, so a NaN row gets a NaN loss
    z.sub_(row_max[:, None]).exp_()
    sum_exp = z.sum(dim=-1)
    lse = row_max + sum_exp.log()
    loss = (1 - label_smoothing) * (lse - label_logit) + z_loss * lse * lse
    if label_smoothing:
        loss = loss + label_smoothing * (lse - mean_logit)
    loss = torch.where(counted, loss, 0.0)
    if need_grad:
        # softmax * (1 + 2 z_loss lse) - eps / V - (1 - eps) [j == y], zero for ignored rows
        z.mul_(((1 + 2 * z_loss * lse) / sum_exp)[:, None])
        if label_smoothing:
            z.sub_(label_smoothing / vocab)
        z.scatter_add_(1, safe_labels, torch.full_like(lse[:, None], -(1 - label_smoothing)))
        z.mul_(scale[:, None])
        if capped_slope is not None:
            z.mul_(capped_slope)
        z.masked_fill_(~counted[:, None], 0.0)  # not a product: 0 * NaN is NaN
    return loss, lse


class _CrossEntropy(torch.autograd.Function):
    """Cross-entropy over given logits; the gradient is computed in the forward, chunk by
    chunk, so the backward only scales it."""

    @staticmethod
    def forward(ctx, logits, labels, options: LossOptions):
        need_grad = logits.requires_grad
        acc = math_dtype(logits.dtype)
        scale = mean_scale(labels, options.ignore_index, options.reduction, acc)
        losses = torch.empty(logits.shape[0], dtype=acc, device=logits.device)
        lse = torch.empty_like(losses)
        grad = torch.empty_like(logits) if need_grad else None
        step = rows_per_chunk(logits.shape[1], logits.element_size(), options.chunk_bytes,
                              logits.device)
        buffer = torch.empty((min(step, logits.shape[0]), logits.shape[1]), dtype=acc,
                             device=logits.device)
        for start in range(0, logits.shape[0], step):
            rows = slice(start, start + step)
            z = buffer[: logits[rows].shape[0]]
            z.copy_(logits[rows])
            losses[rows], lse[rows] = loss_and_grad_rows_(z, labels[rows], scale, options,
                                                          need_grad)
            if need_grad:
                grad[rows] = z
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
                  return_lse: bool = False, chunk_bytes: int | None = None):
    """Cross-entropy of logits [N, V] (any float dtype) against labels [N]; see module doc.
    Inputs are assumed checked by cptfast.ops."""
    options = LossOptions(ignore_index=ignore_index, label_smoothing=label_smoothing,
                          z_loss=z_loss, softcap=softcap, reduction=reduction,
                          chunk_bytes=chunk_bytes)
    loss, lse = _CrossEntropy.apply(logits, labels, options)
    return (loss, lse) if return_lse else loss


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of hidden @ weight.T (+ bias) without ever holding the [N, V] logits.

    For "mean"/"sum" the gradients of hidden, weight and bias are built during the forward,
    chunk by chunk (grad_weight and grad_bias accumulate in fp32), and the backward scales
    them. For "none" the per-row weights of the backward are unknown in the forward, so the
    forward keeps only the losses and the backward recomputes each chunk's logits.

    Under autocast (``compute_dtype``, read by the wrapper) it behaves as lm_head would:
    hidden, weight and bias are cast to the autocast dtype once per call, every GEMM runs in
    it, the loss math stays in fp32, and the gradients go back in the inputs' own dtypes (an
    fp32 weight gets its fp32 accumulator, never rounded to bf16 on the way).
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, options: LossOptions, compute_dtype):
        need_grad = hidden.requires_grad or weight.requires_grad or (
            bias is not None and bias.requires_grad)
        precompute = need_grad and options.reduction != "none"
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.device_type = hidden.device.type
        with no_autocast(hidden.device.type):
            hidden, weight, bias = (autocast_cast(t, compute_dtype)
                                    for t in (hidden, weight, bias))
            scale = mean_scale(labels, options.ignore_index, options.reduction,
                               math_dtype(hidden.dtype))
            losses, lse, grads = _fused_chunks(hidden, weight, bias, labels, scale, options,
                                               want_grads=precompute)
        ctx.options, ctx.has_bias = options, bias is not None
        if precompute:
            ctx.save_for_backward(*in_dtypes(grads, ctx.dtypes))
        else:
            ctx.save_for_backward(hidden, weight, labels, bias)  # in the compute dtype
        ctx.mark_non_differentiable(lse)
        return reduce(losses, scale, options.reduction), lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        if ctx.options.reduction != "none":
            grad_hidden, grad_weight, grad_bias = scale_saved_gradients(
                ctx.options.reduction, grad_loss, *ctx.saved_tensors)
        else:
            hidden, weight, labels, bias = ctx.saved_tensors
            with no_autocast(ctx.device_type):
                _, _, grads = _fused_chunks(hidden, weight, bias, labels, grad_loss,
                                            ctx.options, want_grads=True)
            grad_hidden, grad_weight, grad_bias = in_dtypes(grads, ctx.dtypes)
        return (grad_hidden, grad_weight, None, grad_bias if ctx.has_bias else None,
                None, None)


def _fused_chunks(hidden, weight, bias, labels, row_scale, options: LossOptions, want_grads):
    """Per-row losses and lse, and with want_grads the gradients of hidden, weight and bias
    for d(sum of row_scale * loss) (row_scale: [1], or one weight per row): grad_hidden
    in hidden's dtype, grad_weight and grad_bias in the math dtype.

    fp32/fp64 operands: logits straight into the math-dtype buffer. Half-precision operands
    (bf16/fp16, autocast's): each GEMM in that dtype, as lm_head's would be; the chunk's logits
    come out in it and the loss math runs on an fp32 copy, whose gradient is rounded back to
    the operands' dtype (what lm_head's backward receives) for the two gradient GEMMs."""
    n, vocab = hidden.shape[0], weight.shape[0]
    acc = math_dtype(hidden.dtype)
    low = not (hidden.dtype == acc and weight.dtype == acc)
    losses = torch.empty(n, dtype=acc, device=hidden.device)
    lse = torch.empty_like(losses)
    grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) \
        if want_grads else None
    grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_grads else None
    grad_bias = torch.zeros(vocab, dtype=acc, device=weight.device) \
        if want_grads and bias is not None else None
    per_row = row_scale.numel() > 1
    step = rows_per_chunk(vocab, hidden.element_size(), options.chunk_bytes, hidden.device)
    buffer = torch.empty((min(step, n), vocab), dtype=acc, device=hidden.device)
    low_buffer = torch.empty((min(step, n), vocab), dtype=hidden.dtype, device=hidden.device) \
        if low else None
    for start in range(0, n, step):
        rows = slice(start, start + step)
        z = buffer[: hidden[rows].shape[0]]
        if low:
            logits = low_buffer[: z.shape[0]]
            torch.mm(hidden[rows], weight.T, out=logits)
            z.copy_(logits)
        else:
            torch.mm(hidden[rows], weight.T, out=z)
        if bias is not None:
            z += bias
        losses[rows], lse[rows] = loss_and_grad_rows_(
            z, labels[rows], row_scale[rows] if per_row else row_scale, options, want_grads)
        if not want_grads:
            continue
        grad = z  # now dloss/dlogits, scaled
        if low:
            grad = logits
            grad.copy_(z)
        torch.mm(grad, weight, out=grad_hidden[rows])
        accumulate(grad_weight, grad.T, counted_rows(hidden[rows], labels[rows],
                                                     options.ignore_index))
        if grad_bias is not None:
            grad_bias += z.sum(dim=0)
    grads = (grad_hidden, grad_weight, grad_bias) if want_grads else (None, None, None)
    return losses, lse, grads


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               *, bias: torch.Tensor | None = None, ignore_index: int = -100,
                               label_smoothing: float = 0.0, z_loss: float = 0.0,
                               softcap: float | None = None, reduction: str = "mean",
                               return_lse: bool = False, chunk_bytes: int | None = None):
    """Cross-entropy of hidden [N, H] @ weight[V, H].T (+ bias [V]) against labels [N], in row
    chunks of about ``chunk_bytes`` of logits in hidden's dtype; see module doc. Under
    autocast the GEMMs run in the autocast dtype, as lm_head's would; gradients come back in
    the inputs' dtypes. Inputs are assumed checked by cptfast.ops."""
    if not torch.is_grad_enabled():  # no gradient wanted, though the weights require one
        hidden, weight = hidden.detach(), weight.detach()
        bias = None if bias is None else bias.detach()
    options = LossOptions(ignore_index=ignore_index, label_smoothing=label_smoothing,
                          z_loss=z_loss, softcap=softcap, reduction=reduction,
                          chunk_bytes=chunk_bytes)
    loss, lse = _FusedLinearCrossEntropy.apply(hidden, weight, labels, bias, options,
                                               autocast_dtype(hidden.device.type))
    return (loss, lse) if return_lse else loss


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens: torch.Tensor, max_seqlen: int, *, causal: bool = True,
                     softmax_scale: float | None = None, window: int | None = None,
                     softcap: float | None = None) -> torch.Tensor:
    """Attention of packed documents, one ``scaled_dot_product_attention`` per document: query
    i sees key j of its own document when j <= i (causal) and i - j <= window (if set).
    With ``softcap`` c the scaled scores s become c·tanh(s/c) first (written out, as SDPA has
    no such option). q [T, Hq, D], k and v [T, Hkv, D] (Hq a multiple of Hkv); returns
    [T, Hq, D]."""
    group = q.shape[1] // k.shape[1]
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        doc_q = q[start:end].transpose(0, 1)  # [H, L, D]
        doc_k = k[start:end].transpose(0, 1).repeat_interleave(group, dim=0)
        doc_v = v[start:end].transpose(0, 1).repeat_interleave(group, dim=0)
        if window is None and softcap is None:  # PyTorch's flash kernel (4-D only), no mask
            out[start:end] = torch.nn.functional.scaled_dot_product_attention(
                doc_q[None], doc_k[None], doc_v[None], is_causal=causal,
                scale=scale)[0].transpose(0, 1)
            continue
        positions = torch.arange(end - start, device=q.device)
        offset = positions[:, None] - positions[None, :]  # query - key
        visible = torch.ones_like(offset, dtype=torch.bool)
        if causal:
            visible &= offset >= 0
        if window is not None:
            visible &= offset <= window
        if softcap is None:
            doc_out = torch.nn.functional.scaled_dot_product_attention(
                doc_q, doc_k, doc_v, attn_mask=visible, scale=scale)
        else:
            scores = (doc_q.float() @ doc_k.float().transpose(1, 2)) * scale
            scores = softcap * torch.tanh(scores / softcap)
            weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
            doc_out = (weights @ doc_v.float()).to(q.dtype)
        out[start:end] = doc_out.transpose(0, 1)
    return out


def apply_rotary_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotary embeddings, in place, the transformers Llama convention: x * cos +
    rotate_half(x) * sin with per-token cos, sin [T, D] broadcast over heads. Returns (q, k)."""
    def rotated(x):
        half = x.shape[-1] // 2
        c, s = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * c[..., :half] - x2 * s[..., :half],
                          x2 * c[..., half:] + x1 * s[..., half:]), dim=-1)

    q.copy_(rotated(q))
    k.copy_(rotated(k))
    return q, k
