"""Autocast as the fused loss needs it, shared by the Triton path and cptfast.reference (torch
only): the dtype in force, turning it off inside an autograd Function, the cast autocast would
make for a matmul, and whether a half-precision GEMM can accumulate straight into fp32."""

from . import _guard  # noqa: F401  (only importable as cptfast.kernels)

import contextlib
import functools

import torch


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype in force for ``device_type``, or None when autocast is off there
    (or has no such device type: meta tensors, for one)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def no_autocast(device_type: str):
    """A context with autocast off for ``device_type`` (nothing to turn off where it has none)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def autocast_cast(tensor: torch.Tensor | None, dtype: torch.dtype | None):
    """``tensor`` as autocast hands it to a lower-precision op (mm, linear): a floating tensor
    other than fp64 in ``dtype``; anything else (and everything when ``dtype`` is None) as is."""
    if tensor is None or dtype is None or not tensor.is_floating_point() \
            or tensor.dtype in (dtype, torch.float64):
        return tensor
    return tensor.to(dtype)


@functools.cache
def fp32_out_gemm(device_type: str) -> bool:
    """Whether torch has aten::addmm.dtype_out (a bf16/fp16 GEMM accumulated straight into an
    fp32 tensor) for ``device_type``: CUDA builds of torch 2.13 do, its CPU build does not.
    Looked up once per device type in the dispatcher's kernel table."""
    key = {"cuda": "CUDA", "cpu": "CPU"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "aten::addmm.dtype_out", key)
