"""Fused linear cross-entropy: the loss of hidden [N, H] @ weight[V, H].T (+ bias) that never
writes a logit to memory (the idea of Cut Cross-Entropy, kept exact).

Forward: one program per block of BLOCK_N rows walks the vocabulary in tiles of BLOCK_V; each
tile of logits is computed in registers (tl.dot over H in steps of BLOCK_H), soft-capped, and
folded into a running max / sum of exponentials per row, together with the sum of the logits
(label smoothing) and the label's logit. Only the per-row lse and loss are written.

Backward: one program per (row block, vocabulary tile) recomputes its tile of logits, turns it
into the gradient with the saved lse (the rule of cross_entropy.py, times the incoming
gradient of each row), and adds G @ weight_tile into grad_hidden and G.T @ hidden_block into
grad_weight (and G's column sums into grad_bias) with fp32 atomics. Nothing is filtered or
skipped, so the gradients are exact up to fp32 summation order. Cost: the forward matmul once
and the backward three times (recompute, two gradients), against three for the naive version,
but no [N, V] buffer at all: extra memory is the fp32 gradient accumulators.
"""

import torch
import triton
import triton.language as tl

from .cross_entropy import _capped, interpreting, mean_scale


@triton.jit
def _logit_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_ok, col_ok, hidden_size,
                stride_hn, stride_hh, stride_wv, stride_wh, softcap, HAS_BIAS: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """z[BLOCK_N, BLOCK_V] = softcap(hidden[rows] @ weight[cols].T + bias[cols]), in fp32."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, hidden_size, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_ok = ks < hidden_size
        h = tl.load(hidden_ptr + rows[:, None] * stride_hn + ks[None, :] * stride_hh,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(weight_ptr + cols[:, None] * stride_wv + ks[None, :] * stride_wh,
                    mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if FP32_DOT:  # the interpreter computes bf16 arithmetic on raw bits
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return _capped(acc, softcap, HAS_SOFTCAP)


@triton.jit
def fused_linear_cross_entropy_forward_kernel(
    hidden_ptr, weight_ptr, bias_ptr, labels_ptr, loss_ptr, lse_ptr, n_rows, vocab, hidden_size,
    stride_hn, stride_hh, stride_wv, stride_wh, ignore_index, label_smoothing, z_loss, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    sum_exp = tl.zeros((BLOCK_N,), tl.float32)
    sum_z = tl.zeros((BLOCK_N,), tl.float32)
    z_label = tl.zeros((BLOCK_N,), tl.float32)
    nans = tl.zeros((BLOCK_N,), tl.int32)
    for v0 in range(0, vocab, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < vocab
        z = _logit_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_ok, col_ok,
                        hidden_size, stride_hn, stride_hh, stride_wv, stride_wh, softcap,
                        HAS_BIAS, HAS_SOFTCAP, FP32_DOT, BLOCK_N, BLOCK_V, BLOCK_H)
        nans += tl.sum((z != z).to(tl.int32), axis=1)
        sum_z += tl.sum(tl.where(col_ok[None, :], z, 0.0), axis=1)
        z_label += tl.sum(tl.where(cols[None, :] == labels[:, None], z, 0.0), axis=1)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        new_m = tl.maximum(m, tl.max(z, axis=1))
        sum_exp = sum_exp * tl.exp(m - new_m) + tl.sum(tl.exp(z - new_m[:, None]), axis=1)
        m = new_m
    lse = m + tl.log(sum_exp)
    lse = tl.where(nans > 0, float("nan"), lse)
    loss = (1.0 - label_smoothing) * (lse - z_label) + z_loss * lse * lse
    loss += label_smoothing * (lse - sum_z / vocab)
    tl.store(loss_ptr + rows, tl.where(labels != ignore_index, loss, 0.0), mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)


@triton.jit
def fused_linear_cross_entropy_backward_kernel(
    hidden_ptr, weight_ptr, bias_ptr, labels_ptr, lse_ptr, row_scale_ptr,
    grad_hidden_ptr, grad_weight_ptr, grad_bias_ptr, n_rows, vocab, hidden_size,
    stride_hn, stride_hh, stride_wv, stride_wh, ignore_index, label_smoothing, z_loss, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, FP32_DOT: tl.constexpr,
    SCALE_PER_ROW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < n_rows
    col_ok = cols < vocab
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    if SCALE_PER_ROW:
        scale = tl.load(row_scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    else:
        scale = tl.zeros((BLOCK_N,), tl.float32) + tl.load(row_scale_ptr).to(tl.float32)
    scale = tl.where(row_ok & (labels != ignore_index), scale, 0.0)

    z = _logit_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_ok, col_ok, hidden_size,
                    stride_hn, stride_hh, stride_wv, stride_wh, softcap, HAS_BIAS, HAS_SOFTCAP,
                    FP32_DOT, BLOCK_N, BLOCK_V, BLOCK_H)
    grad = tl.exp(z - lse[:, None]) * (1.0 + 2.0 * z_loss * lse)[:, None] - label_smoothing / vocab
    grad -= tl.where(cols[None, :] == labels[:, None], 1.0 - label_smoothing, 0.0)
    if HAS_SOFTCAP:
        capped = z / softcap
        grad *= 1.0 - capped * capped
    grad = tl.where(col_ok[None, :], grad * scale[:, None], 0.0)
    if HAS_BIAS:
        tl.atomic_add(grad_bias_ptr + cols, tl.sum(grad, axis=0), mask=col_ok)
    if not FP32_DOT:
        grad = grad.to(hidden_ptr.dtype.element_ty)  # tensor-core operands
    for k0 in range(0, hidden_size, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_ok = ks < hidden_size
        h = tl.load(hidden_ptr + rows[:, None] * stride_hn + ks[None, :] * stride_hh,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(weight_ptr + cols[:, None] * stride_wv + ks[None, :] * stride_wh,
                    mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if FP32_DOT:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        tl.atomic_add(grad_hidden_ptr + rows[:, None] * hidden_size + ks[None, :],
                      tl.dot(grad, w), mask=row_ok[:, None] & k_ok[None, :])
        tl.atomic_add(grad_weight_ptr + cols[:, None] * hidden_size + ks[None, :],
                      tl.dot(tl.trans(grad), h), mask=col_ok[:, None] & k_ok[None, :])


def launch_config(hidden_size: int) -> dict:
    """Tile sizes and warps: the one shipped configuration. 64 x 64 logit tiles, BLOCK_H = 32
    and 8 warps compile without spills for sm_80 and sm_90 in every dtype and use wgmma on
    sm_90; 128-wide tiles or BLOCK_H = 64 spill, and so does the fp32 backward at BLOCK_H = 16
    on sm_80 (tests/kernels/test_aot.py checks what ships)."""
    return {"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_H": 32, "num_warps": 8}


SHIPPED_CONFIGS = [launch_config(0)]


def _strides(hidden, weight):
    return hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, ignore_index, label_smoothing, z_loss,
                softcap, reduction):
        n, hidden_size = hidden.shape
        vocab = weight.shape[0]
        labels = labels.contiguous()
        losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(losses)
        config = launch_config(hidden_size)
        flags = dict(HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
                     FP32_DOT=interpreting() or hidden.dtype == torch.float32)
        options = (ignore_index, float(label_smoothing), float(z_loss),
                   float(softcap) if softcap is not None else 1.0)
        if n > 0:
            grid = (triton.cdiv(n, config["BLOCK_N"]),)
            fused_linear_cross_entropy_forward_kernel[grid](
                hidden, weight, bias if bias is not None else hidden, labels, losses, lse, n,
                vocab, hidden_size, *_strides(hidden, weight), *options, **flags, **config)
        scale = mean_scale(labels, ignore_index, reduction)
        ctx.save_for_backward(hidden, weight, bias, labels, lse, scale)
        ctx.reduction, ctx.options, ctx.flags, ctx.config = reduction, options, flags, config
        ctx.mark_non_differentiable(lse)
        loss = losses if reduction == "none" else losses.sum() * scale[0]
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        hidden, weight, bias, labels, lse, scale = ctx.saved_tensors
        n, hidden_size = hidden.shape
        vocab = weight.shape[0]
        row_scale = (grad_loss.float() if ctx.reduction == "none"
                     else scale * grad_loss.float()).contiguous()
        grad_hidden = torch.zeros((n, hidden_size), dtype=torch.float32, device=hidden.device)
        grad_weight = torch.zeros((vocab, hidden_size), dtype=torch.float32,
                                  device=weight.device)
        grad_bias = torch.zeros(vocab, dtype=torch.float32, device=weight.device) \
            if bias is not None else None
        if n > 0:
            config = ctx.config
            grid = (triton.cdiv(n, config["BLOCK_N"]), triton.cdiv(vocab, config["BLOCK_V"]))
            fused_linear_cross_entropy_backward_kernel[grid](
                hidden, weight, bias if bias is not None else hidden, labels, lse, row_scale,
                grad_hidden, grad_weight, grad_bias if grad_bias is not None else grad_hidden,
                n, vocab, hidden_size, *_strides(hidden, weight), *ctx.options,
                SCALE_PER_ROW=ctx.reduction == "none", **ctx.flags, **config)
        return (grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype), None,
                None if bias is None else grad_bias.to(bias.dtype),
                None, None, None, None, None)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               *, bias: torch.Tensor | None = None, ignore_index: int = -100,
                               label_smoothing: float = 0.0, z_loss: float = 0.0,
                               softcap: float | None = None, reduction: str = "mean",
                               return_lse: bool = False):
    """Cross-entropy of hidden [N, H] @ weight [V, H].T (+ bias [V]) against labels [N];
    semantics of cross_entropy.py. Inputs are assumed checked (cptfast.ops does)."""
    loss, lse = _FusedLinearCrossEntropy.apply(hidden, weight, labels, bias, ignore_index,
                                               label_smoothing, z_loss, softcap, reduction)
    return (loss, lse) if return_lse else loss


def aot_specs() -> list[dict]:
    """Every shipped configuration of both kernels, for ahead-of-time compilation checks."""
    specs = []
    for dtype in ("bf16", "fp16", "fp32"):
        for config in SHIPPED_CONFIGS:
            common = {
                "hidden_ptr": f"*{dtype}", "weight_ptr": f"*{dtype}", "bias_ptr": f"*{dtype}",
                "labels_ptr": "*i64"}
            sizes = {"n_rows": "i32", "vocab": "i32", "hidden_size": "i32", "stride_hn": "i32",
                     "stride_hh": "i32", "stride_wv": "i32", "stride_wh": "i32",
                     "ignore_index": "i32", "label_smoothing": "fp32", "z_loss": "fp32",
                     "softcap": "fp32"}
            flags = {"HAS_BIAS": True, "HAS_SOFTCAP": True, "FP32_DOT": dtype == "fp32",
                     "BLOCK_N": config["BLOCK_N"], "BLOCK_V": config["BLOCK_V"],
                     "BLOCK_H": config["BLOCK_H"]}
            forward = {**common, "loss_ptr": "*fp32", "lse_ptr": "*fp32", **sizes,
                       **{k: "constexpr" for k in flags}}
            backward = {**common, "lse_ptr": "*fp32", "row_scale_ptr": "*fp32",
                        "grad_hidden_ptr": "*fp32", "grad_weight_ptr": "*fp32",
                        "grad_bias_ptr": "*fp32", **sizes,
                        **{k: "constexpr" for k in ("HAS_BIAS", "HAS_SOFTCAP", "FP32_DOT",
                                                    "SCALE_PER_ROW", "BLOCK_N", "BLOCK_V",
                                                    "BLOCK_H")}}
            suffix = f"[{dtype},BLOCK_H={config['BLOCK_H']}]"
            specs.append({"name": "fused_linear_ce_forward" + suffix,
                          "fn": fused_linear_cross_entropy_forward_kernel,
                          "signature": forward, "constexprs": flags,
                          "num_warps": config["num_warps"]})
            specs.append({"name": "fused_linear_ce_backward" + suffix,
                          "fn": fused_linear_cross_entropy_backward_kernel,
                          "signature": backward, "constexprs": {**flags, "SCALE_PER_ROW": True},
                          "num_warps": config["num_warps"]})
    return specs
