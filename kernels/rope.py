"""Rotary position embeddings applied in place to packed q [T, Hq, D] and k [T, Hkv, D].

The `transformers` Llama convention: with per-token tables cos, sin [T, D] (what its rotary
embedding module returns for the batch's position_ids, which restart at 0 in every packed
document), x1 = x[..., :D/2] and x2 = x[..., D/2:],
    out1 = x1 * cos1 - x2 * sin1,    out2 = x2 * cos2 + x1 * sin2
(i.e. x * cos + rotate_half(x) * sin). The backward applies the transposed rotation,
    g1 * cos1 + g2 * sin2,           g2 * cos2 - g1 * sin1.
Math in fp32.

One kernel, `rope_kernel`: each program takes a block of BLOCK_T tokens, reads their cos/sin
once, and rotates q's heads and then k's heads in blocks of BLOCK_H (so a forward is one launch
for both tensors). It reads from source pointers and writes to destination pointers: in the
forward they are the same tensor (in place); in the backward the source is the incoming
gradient, read through its own strides (it may be expanded, stride 0, or shared with another
node, so it is never written), and the destination a fresh contiguous tensor: one pass, no
clone.

Autograd. q and k are usually views of the projections, and autograd accepts a Function that
modifies a view in place (mark_dirty) only when it returns a single tensor (torch 2.13 still
refuses two: "If your Function modifies inplace an input that is a view of another Tensor,
your Function cannot return more than one Tensor"). So each tensor gets its own single-output
Function, `_Rotated`, which does the autograd bookkeeping (mark_dirty, saving cos/sin; its
backward is the transposed rotation of that tensor's gradient, one launch), and the forward
work for both is the one launch that follows the two applies. Applying both Functions first
means autograd's in-place checks (a leaf that requires grad, a view it may not modify) refuse
the call before any data changes; nothing runs between the applies and the launch, so no one
can observe q or k marked rotated but not yet rotated. The backward stays one launch per
tensor: autograd hands grad_q and grad_k to the two nodes separately.
"""

from . import _guard  # noqa: F401  (only importable as cptfast.kernels)

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable


@triton.jit
def _rotate_heads(src_ptr, dst_ptr, heads, half, offs_t, t_ok, offs_d, d_ok, cos1, cos2, sin1,
                  sin2, stride_st, stride_sh, stride_sd, stride_dt, stride_dh,
                  BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rotate heads [0, heads) of the tokens offs_t: src -> dst (the same memory in place)."""
    for h0 in range(0, heads, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask = t_ok[:, None, None] & (offs_h < heads)[None, :, None] & d_ok[None, None, :]
        src = (src_ptr + offs_t[:, None, None] * stride_st + offs_h[None, :, None] * stride_sh
               + offs_d[None, None, :] * stride_sd)
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + half * stride_sd, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:
            out1 = x1 * cos1 + x2 * sin2
            out2 = x2 * cos2 - x1 * sin1
        else:
            out1 = x1 * cos1 - x2 * sin1
            out2 = x2 * cos2 + x1 * sin2
        dst = (dst_ptr + offs_t[:, None, None] * stride_dt + offs_h[None, :, None] * stride_dh
               + offs_d[None, None, :])
        tl.store(dst, out1.to(dst_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + half, out2.to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["tokens"])
def rope_kernel(q_ptr, q_out_ptr, k_ptr, k_out_ptr, cos_ptr, sin_ptr, tokens, heads, kv_heads,
                half, stride_qt, stride_qh, stride_qd, stride_qot, stride_qoh, stride_kt, stride_kh,
                stride_kd, stride_kot, stride_koh, stride_ct, stride_st,
                BACKWARD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                BLOCK_HALF: tl.constexpr):
    """q [tokens, heads, 2 * half] -> q_out and k [tokens, kv_heads, 2 * half] -> k_out
    (kv_heads may be 0: one tensor). The outputs' last dimension is contiguous."""
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_HALF)
    t_ok = offs_t < tokens
    d_ok = offs_d < half
    cs_mask = t_ok[:, None] & d_ok[None, :]
    cos = cos_ptr + offs_t[:, None] * stride_ct + offs_d[None, :]
    sin = sin_ptr + offs_t[:, None] * stride_st + offs_d[None, :]
    # The tokens' tables, read once for all of q's and k's heads: [BLOCK_T, 1, BLOCK_HALF].
    cos1 = tl.load(cos, mask=cs_mask, other=0.0).to(tl.float32)[:, None, :]
    cos2 = tl.load(cos + half, mask=cs_mask, other=0.0).to(tl.float32)[:, None, :]
    sin1 = tl.load(sin, mask=cs_mask, other=0.0).to(tl.float32)[:, None, :]
    sin2 = tl.load(sin + half, mask=cs_mask, other=0.0).to(tl.float32)[:, None, :]
    _rotate_heads(q_ptr, q_out_ptr, heads, half, offs_t, t_ok, offs_d, d_ok, cos1, cos2, sin1,
                  sin2, stride_qt, stride_qh, stride_qd, stride_qot, stride_qoh, BACKWARD, BLOCK_H)
    _rotate_heads(k_ptr, k_out_ptr, kv_heads, half, offs_t, t_ok, offs_d, d_ok, cos1, cos2, sin1,
                  sin2, stride_kt, stride_kh, stride_kd, stride_kot, stride_koh, BACKWARD,
                  BLOCK_H)


def launch_config(heads: int, head_dim: int) -> dict:
    """The tiles for a launch whose smaller head count (of q's and k's, or the one tensor's) is
    ``heads``: BLOCK_H heads (so k's heads of a GQA model fill the block) times BLOCK_T tokens,
    16 rows of BLOCK_HALF in all."""
    block_h = min(triton.next_power_of_2(max(heads, 1)), 16)
    return {"BLOCK_T": 16 // block_h, "BLOCK_H": block_h,
            "BLOCK_HALF": max(triton.next_power_of_2(head_dim // 2), 8), "num_warps": 4}


def _launch(q, q_out, k, k_out, cos, sin, backward):
    """Rotate q -> q_out and (unless k is None) k -> k_out; the outputs' last dimension must be
    contiguous, the inputs' may have any stride."""
    tokens, heads, head_dim = q.shape
    kv_heads = 0 if k is None else k.shape[1]
    if k is None:
        k, k_out = q, q_out
    counts = [h for h in (heads, kv_heads) if h]
    if tokens == 0 or not counts:
        return
    config = launch_config(min(counts), head_dim)
    grid = (triton.cdiv(tokens, config["BLOCK_T"]),)
    rope_kernel[grid](q, q_out, k, k_out, cos, sin, tokens, heads, kv_heads, head_dim // 2,
                      q.stride(0), q.stride(1), q.stride(2), q_out.stride(0), q_out.stride(1),
                      k.stride(0), k.stride(1), k.stride(2), k_out.stride(0), k_out.stride(1),
                      cos.stride(0), sin.stride(0), BACKWARD=backward, **config)


class _Rotated(torch.autograd.Function):
    # Autograd's record of one tensor rotated in place (see the module docstring): the rotation
    # itself is apply_rotary_'s single launch for q and k, right after both applies.
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin)
        ctx.set_materialize_grads(False)
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        if grad is None:
            return None, None, None
        cos, sin = ctx.saved_tensors
        out = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
        _launch(grad, out, None, None, cos, sin, True)
        return out, None, None


def apply_rotary_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q [T, Hq, D] and k [T, Hkv, D] in place, in one launch, with per-token cos/sin
    [T, D]; returns (q, k). Inputs are assumed checked (cptfast.ops does: last dimensions
    contiguous, D even)."""
    cos, sin = cos.contiguous(), sin.contiguous()
    q, k = _Rotated.apply(q, cos, sin), _Rotated.apply(k, cos, sin)
    _launch(q, q, k, k, cos, sin, False)
    return q, k
