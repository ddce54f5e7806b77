"""Rotary position embeddings applied in place to packed q [T, Hq, D] and k [T, Hkv, D].

The `transformers` Llama convention: with per-token tables cos, sin [T, D] (what its rotary
embedding module returns for the batch's position_ids, which restart at 0 in every packed
document), x1 = x[..., :D/2] and x2 = x[..., D/2:],
    out1 = x1 * cos1 - x2 * sin1,    out2 = x2 * cos2 + x1 * sin2
(i.e. x * cos + rotate_half(x) * sin). The backward applies the transposed rotation,
    g1 * cos1 + g2 * sin2,           g2 * cos2 - g1 * sin1.
One program per (token, block of heads) reads the token's cos/sin once. Math in fp32.
"""

from . import _guard  # noqa: F401  (only importable as cptfast.kernels)

import torch
import triton
import triton.language as tl


@triton.jit
def rope_kernel(x_ptr, cos_ptr, sin_ptr, heads, half, stride_xt, stride_xh, stride_ct,
                stride_st, BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr,
                BLOCK_HALF: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    d_ok = offs_d < half
    cos1 = tl.load(cos_ptr + token * stride_ct + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + token * stride_ct + half + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + token * stride_st + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + token * stride_st + half + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    mask = (offs_h < heads)[:, None] & d_ok[None, :]
    first = x_ptr + token * stride_xt + offs_h[:, None] * stride_xh + offs_d[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + half, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        out1 = x1 * cos1[None, :] + x2 * sin2[None, :]
        out2 = x2 * cos2[None, :] - x1 * sin1[None, :]
    else:
        out1 = x1 * cos1[None, :] - x2 * sin1[None, :]
        out2 = x2 * cos2[None, :] + x1 * sin2[None, :]
    tl.store(first, out1.to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(first + half, out2.to(x_ptr.dtype.element_ty), mask=mask)


def launch_config(heads: int, head_dim: int) -> dict:
    return {"BLOCK_H": min(triton.next_power_of_2(heads), 16),
            "BLOCK_HALF": max(triton.next_power_of_2(head_dim // 2), 8), "num_warps": 4}




def rotate_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool = False):
    """Rotate x [T, H, D] in place (its last dimension must be contiguous)."""
    tokens, heads, head_dim = x.shape
    if tokens == 0 or heads == 0:
        return x
    config = launch_config(heads, head_dim)
    grid = (tokens, triton.cdiv(heads, config["BLOCK_H"]))
    rope_kernel[grid](x, cos, sin, heads, head_dim // 2, x.stride(0), x.stride(1),
                      cos.stride(0), sin.stride(0), BACKWARD=backward, **config)
    return x


class _RotaryInPlace(torch.autograd.Function):
    # One tensor per Function: autograd allows an in-place Function on a view (q and k are
    # usually views of the projections) only when it returns a single tensor.
    @staticmethod
    def forward(ctx, x, cos, sin):
        rotate_(x, cos, sin)
        ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin)
        return x

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        grad = grad.clone(memory_format=torch.contiguous_format)
        return rotate_(grad, cos, sin, True), None, None


def apply_rotary_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q and k in place with per-token cos/sin [T, D]; returns (q, k). Inputs are
    assumed checked (cptfast.ops does)."""
    cos, sin = cos.contiguous(), sin.contiguous()
    return _RotaryInPlace.apply(q, cos, sin), _RotaryInPlace.apply(k, cos, sin)
