"""What the Triton autograd Functions and cptfast.reference's share (torch only, so both sides
may import it: kernels/ is the lowest layer): the options a loss or an attention call carries
through its Function, the chunk budget of the row-chunked losses, and the loss helpers whose
behaviour must not differ between the two implementations."""

from . import _guard  # noqa: F401  (only importable as cptfast.kernels)

import dataclasses

import torch

from ._autocast import fp32_out_gemm

REDUCTIONS = ("mean", "sum", "none")

# One chunk of logits, in the logits' dtype. The chunk's rows are the K of the grad_weight GEMM
# (V x H, fp32, += g.T @ hidden), which reads and writes its 8-byte fp32 accumulator once per
# chunk: about 2VHK FLOP over 8VH bytes, K/4 FLOP per byte. The bf16 ridge points (dense peak /
# HBM bandwidth) are ~156 (A100), ~206 (H200), ~295 (H100 SXM) FLOP/B, so K must pass ~1200 to
# be compute-bound at all on an H100 and ~2000 to be clear of it. 256 MiB gave K = 1046 at
# Llama 3's V = 128256 in bf16 (~250 FLOP/B: memory-bound on an H100); 1 GiB gives 4185 there,
# 2048 at Gemma's V = 262144 (~450 FLOP/B), for a transient buffer of 1 GiB (the logits of a
# whole 16k-token micro-batch at V = 128256 would be 4 GiB). On the CPU the GEMMs are compute-
# bound at any K and memory is what counts: 64 MiB. By device type; read at call time (through
# rows_per_chunk), so one assignment here changes it for both implementations.
DEFAULT_CHUNK_BYTES = {"cuda": 1 << 30, "cpu": 64 << 20}


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """The options of a (fused linear) cross-entropy, as one autograd Function argument.
    ``chunk_bytes`` None means DEFAULT_CHUNK_BYTES."""
    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    reduction: str = "mean"
    chunk_bytes: int | None = None


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
    """The options of a varlen attention call: ``scale`` is the softmax scale itself (the
    wrapper resolves the default 1 / sqrt(D)); ``window`` None means unbounded."""
    causal: bool = True
    scale: float = 1.0
    softcap: float | None = None
    window: int | None = None


def rows_per_chunk(vocab: int, itemsize: int, chunk_bytes: int | None,
                   device: torch.device) -> int:
    """Rows whose logits (``itemsize`` bytes each) fit in about ``chunk_bytes`` (None: the
    default of ``device``'s type)."""
    budget = chunk_bytes if chunk_bytes is not None else DEFAULT_CHUNK_BYTES.get(
        device.type, DEFAULT_CHUNK_BYTES["cpu"])
    return max(1, budget // (itemsize * max(vocab, 1)))


def mean_scale(labels: torch.Tensor, ignore_index: int, reduction: str,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[1]: 1 / counted rows for "mean" (1 when none are counted, so all-ignored gives 0), else
    1; computed on the device, so there is no host synchronisation."""
    if reduction != "mean":
        return torch.ones(1, dtype=dtype, device=labels.device)
    return 1.0 / (labels != ignore_index).sum().clamp(min=1).to(dtype).reshape(1)


def reduce(losses: torch.Tensor, scale: torch.Tensor, reduction: str) -> torch.Tensor:
    """The per-row losses reduced: as they are for "none", else their sum times ``scale``."""
    return losses if reduction == "none" else losses.sum() * scale[0]


def scale_saved_gradients(reduction: str, grad_loss: torch.Tensor, *grads):
    """The backward of a loss whose gradients the forward already computed: scale them in
    place, so each becomes its input's .grad without a copy of its size, and without testing
    for a unit scale (that would cost a GPU synchronisation). None passes through. A second
    backward through the same graph (retain_graph=True) is refused by autograd's saved-tensor
    version check rather than scaling twice."""
    if reduction == "none":
        grad_loss = grad_loss[:, None]
    return tuple(None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads)


def in_dtypes(grads, dtypes):
    """The gradients in their inputs' original dtypes (a no-op where they already are)."""
    return tuple(None if g is None else g.to(dtype) for g, dtype in zip(grads, dtypes))


def accumulate(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out (fp32/fp64) += a @ b in place, a and b in their own (possibly half) dtype: no
    temporary of out's size, no half-precision round trip of the sum. Without an fp32-output
    half GEMM on the device (the CPU in torch 2.13) the GEMM takes copies of the chunk-sized
    operands in out's dtype: half-precision values and their products are exact there."""
    if a.dtype == out.dtype:
        out.addmm_(a, b)
    elif fp32_out_gemm(out.device.type) and out.dtype == torch.float32:
        torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
    else:
        out.addmm_(a.to(out.dtype), b.to(out.dtype))


def counted_rows(hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """hidden with the rows of ignored labels zeroed: their gradient rows are zero, but a NaN
    or inf there would still reach grad_weight through grad.T @ hidden (0 * NaN is NaN)."""
    return hidden.masked_fill((labels == ignore_index)[:, None], 0)
