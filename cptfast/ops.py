"""One public function per operation; each checks its inputs and picks an implementation:
the Triton kernel (cptfast.kernels) for CUDA tensors, the pure-PyTorch reference
(cptfast.reference) for CPU tensors. ``CPTFAST_BACKEND=triton|torch`` forces a choice (the
tests run the Triton kernels on the CPU through the interpreter this way).
"""

from __future__ import annotations

import os

import torch

from cptfast import reference

BACKENDS = ("triton", "torch")


def backend_for(tensor: torch.Tensor) -> str:
    """The implementation an operation on ``tensor`` uses."""
    forced = os.environ.get("CPTFAST_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"CPTFAST_BACKEND must be one of {BACKENDS}, got {forced!r}")
        return forced
    return "triton" if tensor.is_cuda else "torch"


def _check_loss_options(label_smoothing: float, z_loss: float, softcap: float | None,
                        reduction: str) -> None:
    if reduction not in reference.REDUCTIONS:
        raise ValueError(f"reduction must be one of {reference.REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
    if z_loss < 0:
        raise ValueError(f"z_loss must be non-negative, got {z_loss}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive (or None), got {softcap}")


def _check_labels(labels: torch.Tensor, rows: int, vocab: int, ignore_index: int) -> None:
    """Labels are integers, one per row, each in [0, vocab) or ignore_index.

    On the CPU the range check is exact and raises ValueError. On a GPU, and under
    torch.compile, it is an asynchronous assertion instead (no host synchronisation, no graph
    break): a bad label fails loudly when the assertion runs.
    """
    if labels.dim() != 1 or labels.shape[0] != rows:
        raise ValueError(f"labels must have shape [{rows}] (one per row, already aligned with "
                         f"the rows: no shift inside), got {list(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if labels.is_cuda or torch.compiler.is_compiling():
        torch._assert_async(~bad.any(), "cptfast: a label is outside [0, vocab) and is not "
                                        "ignore_index")
    elif bad.any():
        first = int(bad.nonzero()[0, 0])
        raise ValueError(f"label {int(labels[first])} at row {first} is outside [0, {vocab}) "
                         f"and is not ignore_index ({ignore_index}); check the tokenizer / "
                         "vocabulary size or mark the row with ignore_index")


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                  label_smoothing: float = 0.0, z_loss: float = 0.0,
                  softcap: float | None = None, reduction: str = "mean",
                  return_lse: bool = False):
    """Cross-entropy of ``logits`` [N, V] (fp32/bf16/fp16; math in fp32) against ``labels``
    [N] (int, aligned with the rows; ``ignore_index`` rows count as 0).

    ``softcap`` applies c·tanh(x/c) first; ``label_smoothing`` as in
    ``torch.nn.functional.cross_entropy``; ``z_loss`` adds z_loss·lse² per counted row.
    ``reduction``: "mean" over counted rows (0 with zero gradients when none are counted),
    "sum", or "none" (per row, 0 where ignored). With ``return_lse`` also returns the fp32
    log-sum-exp of every row. Returns an fp32 loss.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got shape {list(logits.shape)}")
    _check_loss_options(label_smoothing, z_loss, softcap, reduction)
    _check_labels(labels, logits.shape[0], logits.shape[1], ignore_index)
    options = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
                   softcap=softcap, reduction=reduction, return_lse=return_lse)
    if backend_for(logits) == "triton":
        from cptfast.kernels.cross_entropy import cross_entropy as triton_cross_entropy
        return triton_cross_entropy(logits, labels, **options)
    return reference.cross_entropy(logits, labels, **options)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                               labels: torch.Tensor, *, bias: torch.Tensor | None = None,
                               ignore_index: int = -100, label_smoothing: float = 0.0,
                               z_loss: float = 0.0, softcap: float | None = None,
                               reduction: str = "mean", return_lse: bool = False):
    """Cross-entropy of ``hidden`` [N, H] @ ``weight`` [V, H].T (+ ``bias`` [V]) against
    ``labels`` [N] without materialising the [N, V] logits; semantics as
    :func:`cross_entropy`. ``weight`` may be tied to the input embedding."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"need hidden [N, H] and weight [V, H], got {list(hidden.shape)} and "
                         f"{list(weight.shape)}")
    if bias is not None and list(bias.shape) != [weight.shape[0]]:
        raise ValueError(f"bias must have shape [{weight.shape[0]}], got {list(bias.shape)}")
    _check_loss_options(label_smoothing, z_loss, softcap, reduction)
    _check_labels(labels, hidden.shape[0], weight.shape[0], ignore_index)
    options = dict(bias=bias, ignore_index=ignore_index, label_smoothing=label_smoothing,
                   z_loss=z_loss, softcap=softcap, reduction=reduction, return_lse=return_lse)
    if backend_for(hidden) == "triton":
        from cptfast.kernels.fused_linear_cross_entropy import \
            fused_linear_cross_entropy as triton_fused
        return triton_fused(hidden, weight, labels, **options)
    return reference.fused_linear_cross_entropy(hidden, weight, labels, **options)


def _check_attention(q, k, v, cu_seqlens, max_seqlen, window) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k, v must be [tokens, heads, head_dim], got shapes "
                         f"{list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"k and v must match each other and q in tokens and head_dim, got "
                         f"q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads "
                         f"({k.shape[1]}) for grouped-query attention")
    if q.shape[2] > 256:
        raise ValueError(f"head_dim {q.shape[2]} is above the supported 256")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(f"q, k, v must share one float dtype, got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    if window is not None and window < 0:
        raise ValueError(f"window must be a non-negative number of tokens, got {window}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype != torch.int32:
        raise ValueError("cu_seqlens must be a 1-D int32 tensor [documents + 1] of document "
                         f"boundaries, got {cu_seqlens.dtype} of shape {list(cu_seqlens.shape)}")
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    tokens = q.shape[0]
    if cu_seqlens.is_cuda or torch.compiler.is_compiling():  # no host synchronisation
        torch._assert_async((cu_seqlens[0] == 0) & (cu_seqlens[-1] == tokens)
                            & (lengths >= 0).all() & (lengths <= max_seqlen).all(),
                            "cptfast: cu_seqlens or max_seqlen is inconsistent with q")
        return
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != tokens:
        raise ValueError(f"cu_seqlens must start at 0 and end at the number of tokens "
                         f"({tokens}), got {bounds[0]} ... {bounds[-1]}")
    if (lengths < 0).any():
        raise ValueError("cu_seqlens must be non-decreasing (documents cannot have negative "
                         "length)")
    if int(lengths.max()) > max_seqlen:
        raise ValueError(f"max_seqlen {max_seqlen} is smaller than the longest document "
                         f"({int(lengths.max())} tokens); pass the longest document's length")


ATTENTION_IMPLEMENTATIONS = ("cptfast", "flash_attn")


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens: torch.Tensor, max_seqlen: int, *, causal: bool = True,
                     softmax_scale: float | None = None, window: int | None = None,
                     softcap: float | None = None,
                     implementation: str = "cptfast") -> torch.Tensor:
    """Attention over packed documents: ``q`` [T, Hq, D], ``k``/``v`` [T, Hkv, D] (Hq a
    multiple of Hkv, D <= 256), document d = tokens ``cu_seqlens[d]:cu_seqlens[d+1]`` (int32),
    ``max_seqlen`` >= the longest document. Query i sees key j of its own document when j <= i
    (``causal``) and i - j <= ``window`` (if set: itself and ``window`` tokens before);
    ``softcap`` c turns the scaled scores s into c·tanh(s/c) (Gemma 2). Returns [T, Hq, D].
    ``implementation``: "cptfast" (Triton on CUDA, the per-document reference on the CPU) or
    "flash_attn" (flash-attn's varlen kernel: CUDA, with the package installed)."""
    _check_attention(q, k, v, cu_seqlens, max_seqlen, window)
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {', '.join(ATTENTION_IMPLEMENTATIONS)}, "
                         f"got {implementation!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive (or None), got {softcap}")
    options = dict(causal=causal, softmax_scale=softmax_scale, window=window, softcap=softcap)
    if implementation == "flash_attn":
        if not q.is_cuda:
            raise ValueError("implementation=\"flash_attn\" runs on CUDA tensors only; "
                             "\"cptfast\" runs everywhere")
        return _flash_attn_varlen(q, k, v, cu_seqlens, max_seqlen, **options)
    if backend_for(q) == "triton":
        from cptfast.kernels.attention import varlen_attention as triton_attention
        return triton_attention(q, k, v, cu_seqlens, max_seqlen, **options)
    return reference.varlen_attention(q, k, v, cu_seqlens, max_seqlen, **options)


def _flash_attn_varlen(q, k, v, cu_seqlens, max_seqlen, *, causal, softmax_scale, window,
                       softcap=None):
    """flash-attn's varlen function with our arguments: same packing (one cu_seqlens for
    queries and keys); our left window w is its window_size (w, 0) (right side unbounded, -1,
    when not causal)."""
    try:
        from flash_attn import flash_attn_varlen_func  # optional extra: cptfast[gpu]
    except ImportError as error:
        raise ImportError("attention implementation \"flash_attn\" needs the flash-attn "
                          "package: pip install 'cptfast[gpu]' on a CUDA machine, or use "
                          "\"cptfast\" (cptfast's Triton kernel)") from error
    return flash_attn_varlen_func(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=causal,
        softmax_scale=softmax_scale, softcap=softcap or 0.0,
        window_size=(window if window is not None else -1, 0 if causal else -1))


def apply_rotary_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotary position embeddings applied in place to packed ``q`` [T, Hq, D] and ``k``
    [T, Hkv, D] with per-token ``cos``, ``sin`` [T, D] — what a transformers rotary embedding
    returns for the batch's position_ids (restarting at 0 in every document), squeezed to
    [T, D]. Same convention as transformers' apply_rotary_pos_emb. Returns (q, k)."""
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"need q [T, Hq, D] and k [T, Hkv, D], got {list(q.shape)} and "
                         f"{list(k.shape)}")
    tokens, head_dim = q.shape[0], q.shape[2]
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
    if list(cos.shape) != [tokens, head_dim] or cos.shape != sin.shape:
        raise ValueError(f"cos and sin must be [T, D] = [{tokens}, {head_dim}], got "
                         f"{list(cos.shape)} and {list(sin.shape)}")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("q and k must be contiguous in their last dimension (rotated in place)")
    if backend_for(q) == "triton":
        from cptfast.kernels.rope import apply_rotary_ as triton_rotary
        return triton_rotary(q, k, cos.float(), sin.float())
    return reference.apply_rotary_(q, k, cos, sin)
