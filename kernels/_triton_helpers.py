"""Triton helpers more than one kernel file uses: whether the interpreter runs the kernels, the
soft cap c·tanh(x/c), and whether tl.dot takes fp32 operands."""

from . import _guard  # noqa: F401  (only importable as cptfast.kernels)

import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (the CPU test path)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def fp32_dot(dtype: torch.dtype) -> bool:
    """The FP32_DOT flag: tl.dot on fp32 operands, for fp32 inputs and under the interpreter
    (which computes bf16 arithmetic on raw bits)."""
    return interpreting() or dtype == torch.float32


@triton.jit
def tanh(a):
    # 1 - 2 / (exp(2a) + 1): exact limits at +-inf; tl has no tanh and libdevice is not
    # available under the interpreter.
    return 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)


@triton.jit
def capped(x, softcap, HAS_SOFTCAP: tl.constexpr):
    """softcap * tanh(x / softcap) with HAS_SOFTCAP, else x."""
    if HAS_SOFTCAP:
        x = softcap * tanh(x / softcap)
    return x
