"""Kernels whose speed is known, to check the static performance model (cptfast.perf_model)
against: not used by training.

- ``matmul`` with 128 x 128 x 64 tiles and 4 stages is the textbook tiling of Triton's matmul
  tutorial, which reaches cuBLAS-class throughput on A100 and H100: the model must rate it high.
- ``matmul`` with 16 x 16 tiles wastes the tensor cores (a 16 x 16 tile is one m16n8k16 pair per
  warp, with a load for every multiply): the model must rate it low.
- ``copy`` moves memory and computes nothing: bandwidth-bound, the model must say "memory".
"""

from . import _guard  # noqa: F401  (only importable as cptfast.kernels)

import torch
import triton
import triton.language as tl


@triton.jit
def matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                  stride_cm, stride_cn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] + k < K), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] + k < K) & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def copy_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    start = tl.program_id(0) * BLOCK
    step = tl.num_programs(0) * BLOCK
    for offset in range(start, n, step):  # a loop, so the model has a hot loop to read
        offs = offset + tl.arange(0, BLOCK)
        tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=offs < n), mask=offs < n)


def matmul(a: torch.Tensor, b: torch.Tensor, *, block_m: int, block_n: int, block_k: int,
           num_warps: int, num_stages: int) -> torch.Tensor:
    """a [M, K] @ b [K, N] in a's dtype, fp32 accumulation."""
    (m, k), n = a.shape, b.shape[1]
    c = torch.empty((m, n), dtype=a.dtype, device=a.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    matmul_kernel[grid](a, b, c, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                        c.stride(0), c.stride(1), BLOCK_M=block_m, BLOCK_N=block_n,
                        BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)
    return c


def copy(x: torch.Tensor, *, programs: int = 1024) -> torch.Tensor:
    """A copy of the contiguous x."""
    out = torch.empty_like(x)
    block = 4096
    grid = (min(programs, triton.cdiv(x.numel(), block)),)
    copy_kernel[grid](x, out, x.numel(), BLOCK=block, num_warps=8)
    return out
