"""Flash attention over packed sequences: causal inside each document, nothing across them.

Inputs are packed: q [T, Hq, D], k and v [T, Hkv, D], with document d occupying tokens
cu_seqlens[d] .. cu_seqlens[d+1]. Query i of a document may see key j of the same document when
    j <= i (causal)   and   i - j <= window (optional left window: itself and `window` before),
and the output is softmax(q k^T * scale) v over those keys, computed block by block with an
online softmax in base 2 (exp2, the scale folded into one multiply-add per score; never the
[T, T] scores). Query head h reads key/value head h // (Hq / Hkv) (grouped-query attention).

Programs run over a work list, not a dense grid: the live (document, block) pairs built from
cu_seqlens on the device (`work_list`), costliest first, times the heads (the heads of one item
are neighbouring programs, so they share its keys and values in L2). A dense grid of
documents x cdiv(max_seqlen, BLOCK) would launch mostly empty programs for packed rows of short
documents. A program visits only the key blocks of its own document that hold at least one
visible key — the loop bounds are exactly the live tiles, which `live_tiles` computes without a
GPU and the COUNT_TILES flag lets a test read back from the kernel itself — in up to three
ranges: the blocks inside the window, below the diagonal and inside the document run without
any mask; only the ones at the window's edge, the diagonal and the document's end pay for it.

The backward recomputes the probabilities from the saved (base-2) log-sum-exp and is split into
a dk/dv kernel (one program per key block, looping over the query blocks and the query heads of
its group; at D = 256 it runs twice, once for dk and once for dv, to stay in registers) and a
dq kernel, so no atomics are needed and results are deterministic. Both read
delta = rowsum(do * o) ([Hq, T] fp32), which a preprocessing kernel computes in one pass over o
and do. Head dims up to 256 are padded to a power of two and masked.
"""

from . import _guard  # noqa: F401  (only importable as cptfast.kernels)

import contextlib
import contextvars

import torch
import triton
import triton.language as tl

from ._autograd import AttentionOptions
from ._triton_helpers import capped, fp32_dot


@triton.jit
def _document(cu_seqlens_ptr, work_ptr, item):
    """Document, block index, first token (int64, an offset into the packed tensors) and length
    of one work item; document -1 marks the padding items past the live ones."""
    doc = tl.load(work_ptr + 2 * item)
    block = tl.load(work_ptr + 2 * item + 1)
    safe = tl.maximum(doc, 0)
    start = tl.load(cu_seqlens_ptr + safe).to(tl.int64)
    length = (tl.load(cu_seqlens_ptr + safe + 1) - start).to(tl.int32)
    return doc, block, start, length


@triton.jit
def _aligned_count(first, last, BLOCK: tl.constexpr):
    """Blocks of BLOCK starting at first, first + BLOCK, ... and not after last (0 if none)."""
    return tl.where(last >= first, (last - first) // BLOCK + 1, 0)


@triton.jit
def _key_blocks(m_start, length, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The key blocks a query block starting at m_start visits, as three consecutive ranges of
    block starts: [lo, full_lo) and [full_hi, hi) need the mask, [full_lo, full_hi) holds only
    keys every query of the block sees (below the diagonal, inside the window and the
    document)."""
    hi = length
    if CAUSAL:
        hi = tl.minimum(length, m_start + BLOCK_M)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(m_start - window, 0) // BLOCK_N * BLOCK_N
    full_hi = length // BLOCK_N * BLOCK_N
    if CAUSAL:  # blocks ending at or before the block's first query
        full_hi = (m_start + 1) // BLOCK_N * BLOCK_N
    full_lo = lo
    if HAS_WINDOW:  # blocks starting no earlier than window before the block's last query
        last_query = tl.minimum(m_start + BLOCK_M, length) - 1
        first_key = tl.maximum(last_query - window, 0)
        full_lo = tl.minimum(tl.maximum((first_key + BLOCK_N - 1) // BLOCK_N * BLOCK_N, lo),
                             full_hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _query_blocks(n_start, length, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """_key_blocks from the other side: the query blocks a key block starting at n_start is
    seen by, as [lo, full_lo) masked, [full_lo, full_hi) unmasked, [full_hi, hi) masked."""
    lo = 0
    if CAUSAL:
        lo = n_start // BLOCK_M * BLOCK_M
    hi = length
    if HAS_WINDOW:
        hi = tl.minimum(length, n_start + BLOCK_N + window)
    end = lo + (hi - lo + BLOCK_M - 1) // BLOCK_M * BLOCK_M  # past the last block visited
    full_lo = lo
    if CAUSAL:  # query blocks whose first query is at or after the block's last key
        full_lo = tl.minimum((n_start + BLOCK_N - 1 + BLOCK_M - 1) // BLOCK_M * BLOCK_M, end)
    last_start = length - BLOCK_M  # whole blocks inside the document
    if HAS_WINDOW:  # whose last query sees the block's first key
        last_start = tl.minimum(last_start, n_start + window - BLOCK_M + 1)
    full_hi = full_lo + _aligned_count(full_lo, last_start, BLOCK_M) * BLOCK_M
    return lo, full_lo, full_hi, hi


@triton.jit
def _block_count(lo, full_lo, full_hi, hi, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    """(left, count) of one loop over the blocks of _key_blocks / _query_blocks: the unmasked
    ones [full_lo, full_hi), or (MASKED) the `left` ones before full_lo, then those from
    full_hi up to hi."""
    if MASKED:
        left = (full_lo - lo) // BLOCK
        count = left + (hi - full_hi + BLOCK - 1) // BLOCK
    else:
        left = 0
        count = (full_hi - full_lo) // BLOCK
    return left, count


@triton.jit
def _block_start(i, left, lo, full_lo, full_hi, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    """The first position of the i-th block of that loop."""
    start = full_lo + i * BLOCK
    if MASKED:
        start = tl.where(i < left, lo + i * BLOCK, full_hi + (i - left) * BLOCK)
    return start


@triton.jit
def _visible(offs_m, offs_n, length, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    ok = (offs_n[None, :] < length) & (offs_m[:, None] < length)
    if CAUSAL:
        ok &= offs_n[None, :] <= offs_m[:, None]
    if HAS_WINDOW:
        ok &= offs_m[:, None] - offs_n[None, :] <= window
    return ok


@triton.jit
def _visible_t(offs_m, offs_n, length, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """_visible transposed: [keys, queries]."""
    ok = (offs_n[:, None] < length) & (offs_m[None, :] < length)
    if CAUSAL:
        ok &= offs_n[:, None] <= offs_m[None, :]
    if HAS_WINDOW:
        ok &= offs_m[None, :] - offs_n[:, None] <= window
    return ok


@triton.jit
def _load_rows(ptr, start, offs, head, stride_t, stride_h, offs_d, mask, FP32_DOT: tl.constexpr):
    """Rows start + offs of one head of a packed [T, H, D] tensor, as a [rows, BLOCK_D] tile
    (fp32 under the interpreter, which computes bf16 arithmetic on raw bits)."""
    tile = tl.load(ptr + (start + offs)[:, None] * stride_t + head * stride_h + offs_d[None, :],
                   mask=mask, other=0.0)
    if FP32_DOT:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _scores(a, b, scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """(s, factor): the scores a @ b^T (soft-capped, with the scale, if there is a softcap) and
    the factor that makes them base-2 logits for exp2. Kept apart so that exp2(s * factor - m)
    is one fused multiply-add per score, the scale folded in."""
    s = tl.dot(a, tl.trans(b))
    if HAS_SOFTCAP:
        return capped(s * scale, softcap, True), 1.4426950408889634
    return s, scale * 1.4426950408889634


@triton.jit
def _kv_tile(i, left, lo, full_lo, full_hi, k_ptr, v_ptr, start, length, kv_head, stride_kt,
             stride_kh, stride_vt, stride_vh, offs_d, d_ok, MASKED: tl.constexpr,
             FP32_DOT: tl.constexpr, BLOCK_N: tl.constexpr):
    """The i-th key block of a loop over _key_blocks: (offs_n, k, v), the rows past the
    document's end masked only in a MASKED loop (the forward and dq share it)."""
    n_start = _block_start(i, left, lo, full_lo, full_hi, MASKED, BLOCK_N)
    offs_n = n_start + tl.arange(0, BLOCK_N)
    kv_mask = d_ok[None, :]
    if MASKED:
        kv_mask = kv_mask & (offs_n < length)[:, None]
    k = _load_rows(k_ptr, start, offs_n, kv_head, stride_kt, stride_kh, offs_d, kv_mask,
                   FP32_DOT)
    v = _load_rows(v_ptr, start, offs_n, kv_head, stride_vt, stride_vh, offs_d, kv_mask,
                   FP32_DOT)
    return offs_n, k, v


@triton.jit
def _forward_tiles(acc, l_i, m_i, tiles, q, k_ptr, v_ptr, start, lo, full_lo, full_hi, hi,
                   offs_m, length, window, kv_head, stride_kt, stride_kh, stride_vt, stride_vh,
                   offs_d, d_ok, scale, softcap, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                   HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, FP32_DOT: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """The online softmax over the key blocks of _key_blocks: the unmasked ones, or (MASKED)
    those at the window's edge, the diagonal and the document's end."""
    left, count = _block_count(lo, full_lo, full_hi, hi, MASKED, BLOCK_N)
    for i in range(count):
        offs_n, k, v = _kv_tile(i, left, lo, full_lo, full_hi, k_ptr, v_ptr, start, length,
                                kv_head, stride_kt, stride_kh, stride_vt, stride_vh, offs_d,
                                d_ok, MASKED, FP32_DOT, BLOCK_N)
        s, factor = _scores(q, k, scale, softcap, HAS_SOFTCAP)
        if MASKED:
            s = tl.where(_visible(offs_m, offs_n, length, window, CAUSAL, HAS_WINDOW), s,
                         float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * factor)  # base 2
        m_safe = m_new
        if MASKED:
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing yet
        p = tl.exp2(s * factor - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
        tiles += 1
    return acc, l_i, m_i, tiles


@triton.jit
def attention_forward_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cu_seqlens_ptr, work_ptr, tiles_ptr, heads, scale,
    softcap, window, head_dim, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ot, stride_oh, stride_lse_h, GROUP: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, COUNT_TILES: tl.constexpr,
    FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    program = tl.program_id(0)
    head = program % heads  # the heads of one work item are neighbours: they share K and V
    doc, m_block, start, length = _document(cu_seqlens_ptr, work_ptr, program // heads)
    if doc >= 0:
        kv_head = head // GROUP
        m_start = m_block * BLOCK_M
        offs_m = m_start + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < head_dim
        m_ok = offs_m < length
        q = _load_rows(q_ptr, start, offs_m, head, stride_qt, stride_qh, offs_d,
                       m_ok[:, None] & d_ok[None, :], FP32_DOT)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        tiles = 0
        lo, full_lo, full_hi, hi = _key_blocks(m_start, length, window, CAUSAL, HAS_WINDOW,
                                               BLOCK_M, BLOCK_N)
        for masked in tl.static_range(2):  # the unmasked blocks, then the masked ones
            acc, l_i, m_i, tiles = _forward_tiles(
                acc, l_i, m_i, tiles, q, k_ptr, v_ptr, start, lo, full_lo, full_hi, hi, offs_m,
                length, window, kv_head, stride_kt, stride_kh, stride_vt, stride_vh, offs_d,
                d_ok, scale, softcap, masked == 1, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, FP32_DOT,
                BLOCK_N)
        l_i = tl.where(l_i == 0.0, 1.0, l_i)  # padding rows past the document's end
        out = acc / l_i[:, None]
        tl.store(o_ptr + (start + offs_m)[:, None] * stride_ot + head * stride_oh
                 + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & d_ok[None, :])
        # The log-sum-exp in base 2, as the backward's exp2 takes it.
        tl.store(lse_ptr + head * stride_lse_h + start + offs_m, m_i + tl.log2(l_i), mask=m_ok)
        if COUNT_TILES:
            tl.store(tiles_ptr + program, tiles)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, start, lo, full_lo, full_hi,
                hi, offs_n, length, window, head, stride_qt, stride_qh, stride_dot, stride_doh,
                stride_lse_h, offs_d, d_ok, scale, softcap, MASKED: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                FP32_DOT: tl.constexpr, WANT_DK: tl.constexpr, WANT_DV: tl.constexpr,
                BLOCK_M: tl.constexpr):
    """One key block's dk and dv over the query blocks of _query_blocks of one query head,
    unmasked or MASKED."""
    left, count = _block_count(lo, full_lo, full_hi, hi, MASKED, BLOCK_M)
    for i in range(count):
        m_start = _block_start(i, left, lo, full_lo, full_hi, MASKED, BLOCK_M)
        offs_m = m_start + tl.arange(0, BLOCK_M)
        m_ok = offs_m < length
        q_mask = d_ok[None, :]
        if MASKED:
            q_mask = q_mask & m_ok[:, None]
        q = _load_rows(q_ptr, start, offs_m, head, stride_qt, stride_qh, offs_d, q_mask,
                       FP32_DOT)
        do = _load_rows(do_ptr, start, offs_m, head, stride_dot, stride_doh, offs_d, q_mask,
                        FP32_DOT)
        rows = lse_ptr + head * stride_lse_h + start + offs_m
        deltas = delta_ptr + head * stride_lse_h + start + offs_m
        if MASKED:
            lse = tl.load(rows, mask=m_ok, other=0.0)
            delta = tl.load(deltas, mask=m_ok, other=0.0)
        else:
            lse = tl.load(rows)
            delta = tl.load(deltas)
        # Transposed scores [keys, queries]: every product then has the key block as its M
        # dimension, so p^T and ds^T feed the next products without a layout change (and use
        # wgmma on sm_90).
        s_t, factor = _scores(k, q, scale, softcap, HAS_SOFTCAP)
        p_t = tl.exp2(s_t * factor - lse[None, :])
        if MASKED:
            p_t = tl.where(_visible_t(offs_m, offs_n, length, window, CAUSAL, HAS_WINDOW),
                           p_t, 0.0)
        if WANT_DV:
            dv += tl.dot(p_t.to(do.dtype), do)
        if WANT_DK:
            dp_t = tl.dot(v, tl.trans(do))
            ds_t = p_t * (dp_t - delta[None, :])
            if HAS_SOFTCAP:  # through c*tanh(x/c): times 1 - tanh^2
                ds_t *= 1.0 - (s_t / softcap) * (s_t / softcap)
            dk += tl.dot(ds_t.to(q.dtype), q)
    return dk, dv


@triton.jit
def attention_backward_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, cu_seqlens_ptr, work_ptr,
    heads, scale, softcap, window, head_dim, stride_qt, stride_qh, stride_kt, stride_kh,
    stride_vt, stride_vh, stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt,
    stride_dvh, stride_lse_h, GROUP: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, FP32_DOT: tl.constexpr,
    WANT_DK: tl.constexpr, WANT_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    program = tl.program_id(0)
    kv_head = program % heads  # heads: key/value heads here
    doc, n_block, start, length = _document(cu_seqlens_ptr, work_ptr, program // heads)
    if doc >= 0:
        n_start = n_block * BLOCK_N
        offs_n = n_start + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < head_dim
        kv_mask = (offs_n < length)[:, None] & d_ok[None, :]
        k = _load_rows(k_ptr, start, offs_n, kv_head, stride_kt, stride_kh, offs_d, kv_mask,
                       FP32_DOT)
        v = k
        if WANT_DK:
            v = _load_rows(v_ptr, start, offs_n, kv_head, stride_vt, stride_vh, offs_d,
                           kv_mask, FP32_DOT)
        dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        lo, full_lo, full_hi, hi = _query_blocks(n_start, length, window, CAUSAL, HAS_WINDOW,
                                                 BLOCK_M, BLOCK_N)
        # The launches for one gradient (D = 256) are register-bound: the unmasked loop's
        # values on top of the masked one's spill there, so they run one masked loop over all.
        ONE_LOOP: tl.constexpr = not (WANT_DK and WANT_DV)
        if ONE_LOOP:
            full_lo = lo
            full_hi = lo
        for g in range(GROUP):
            head = kv_head * GROUP + g
            for masked in tl.static_range(ONE_LOOP, 2):
                dk, dv = _dkdv_tiles(
                    dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, start, lo, full_lo,
                    full_hi, hi, offs_n, length, window, head, stride_qt, stride_qh,
                    stride_dot, stride_doh, stride_lse_h, offs_d, d_ok, scale, softcap,
                    masked == 1, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, FP32_DOT, WANT_DK, WANT_DV,
                    BLOCK_M)
        if WANT_DK:
            tl.store(dk_ptr + (start + offs_n)[:, None] * stride_dkt + kv_head * stride_dkh
                     + offs_d[None, :], (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
        if WANT_DV:
            tl.store(dv_ptr + (start + offs_n)[:, None] * stride_dvt + kv_head * stride_dvh
                     + offs_d[None, :], dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, k_ptr, v_ptr, start, lo, full_lo, full_hi, hi, offs_m,
              length, window, kv_head, stride_kt, stride_kh, stride_vt, stride_vh, offs_d, d_ok,
              scale, softcap, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
              HAS_SOFTCAP: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_N: tl.constexpr):
    """One query block's dq over the key blocks of _key_blocks, unmasked or MASKED."""
    left, count = _block_count(lo, full_lo, full_hi, hi, MASKED, BLOCK_N)
    for i in range(count):
        offs_n, k, v = _kv_tile(i, left, lo, full_lo, full_hi, k_ptr, v_ptr, start, length,
                                kv_head, stride_kt, stride_kh, stride_vt, stride_vh, offs_d,
                                d_ok, MASKED, FP32_DOT, BLOCK_N)
        s, factor = _scores(q, k, scale, softcap, HAS_SOFTCAP)
        p = tl.exp2(s * factor - lse[:, None])
        if MASKED:
            p = tl.where(_visible(offs_m, offs_n, length, window, CAUSAL, HAS_WINDOW), p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds *= 1.0 - (s / softcap) * (s / softcap)
        dq += tl.dot(ds.to(k.dtype), k)
    return dq


@triton.jit
def attention_backward_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, cu_seqlens_ptr, work_ptr, heads,
    scale, softcap, window, head_dim, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
    stride_vh, stride_dot, stride_doh, stride_dqt, stride_dqh, stride_lse_h,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    program = tl.program_id(0)
    head = program % heads
    doc, m_block, start, length = _document(cu_seqlens_ptr, work_ptr, program // heads)
    if doc >= 0:
        kv_head = head // GROUP
        m_start = m_block * BLOCK_M
        offs_m = m_start + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < head_dim
        m_ok = offs_m < length
        q_mask = m_ok[:, None] & d_ok[None, :]
        q = _load_rows(q_ptr, start, offs_m, head, stride_qt, stride_qh, offs_d, q_mask, FP32_DOT)
        do = _load_rows(do_ptr, start, offs_m, head, stride_dot, stride_doh, offs_d, q_mask,
                        FP32_DOT)
        lse = tl.load(lse_ptr + head * stride_lse_h + start + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(delta_ptr + head * stride_lse_h + start + offs_m, mask=m_ok, other=0.0)
        dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        lo, full_lo, full_hi, hi = _key_blocks(m_start, length, window, CAUSAL, HAS_WINDOW,
                                               BLOCK_M, BLOCK_N)
        for masked in tl.static_range(2):
            dq = _dq_tiles(dq, q, do, lse, delta, k_ptr, v_ptr, start, lo, full_lo, full_hi, hi,
                           offs_m, length, window, kv_head, stride_kt, stride_kh, stride_vt,
                           stride_vh, offs_d, d_ok, scale, softcap, masked == 1, CAUSAL,
                           HAS_WINDOW, HAS_SOFTCAP, FP32_DOT, BLOCK_N)
        tl.store(dq_ptr + (start + offs_m)[:, None] * stride_dqt + head * stride_dqh
                 + offs_d[None, :], (dq * scale).to(dq_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def backward_delta_kernel(
    o_ptr, do_ptr, delta_ptr, tokens, head_dim, stride_ot, stride_oh, stride_dot, stride_doh,
    stride_delta_h, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta[h, t] = sum_d o[t, h, d] * do[t, h, d] in fp32, for one block of tokens of one
    head: the backward's preprocessing (the row term of ds = p * (dp - delta)). Not named
    attention_*: cptfast.aot and cptfast.perf_model take those for tensor-core kernels."""
    head = tl.program_id(1)
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    t_ok = offs_t < tokens
    mask = t_ok[:, None] & (offs_d < head_dim)[None, :]
    o = tl.load(o_ptr + offs_t[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + offs_t[:, None] * stride_dot + head * stride_doh + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(delta_ptr + head * stride_delta_h + offs_t, tl.sum(o * do, axis=1), mask=t_ok)


# The tile tables are per architecture family: sm_80 (Ampere, Ada: mma.sync, each warp reading
# its operands from shared memory) and sm_90 (Hopper and later: wgmma, a warpgroup of 4 warps
# sharing one 64-row operand). Inputs on other devices (the CPU, the interpreter, the meta
# tensors cptfast.aot records launches on) take `compile_target`'s, sm_90 unless set.
ARCHITECTURES = (80, 90)
_compile_target: contextvars.ContextVar[int] = contextvars.ContextVar("compile_target",
                                                                      default=90)


@contextlib.contextmanager
def compile_target(arch: int):
    """Within the block, launches on tensors that are not on a CUDA device use the tiles of
    sm_``arch`` (80 or 90): how cptfast.aot records what each architecture runs."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch}")
    token = _compile_target.set(arch)
    try:
        yield
    finally:
        _compile_target.reset(token)


def target_arch(device: torch.device) -> int:
    """The tile table a launch on ``device`` uses: 90 from compute capability 9 on, else 80."""
    if device.type == "cuda":
        return 90 if torch.cuda.get_device_capability(device)[0] >= 9 else 80
    return _compile_target.get()


def launch_config(head_dim: int, dtype: torch.dtype = torch.bfloat16,
                  arch: int | None = None) -> dict:
    """Per-kernel block sizes for a head dim, input dtype and architecture (default: that of
    `compile_target`): {"forward"|"dq"|"dkdv" (or "dk" and "dv"): {BLOCK_M, BLOCK_N, BLOCK_D,
    num_warps, num_stages}}. bf16 and fp16 share one table per architecture (``_BLOCKS``);
    fp32 inputs (the FP32_DOT path, tl.dot in TF32) have their own (``_BLOCKS_FP32``, one for
    both), since their tiles take twice the registers and shared memory. Every one compiles
    for its architectures without spills and within shared memory, and the bf16 and fp16 ones
    use wgmma on sm_90 (tests/kernels/test_aot.py)."""
    arch = _compile_target.get() if arch is None else arch
    block_d = max(16, triton.next_power_of_2(head_dim))
    table = _BLOCKS_FP32 if dtype == torch.float32 else _BLOCKS[arch]
    return {kernel: {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_D": block_d, "num_warps": warps,
                     "num_stages": stages}
            for kernel, (m, n, warps, stages) in table[block_d].items()}


# BLOCK_D -> kernel -> (BLOCK_M, BLOCK_N, num_warps, num_stages), from sweeping candidates
# through the AOT check and the static model (cptfast doctor --perf); ptxas is not monotonic
# (128 x 64 spills at D = 16 on sm_80 but not at D = 32). The rules the sweep found:
# - On sm_90 a warpgroup owns 64 rows of a product, so a tile's M side (queries in the forward
#   and dq, keys in dk/dv) must be 64 x the warpgroups: 64-row tiles with 8 warps have both
#   warpgroups compute the same scores (a third of the tensor work duplicated). So 128-row
#   query tiles with 8 warps for the forward and dq, and 128-key tiles for dk/dv (at D = 128
#   with 16 queries a step: the dk and dv accumulators, 2 x 128 x 128 fp32, fill the
#   registers; 32 at D = 64). Two warpgroups of 64 keys each, not one of 128: a single
#   warpgroup holding both accumulators spills hundreds of bytes.
# - On sm_80 each warp of an mma.sync layout takes 16 rows; with fewer rows than 16 x warps
#   Triton splits warps along the other side too (along keys, FlashAttention-1's layout), and
#   every warp reads its operands from shared memory (the model's limiter there). 128 x 32
#   with 8 warps keeps the forward and dq split along queries only, without spills. dk/dv at
#   128 keys spills on sm_80 (16 B) and at 64 keys duplicates a third of its tensor work, so
#   at D = 128 sm_80 runs dk and dv as two 128-key kernels (bounds 0.54 and 0.69 against 0.32
#   for the one kernel: a fifth more products, a third less time in the model).
# - At D = 256 the dk and dv accumulators do not fit in registers together, so the backward
#   runs one key-block kernel for dv and one for dk (the scores recomputed, +1 of 5 products).
# fp32 inputs (training without autocast: the FP32_DOT path, tl.dot in TF32) get _BLOCKS_FP32:
# their q, k, v and do tiles are twice the bytes, in registers and in every shared-memory
# pipeline stage, so the bf16 tiles spill or exceed the shared memory of a block. The fp32 table
# is the same sweep (BLOCK_M, BLOCK_N in 16 .. 128, 4 or 8 warps, 1 to 3 stages): per kernel
# the largest tile (then the most stages) that compiles on sm_80 and sm_90, plain and with
# softcap and window, without spills and within shared memory.
_BLOCKS_SM80 = {
    16: {"forward": (64, 64, 4, 3), "dkdv": (64, 64, 8, 3), "dq": (64, 64, 8, 3)},
    32: {"forward": (128, 64, 8, 3), "dkdv": (64, 64, 8, 3), "dq": (128, 64, 8, 3)},
    64: {"forward": (128, 64, 8, 3), "dkdv": (32, 64, 8, 3), "dq": (128, 64, 8, 3)},
    128: {"forward": (128, 32, 8, 3), "dv": (32, 128, 8, 1), "dk": (16, 128, 8, 2),
          "dq": (128, 32, 8, 1)},
    256: {"forward": (64, 32, 8, 3), "dv": (32, 64, 8, 3), "dk": (16, 64, 8, 2),
          "dq": (64, 32, 8, 3)},
}
_BLOCKS = {
    80: _BLOCKS_SM80,
    90: {**_BLOCKS_SM80,
         64: {"forward": (128, 64, 8, 3), "dkdv": (32, 128, 8, 2), "dq": (128, 64, 8, 3)},
         128: {"forward": (128, 64, 8, 3), "dkdv": (16, 128, 8, 2), "dq": (128, 32, 8, 2)},
         256: {"forward": (64, 32, 8, 3), "dv": (32, 64, 8, 3), "dk": (16, 64, 8, 2),
               "dq": (64, 16, 8, 3)}},
}
_BLOCKS_FP32 = {
    16: {"forward": (128, 128, 8, 2), "dkdv": (64, 128, 8, 2), "dq": (128, 64, 8, 3)},
    32: {"forward": (128, 64, 4, 1), "dkdv": (32, 128, 8, 1), "dq": (128, 64, 8, 3)},
    64: {"forward": (128, 64, 8, 3), "dkdv": (16, 128, 8, 3), "dq": (128, 32, 8, 3)},
    128: {"forward": (128, 32, 8, 3), "dkdv": (64, 32, 8, 3), "dq": (32, 128, 8, 1)},
    256: {"forward": (32, 64, 8, 1), "dv": (64, 32, 8, 1), "dk": (32, 32, 8, 2),
          "dq": (32, 32, 8, 2)},
}


def live_tiles(cu_seqlens: list[int], block_m: int, block_n: int, causal: bool = True,
               window: int | None = None) -> int:
    """Number of (query block, key block) tiles the forward visits per head: the loop bounds
    of attention_forward_kernel, in plain Python."""
    total = 0
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        length = end - start
        for m_start in range(0, length, block_m):
            hi = min(length, m_start + block_m) if causal else length
            lo = max(m_start - window, 0) // block_n * block_n if window is not None else 0
            total += len(range(lo, hi, block_n))
    return total


def work_list(cu_seqlens: torch.Tensor, tokens: int, max_seqlen: int, block: int, *,
              queries: bool, causal: bool = True, window: int | None = None) -> torch.Tensor:
    """The live (document, block) pairs of blocks of ``block`` query (``queries``) or key
    positions, as an int32 [items, 2] tensor on cu_seqlens' device, costliest first: sorted by
    the number of positions on the other side the block meets (stable, so ties keep document
    order), so that the longest programs start first and the short ones fill the tail. Built
    with tensor operations on the device (no host synchronisation). Its length is a bound
    known on the host, min(documents * cdiv(max_seqlen, block), (tokens + documents *
    (block - 1)) // block); the items past the live ones have document -1 (their programs
    return at once)."""
    docs = cu_seqlens.numel() - 1
    capacity = min(docs * -(-max_seqlen // block), (tokens + docs * (block - 1)) // block)
    device = cu_seqlens.device
    if capacity <= 0:
        return torch.empty((0, 2), dtype=torch.int32, device=device)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    blocks = (lengths + block - 1) // block
    ends = blocks.cumsum(0)
    item = torch.arange(capacity, device=device)
    doc = torch.searchsorted(ends, item, right=True)
    live = doc < docs
    doc = doc.clamp(max=docs - 1)
    index = item - (ends[doc] - blocks[doc])
    begin, length = index * block, lengths[doc]
    if queries:  # the keys a query block sees
        hi = torch.minimum(length, begin + block) if causal else length
        lo = (begin - window).clamp(min=0) if window is not None else torch.zeros_like(begin)
    else:  # the queries that see a key block
        lo = begin if causal else torch.zeros_like(begin)
        hi = torch.minimum(length, begin + block + window) if window is not None else length
    cost = torch.where(live, hi - lo, -1)
    order = torch.sort(cost, descending=True, stable=True).indices
    return torch.stack([torch.where(live, doc, -1), index], dim=1)[order].to(torch.int32)


def _delta_config(head_dim: int, dtype: torch.dtype) -> dict:
    """The delta kernel's fixed launch: at 4 warps, tiles of at most 8192 elements of 2-byte
    inputs and 4096 of fp32 (64 and 32 elements per thread and input; 128 fp32 tokens at D = 32
    leave 8 B of stack on sm_90), so BLOCK_T is 128 (64 for fp32) up to D = 64, 16 at D = 256
    fp32. Spill-free on sm_80 and sm_90 (tests/kernels/test_aot.py)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_t = min(128, 8192 // block_d) // (2 if dtype == torch.float32 else 1)
    return {"BLOCK_T": block_t, "BLOCK_D": block_d, "num_warps": 4, "num_stages": 1}


def backward_delta(out: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """delta = (grad_out * out).sum(-1) per token and head, in fp32, as [Hq, T] (contiguous:
    the layout the dq and dk/dv kernels read through stride_lse_h). out and grad_out are
    [T, Hq, D] in any float dtype, read once in their own dtype; no full-size temporaries."""
    tokens, heads, head_dim = out.shape
    out, grad_out = (t if t.stride(-1) == 1 else t.contiguous() for t in (out, grad_out))
    delta = torch.empty((heads, tokens), dtype=torch.float32, device=out.device)
    config = _delta_config(head_dim, out.dtype)
    if tokens and heads:
        grid = (triton.cdiv(tokens, config["BLOCK_T"]), heads)
        backward_delta_kernel[grid](
            out, grad_out, delta, tokens, head_dim, out.stride(0), out.stride(1),
            grad_out.stride(0), grad_out.stride(1), delta.stride(0), **config)
    return delta


class _VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, options: AttentionOptions, tile_counts):
        tokens, q_heads, head_dim = q.shape
        kv_heads = k.shape[1]
        configs = launch_config(head_dim, q.dtype, target_arch(q.device))
        flags = dict(GROUP=q_heads // kv_heads, CAUSAL=options.causal,
                     HAS_WINDOW=options.window is not None,
                     HAS_SOFTCAP=options.softcap is not None, FP32_DOT=fp32_dot(q.dtype))
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = torch.empty((q_heads, tokens), dtype=torch.float32, device=q.device)
        config = configs["forward"]
        work = work_list(cu_seqlens, tokens, max_seqlen, config["BLOCK_M"], queries=True,
                         causal=options.causal, window=options.window)
        programs = work.shape[0] * q_heads
        if tile_counts is not None:
            tile_counts.resize_(programs).zero_()
        if programs:
            attention_forward_kernel[(programs,)](
                q, k, v, out, lse, cu_seqlens, work,
                tile_counts if tile_counts is not None else lse, q_heads, options.scale,
                options.softcap or 1.0, options.window or 0, head_dim, q.stride(0), q.stride(1),
                k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
                lse.stride(0),
                COUNT_TILES=tile_counts is not None, **flags, **config)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, work)
        ctx.max_seqlen, ctx.options, ctx.flags, ctx.configs = max_seqlen, options, flags, configs
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu_seqlens, forward_work = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        delta = backward_delta(out, grad_out)  # [Hq, T] fp32, one fused pass
        dq = torch.empty_like(q, memory_format=torch.contiguous_format)
        dk = torch.empty_like(k, memory_format=torch.contiguous_format)
        dv = torch.empty_like(v, memory_format=torch.contiguous_format)
        configs, flags, options = ctx.configs, ctx.flags, ctx.options
        tokens, q_heads, kv_heads = q.shape[0], q.shape[1], k.shape[1]

        def blocks_of(block, queries):
            if queries and block == ctx.configs["forward"]["BLOCK_M"]:
                return forward_work
            return work_list(cu_seqlens, tokens, ctx.max_seqlen, block, queries=queries,
                             causal=options.causal, window=options.window)

        common = (options.scale, options.softcap or 1.0, options.window or 0, q.shape[2],
                  q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                  grad_out.stride(0), grad_out.stride(1))
        key_block_launches = ([("dkdv", True, True)] if "dkdv" in configs
                              else [("dk", True, False), ("dv", False, True)])
        for name, want_dk, want_dv in key_block_launches:
            config = configs[name]
            work = blocks_of(config["BLOCK_N"], queries=False)
            if work.shape[0]:
                attention_backward_dkdv_kernel[(work.shape[0] * kv_heads,)](
                    q, k, v, grad_out, lse, delta, dk, dv, cu_seqlens, work, kv_heads, *common,
                    dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), lse.stride(0),
                    WANT_DK=want_dk, WANT_DV=want_dv, **flags, **config)
        config = configs["dq"]
        work = blocks_of(config["BLOCK_M"], queries=True)
        if work.shape[0]:
            attention_backward_dq_kernel[(work.shape[0] * q_heads,)](
                q, k, v, grad_out, lse, delta, dq, cu_seqlens, work, q_heads, *common,
                dq.stride(0), dq.stride(1), lse.stride(0), **flags, **config)
        return dq, dk, dv, None, None, None, None


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens: torch.Tensor, max_seqlen: int, *, causal: bool = True,
                     softmax_scale: float | None = None, window: int | None = None,
                     softcap: float | None = None,
                     tile_counts: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of packed documents (see the module docstring); returns [T, Hq, D] in q's
    dtype. ``tile_counts``, if given (an int32 tensor), receives the number of key blocks each
    forward program visited. Inputs are assumed checked (cptfast.ops does)."""
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    options = AttentionOptions(causal=causal, scale=float(scale), window=window,
                               softcap=None if softcap is None else float(softcap))
    return _VarlenAttention.apply(q, k, v, cu_seqlens, int(max_seqlen), options, tile_counts)
