"""Fused linear cross-entropy: the loss of hidden [N, H] @ weight[V, H].T (+ bias) without
the [N, V] logits in memory, exact (nothing filtered or skipped).

Two paths, each where it is cheapest:

- Loss only (no gradient wanted, or reduction "none" whose backward weights are unknown until
  the backward): a Triton kernel in the manner of Cut Cross-Entropy, on a 2-D grid of (block
  of BLOCK_N rows) x (vocabulary split). A split is a contiguous run of BLOCK_V tiles; the
  wrapper picks how many so the grid fills the GPU in about whole waves (one block of rows alone
  walking all of V would leave most SMs idle at a few thousand tokens). Each tile of logits
  lives only in registers (tl.dot over H in BLOCK_H steps, tensor cores, wgmma on sm_90),
  soft-capped and folded into the split's running max / sum of exponentials, the sum of the
  logits (label smoothing), the label's logit (if the label is in the split) and a NaN count;
  these five per-row partials go to small fp32 [splits, N] buffers. The grid is launched
  flat, ordered in groups of GROUP_N row blocks, so the programs running together share a few
  hidden blocks and weight tiles in L2. A log-sum-exp merge over the splits (torch ops on the
  partials, no host sync) gives each row's lse and loss.
- Gradients: rows in chunks sized from a memory budget. Each chunk's logits go into one
  reusable buffer (cuBLAS), the cross-entropy kernel (cross_entropy.py) turns them into their
  gradient in place, and that becomes the chunk's part of grad_hidden (g @ weight), of
  grad_weight (+= g.T @ hidden, fp32) and of grad_bias. Three matmuls in all, the minimum,
  with no atomics; for "mean"/"sum" this runs inside the forward and the backward is a scale,
  for "none" it runs in the backward with each row's incoming gradient.

(A tile kernel for the gradients too needs fp32 atomics for every (row block, vocabulary
tile) into both grad_hidden and grad_weight — about N*V*H/32 atomic adds each at BLOCK=64 —
plus a fourth matmul; it was written, tested exact, and dropped as slower.)

Under autocast the loss behaves as ``lm_head`` (an nn.Linear) would: the public wrapper reads the
autocast state of the inputs' device type (an autograd.Function cannot see it reliably in its
backward) and the Function casts hidden, weight and bias to the autocast dtype once per call, as
autocast casts the inputs of a linear, not once per chunk; inside, autocast is off, so every GEMM
runs in that dtype and the softmax / cross-entropy math stays in fp32. The gradients go back in
the original dtypes (an fp32 weight gets its fp32 accumulator as it is, never rounded to bf16 on
the way, which a cast outside the Function would do in its backward). grad_weight accumulates in
fp32 in place: aten::addmm.dtype_out (a bf16/fp16 GEMM written straight into the fp32
accumulator, beta = 1) where torch has that kernel (CUDA); torch 2.13 has none for the CPU, so
there the GEMM takes fp32 copies of its chunk-sized operands (bf16/fp16 values and their products
are exact in fp32: the same numbers). Which one is looked up once per device type in the
dispatcher (`fp32_out_gemm`), never by catching an error.
"""

from . import _guard  # noqa: F401  (only importable as cptfast.kernels)

import functools

import torch
import triton
import triton.language as tl

from ._autocast import autocast_cast, autocast_dtype, no_autocast
from ._autograd import (LossOptions, accumulate, counted_rows, in_dtypes, mean_scale, reduce,
                        rows_per_chunk, scale_saved_gradients)
from ._triton_helpers import capped, fp32_dot
from .cross_entropy import cross_entropy_rows


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
    return capped(acc, softcap, HAS_SOFTCAP)


# The split arguments are not specialised: they depend on the GPU's SM count, and a value that
# happened to be 1 or a multiple of 16 would compile a variant of its own.
@triton.jit(do_not_specialize=["n_splits", "tiles_per_split"])
def fused_linear_cross_entropy_forward_kernel(
    hidden_ptr, weight_ptr, bias_ptr, labels_ptr, partials_ptr, n_rows, vocab, hidden_size,
    stride_hn, stride_hh, stride_wv, stride_wh, n_splits, tiles_per_split, ignore_index, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
):
    """Partials of one (row block, vocabulary split): partials[k, split, row] for k = running
    max, sum of exp(z - max), sum of z, the label's z (0 if not in this split), NaN count."""
    # The (row block, split) grid, flattened so its order can be chosen: ids run down GROUP_N
    # row blocks, then on to the next split. A wave in flight then holds about GROUP_N hidden
    # blocks (each re-read for every tile: L2 keeps them) and each weight tile it reads is read
    # by GROUP_N programs at about the same time (from HBM once).
    pid = tl.program_id(0)
    per_group = GROUP_N * n_splits
    first_block = (pid // per_group) * GROUP_N
    group_blocks = tl.minimum(tl.cdiv(n_rows, BLOCK_N) - first_block, GROUP_N)
    row_block = first_block + (pid % per_group) % group_blocks
    split = (pid % per_group) // group_blocks

    rows = row_block.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    v_begin = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, vocab)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    sum_exp = tl.zeros((BLOCK_N,), tl.float32)
    sum_z = tl.zeros((BLOCK_N,), tl.float32)
    z_label = tl.zeros((BLOCK_N,), tl.float32)
    nans = tl.zeros((BLOCK_N,), tl.int32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
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
    plane = n_splits.to(tl.int64) * n_rows
    out = partials_ptr + split.to(tl.int64) * n_rows + rows
    tl.store(out, m, mask=row_ok)
    tl.store(out + plane, sum_exp, mask=row_ok)
    tl.store(out + 2 * plane, sum_z, mask=row_ok)
    tl.store(out + 3 * plane, z_label, mask=row_ok)
    tl.store(out + 4 * plane, nans.to(tl.float32), mask=row_ok)


def launch_config(hidden_size: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Tile sizes and warps of the tile kernel. Compiled as it runs (unit strides are
    constants, so the loads vectorise), 128 x 128 logit tiles with BLOCK_H = 32 and 8 warps fit
    in registers for bf16/fp16 on sm_80 and sm_90 and are tensor-bound in the static model
    (bound 1.00 against 0.50 / 0.65 for 64 x 64); fp32 tiles are twice the bytes and spill at
    that size on sm_80, so fp32 keeps 64 x 64 (`cptfast doctor` checks what ships). GROUP_N
    row blocks share the weight tiles in L2 (8 hidden blocks of 128 rows: 8 MiB at H = 4096)."""
    if dtype == torch.float32:
        return {"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_H": 32, "GROUP_N": 8, "num_warps": 8}
    return {"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_H": 32, "GROUP_N": 8, "num_warps": 8}


# A split is at least this many BLOCK_V tiles: each split costs five partials per row, and a
# short one spends more of its time on the label load and the stores than on its tiles.
MIN_SPLIT_TILES = 8
# Where there is no CUDA device to ask (meta tensors when compiling ahead of time, the CPU):
# an H100 / H200.
DEFAULT_PROCESSORS = 132


@functools.lru_cache(maxsize=None)
def _processors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_PROCESSORS


@functools.lru_cache(maxsize=4096)
def tiles_per_split(row_blocks: int, tiles: int, processors: int, group: int = 8,
                    min_tiles: int = MIN_SPLIT_TILES) -> int:
    """How many BLOCK_V tiles one split walks. Programs run about one per SM (a 128 x 128 tile
    kernel fills an SM's registers), in waves: the time is about waves x the longest split.
    At least processors / ``group`` splits (when V allows), so that one wave spans about
    ``group`` row blocks, whose hidden blocks then stay in L2; among those, the fewest splits
    within 2% of the best time (each split costs partials, and more programs gain little)."""
    most = max(1, tiles // min_tiles)
    fewest = min(triton.cdiv(processors, group), most)
    time = {}
    for splits in range(fewest, most + 1):
        length = triton.cdiv(tiles, splits)
        time[length] = triton.cdiv(row_blocks * triton.cdiv(tiles, length), processors) * length
    best = min(time.values())
    return max(length for length, t in time.items() if t <= 1.02 * best)


def _tile_losses(hidden, weight, bias, labels, options, split_tiles=None):
    """Per-row losses and lse from the tile kernel: no logits in memory. ``split_tiles``: the
    split length in BLOCK_V tiles (default: ``tiles_per_split`` for this device)."""
    (n, hidden_size), vocab = hidden.shape, weight.shape[0]
    if n == 0:
        empty = torch.empty(0, dtype=torch.float32, device=hidden.device)
        return empty, empty.clone()
    config = launch_config(hidden_size, hidden.dtype)
    row_blocks = triton.cdiv(n, config["BLOCK_N"])
    tiles = triton.cdiv(vocab, config["BLOCK_V"])
    split_tiles = min(split_tiles or tiles_per_split(row_blocks, tiles,
                                                     _processors(hidden.device),
                                                     config["GROUP_N"]), tiles)
    n_splits = triton.cdiv(tiles, split_tiles)
    partials = torch.empty((5, n_splits, n), dtype=torch.float32, device=hidden.device)
    fused_linear_cross_entropy_forward_kernel[(row_blocks * n_splits,)](
        hidden, weight, bias if bias is not None else hidden, labels, partials, n, vocab,
        hidden_size, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        n_splits, split_tiles, options.ignore_index, float(options.softcap or 1.0),
        HAS_BIAS=bias is not None, HAS_SOFTCAP=options.softcap is not None,
        FP32_DOT=fp32_dot(hidden.dtype), **config)
    return _merged_losses(partials, labels, vocab, options)


def _merged_losses(partials, labels, vocab, options):
    """Per-row losses and lse from the splits' partials [5, splits, N] (fp32): the exact
    log-sum-exp of the whole row, rescaling each split's sum to the largest max."""
    m, sum_exp, sum_z, z_label, nans = partials.unbind(0)
    top = m.amax(0)
    lse = top + torch.log((sum_exp * torch.exp(m - top)).sum(0))
    lse = lse.masked_fill(nans.sum(0) > 0, float("nan"))  # max/exp may have skipped a NaN
    smoothing, z_loss = float(options.label_smoothing), float(options.z_loss)
    loss = (1.0 - smoothing) * (lse - z_label.sum(0)) + z_loss * lse * lse
    loss = loss + smoothing * (lse - sum_z.sum(0) / vocab)
    return torch.where(labels != options.ignore_index, loss, 0.0), lse


def _chunk_gradients(hidden, weight, bias, labels, row_scale, options: LossOptions):
    """Per-row losses and lse, and the gradients of hidden, weight and bias of
    sum(row_scale * loss); row_scale (fp32) has one element or one per row."""
    n, vocab = hidden.shape[0], weight.shape[0]
    losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
    lse = torch.empty_like(losses)
    grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format)
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=weight.device) \
        if bias is not None else None
    per_row = row_scale.numel() > 1
    step = rows_per_chunk(vocab, hidden.element_size(), options.chunk_bytes, hidden.device)
    buffer = torch.empty((min(step, n), vocab), dtype=hidden.dtype, device=hidden.device)
    for start in range(0, n, step):
        rows = slice(start, start + step)
        logits = buffer[: min(step, n - start)]
        if bias is not None:
            torch.addmm(bias, hidden[rows], weight.T, out=logits)
        else:
            torch.mm(hidden[rows], weight.T, out=logits)
        losses[rows], lse[rows] = cross_entropy_rows(
            logits, labels[rows], row_scale[rows] if per_row else row_scale, options,
            grad=logits)
        grad = logits  # the kernel overwrote the logits with their (scaled) gradient
        torch.mm(grad, weight, out=grad_hidden[rows])
        accumulate(grad_weight, grad.T, counted_rows(hidden[rows], labels[rows],
                                                     options.ignore_index))
        if grad_bias is not None:
            grad_bias += grad.sum(dim=0, dtype=torch.float32)
    return losses, lse, (grad_hidden, grad_weight, grad_bias)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, options: LossOptions, compute_dtype):
        labels = labels.contiguous()
        need_grad = hidden.requires_grad or weight.requires_grad or (
            bias is not None and bias.requires_grad)
        scale = mean_scale(labels, options.ignore_index, options.reduction)
        ctx.options, ctx.has_bias = options, bias is not None
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.device_type = hidden.device.type
        with no_autocast(hidden.device.type):
            # Once per call, as autocast casts a linear's inputs (compute_dtype None: as is).
            hidden, weight, bias = (autocast_cast(t, compute_dtype)
                                    for t in (hidden, weight, bias))
            if need_grad and options.reduction != "none":
                losses, lse, grads = _chunk_gradients(hidden, weight, bias, labels, scale,
                                                      options)
                ctx.save_for_backward(*in_dtypes(grads, ctx.dtypes))
            else:
                losses, lse = _tile_losses(hidden, weight, bias, labels, options)
                ctx.save_for_backward(hidden, weight, labels, bias)
        ctx.mark_non_differentiable(lse)
        return reduce(losses, scale, options.reduction), lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        if ctx.options.reduction != "none":
            grad_hidden, grad_weight, grad_bias = scale_saved_gradients(
                ctx.options.reduction, grad_loss, *ctx.saved_tensors)
        else:
            hidden, weight, labels, bias = ctx.saved_tensors  # already in the compute dtype
            with no_autocast(ctx.device_type):
                _, _, grads = _chunk_gradients(hidden, weight, bias, labels,
                                               grad_loss.float().contiguous(), ctx.options)
            grad_hidden, grad_weight, grad_bias = in_dtypes(grads, ctx.dtypes)
        return (grad_hidden, grad_weight, None, grad_bias if ctx.has_bias else None,
                None, None)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               *, bias: torch.Tensor | None = None, ignore_index: int = -100,
                               label_smoothing: float = 0.0, z_loss: float = 0.0,
                               softcap: float | None = None, reduction: str = "mean",
                               return_lse: bool = False, chunk_bytes: int | None = None):
    """Cross-entropy of hidden [N, H] @ weight [V, H].T (+ bias [V]) against labels [N];
    semantics of cross_entropy.py; gradients in row chunks of about ``chunk_bytes`` of logits
    (default: cptfast.kernels._autograd.DEFAULT_CHUNK_BYTES). Under autocast the GEMMs run in
    the autocast dtype, as lm_head's would (see the module docstring); gradients come back in
    the inputs' dtypes. Inputs are assumed checked (cptfast.ops does)."""
    if not torch.is_grad_enabled():  # no gradient wanted, though the weights require one
        hidden, weight = hidden.detach(), weight.detach()
        bias = None if bias is None else bias.detach()
    options = LossOptions(ignore_index=ignore_index, label_smoothing=label_smoothing,
                          z_loss=z_loss, softcap=softcap, reduction=reduction,
                          chunk_bytes=chunk_bytes)
    loss, lse = _FusedLinearCrossEntropy.apply(hidden, weight, labels, bias, options,
                                               autocast_dtype(hidden.device.type))
    return (loss, lse) if return_lse else loss
