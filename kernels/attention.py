"""Flash attention over packed sequences: causal inside each document, nothing across them.

Inputs are packed: q [T, Hq, D], k and v [T, Hkv, D], with document d occupying tokens
cu_seqlens[d] .. cu_seqlens[d+1]. Query i of a document may see key j of the same document when
    j <= i (causal)   and   i - j <= window (optional left window: itself and `window` before),
and the output is softmax(q k^T * scale) v over those keys, computed block by block with an
online softmax (never the [T, T] scores). Query head h reads key/value head h // (Hq / Hkv)
(grouped-query attention).

The grid runs over (query block, document, head); a program visits only the key blocks of its
own document that hold at least one visible key — the loop bounds are exactly the live tiles,
which `live_tiles` computes without a GPU and the COUNT_TILES flag lets a test read back from
the kernel itself. The backward recomputes the probabilities from the saved log-sum-exp and is
split into a dk/dv kernel (one program per key block, looping over the query blocks and the
query heads of its group; at D = 256 it runs twice, once for dk and once for dv, to stay in
registers) and a dq kernel, so no atomics are needed and results are deterministic. Both read
delta = rowsum(do * o) ([Hq, T] fp32), which a preprocessing kernel computes in one pass over o
and do. Head dims up to 256 are padded to a power of two and masked.
"""

from . import _guard  # noqa: F401  (only importable as cptfast.kernels)

import torch
import triton
import triton.language as tl

from .cross_entropy import _capped, interpreting


@triton.jit
def _key_range(m_start, length, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi) of the key positions a query block starting at m_start may see."""
    hi = length
    if CAUSAL:
        hi = tl.minimum(length, m_start + BLOCK_M)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(m_start - window, 0) // BLOCK_N * BLOCK_N
    return lo, hi


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
def _document(cu_seqlens_ptr, doc):
    """First token (int64, an offset into the packed tensors) and length of document doc."""
    start = tl.load(cu_seqlens_ptr + doc).to(tl.int64)
    return start, (tl.load(cu_seqlens_ptr + doc + 1) - start).to(tl.int32)


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
def attention_forward_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cu_seqlens_ptr, tiles_ptr, scale, softcap, window,
    head_dim, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot,
    stride_oh, stride_lse_h, GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, COUNT_TILES: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    m_block, doc, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start, length = _document(cu_seqlens_ptr, doc)
    m_start = m_block * BLOCK_M
    if m_start < length:
        kv_head = head // GROUP
        offs_m = m_start + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < head_dim
        m_ok = offs_m < length
        q = _load_rows(q_ptr, start, offs_m, head, stride_qt, stride_qh, offs_d,
                       m_ok[:, None] & d_ok[None, :], FP32_DOT)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        lo, hi = _key_range(m_start, length, window, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
        tiles = 0
        for n_start in range(lo, hi, BLOCK_N):
            offs_n = n_start + tl.arange(0, BLOCK_N)
            n_ok = offs_n < length
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = _load_rows(k_ptr, start, offs_n, kv_head, stride_kt, stride_kh, offs_d,
                           kv_mask, FP32_DOT)
            v = _load_rows(v_ptr, start, offs_n, kv_head, stride_vt, stride_vh, offs_d,
                           kv_mask, FP32_DOT)
            s = _capped(tl.dot(q, tl.trans(k)) * scale, softcap, HAS_SOFTCAP)
            s = tl.where(_visible(offs_m, offs_n, length, window, CAUSAL, HAS_WINDOW), s,
                         float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing yet
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
            tiles += 1
        l_i = tl.where(l_i == 0.0, 1.0, l_i)  # padding rows past the document's end
        out = acc / l_i[:, None]
        tl.store(o_ptr + (start + offs_m)[:, None] * stride_ot + head * stride_oh
                 + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & d_ok[None, :])
        tl.store(lse_ptr + head * stride_lse_h + start + offs_m, m_i + tl.log(l_i), mask=m_ok)
        if COUNT_TILES:
            programs = tl.num_programs(0) * tl.num_programs(1)
            tl.store(tiles_ptr + head * programs + doc * tl.num_programs(0) + m_block, tiles)


@triton.jit
def attention_backward_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, cu_seqlens_ptr, scale,
    softcap, window, head_dim, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lse_h,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    FP32_DOT: tl.constexpr, WANT_DK: tl.constexpr, WANT_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n_block, doc, kv_head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start, length = _document(cu_seqlens_ptr, doc)
    n_start = n_block * BLOCK_N
    if n_start < length:
        offs_n = n_start + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < head_dim
        n_ok = offs_n < length
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = _load_rows(k_ptr, start, offs_n, kv_head, stride_kt, stride_kh, offs_d,
                       kv_mask, FP32_DOT)
        if WANT_DK:
            v = _load_rows(v_ptr, start, offs_n, kv_head, stride_vt, stride_vh, offs_d,
                           kv_mask, FP32_DOT)
        dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        # Queries that can see this key block: from its first key (causal) to its last key
        # plus the window.
        lo = 0
        if CAUSAL:
            lo = n_start // BLOCK_M * BLOCK_M
        hi = length
        if HAS_WINDOW:
            hi = tl.minimum(length, n_start + BLOCK_N + window)
        for g in range(GROUP):
            head = kv_head * GROUP + g
            for m_start in range(lo, hi, BLOCK_M):
                offs_m = m_start + tl.arange(0, BLOCK_M)
                m_ok = offs_m < length
                q_mask = m_ok[:, None] & d_ok[None, :]
                q = _load_rows(q_ptr, start, offs_m, head, stride_qt, stride_qh, offs_d,
                               q_mask, FP32_DOT)
                do = _load_rows(do_ptr, start, offs_m, head, stride_dot, stride_doh, offs_d,
                                q_mask, FP32_DOT)
                lse = tl.load(lse_ptr + head * stride_lse_h + start + offs_m, mask=m_ok,
                              other=0.0)
                delta = tl.load(delta_ptr + head * stride_lse_h + start + offs_m, mask=m_ok,
                                other=0.0)
                # Transposed scores [keys, queries]: every product then has the key block
                # as its M dimension, so p^T and ds^T feed the next products without a
                # layout change (and use wgmma on sm_90).
                s_t = _capped(tl.dot(k, tl.trans(q)) * scale, softcap, HAS_SOFTCAP)
                p_t = tl.where(_visible_t(offs_m, offs_n, length, window, CAUSAL, HAS_WINDOW),
                               tl.exp(s_t - lse[None, :]), 0.0)
                if WANT_DV:
                    dv += tl.dot(p_t.to(do.dtype), do)
                if WANT_DK:
                    dp_t = tl.dot(v, tl.trans(do))
                    ds_t = p_t * (dp_t - delta[None, :])
                    if HAS_SOFTCAP:  # through c*tanh(x/c): times 1 - tanh^2
                        ds_t *= 1.0 - (s_t / softcap) * (s_t / softcap)
                    dk += tl.dot(ds_t.to(q.dtype), q)
        if WANT_DK:
            tl.store(dk_ptr + (start + offs_n)[:, None] * stride_dkt + kv_head * stride_dkh
                     + offs_d[None, :], (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
        if WANT_DV:
            tl.store(dv_ptr + (start + offs_n)[:, None] * stride_dvt + kv_head * stride_dvh
                     + offs_d[None, :], dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def attention_backward_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, cu_seqlens_ptr, scale, softcap,
    window, head_dim, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_dqt, stride_dqh, stride_lse_h, GROUP: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    m_block, doc, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start, length = _document(cu_seqlens_ptr, doc)
    m_start = m_block * BLOCK_M
    if m_start < length:
        kv_head = head // GROUP
        offs_m = m_start + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < head_dim
        m_ok = offs_m < length
        q_mask = m_ok[:, None] & d_ok[None, :]
        q = _load_rows(q_ptr, start, offs_m, head, stride_qt, stride_qh, offs_d, q_mask, FP32_DOT)
        do = _load_rows(do_ptr, start, offs_m, head, stride_dot, stride_doh, offs_d,
                        q_mask, FP32_DOT)
        lse = tl.load(lse_ptr + head * stride_lse_h + start + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(delta_ptr + head * stride_lse_h + start + offs_m, mask=m_ok, other=0.0)
        dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        lo, hi = _key_range(m_start, length, window, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
        for n_start in range(lo, hi, BLOCK_N):
            offs_n = n_start + tl.arange(0, BLOCK_N)
            n_ok = offs_n < length
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = _load_rows(k_ptr, start, offs_n, kv_head, stride_kt, stride_kh, offs_d,
                           kv_mask, FP32_DOT)
            v = _load_rows(v_ptr, start, offs_n, kv_head, stride_vt, stride_vh, offs_d,
                           kv_mask, FP32_DOT)
            s = _capped(tl.dot(q, tl.trans(k)) * scale, softcap, HAS_SOFTCAP)
            p = tl.where(_visible(offs_m, offs_n, length, window, CAUSAL, HAS_WINDOW),
                         tl.exp(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            if HAS_SOFTCAP:
                ds *= 1.0 - (s / softcap) * (s / softcap)
            dq += tl.dot(ds.to(k.dtype), k)
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


def launch_config(head_dim: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Per-kernel block sizes for a head dim and input dtype: {"forward"|"dq"|"dkdv" (or "dk"
    and "dv"): {BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages}}. bf16 and fp16 share one
    table (``_BLOCKS``); fp32 inputs (the FP32_DOT path, tl.dot in TF32) have their own
    (``_BLOCKS_FP32``), since their tiles take twice the registers and shared memory. Every
    one compiles for sm_80 and sm_90 without spills and within shared memory, and the bf16 and
    fp16 ones use wgmma on sm_90 (tests/kernels/test_aot.py)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    table = _BLOCKS_FP32 if dtype == torch.float32 else _BLOCKS
    return {kernel: {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_D": block_d, "num_warps": warps,
                     "num_stages": stages}
            for kernel, (m, n, warps, stages) in table[block_d].items()}


# BLOCK_D -> kernel -> (BLOCK_M, BLOCK_N, num_warps, num_stages), from sweeping candidates
# through the AOT check (ptxas is not monotonic: 128 x 64 spills at D = 16 on sm_80 but not at
# D = 32). At D = 256 the dk and dv accumulators do not fit in registers together, so the
# backward runs one key-block kernel for dv and one for dk (the scores are recomputed, +1 of 5
# products). _BLOCKS is for bf16 and fp16 inputs. fp32 inputs (training without autocast: the
# FP32_DOT path, tl.dot in TF32) get _BLOCKS_FP32: their q, k, v and do tiles are twice the
# bytes, in registers and in every shared-memory pipeline stage, so the bf16 tiles spill (up
# to 672 B at D = 256) or exceed the shared memory of a block (181248 B > 166912 B for the
# forward at D = 128 on sm_80). The fp32 table is the same sweep (BLOCK_M, BLOCK_N in
# 16 .. 128, 4 or 8 warps, 1 to 3 stages) for fp32: per kernel the largest tile (then the
# most stages) that compiles on sm_80 and sm_90, plain and with softcap and window, without
# spills and within shared memory. Where a larger tile fits only without pipelining it wins
# over a smaller pipelined one (num_stages 1: dkdv at D = 64, dq at D = 128, forward and dv at
# D = 256). D = 256 splits dk and dv as bf16 does.
_BLOCKS = {
    16: {"forward": (64, 64, 4, 3), "dkdv": (64, 64, 8, 3), "dq": (64, 64, 8, 3)},
    32: {"forward": (128, 64, 8, 3), "dkdv": (64, 64, 8, 3), "dq": (128, 64, 8, 3)},
    64: {"forward": (128, 64, 8, 3), "dkdv": (32, 64, 8, 3), "dq": (128, 64, 8, 3)},
    128: {"forward": (64, 64, 8, 3), "dkdv": (32, 64, 8, 3), "dq": (64, 64, 8, 3)},
    256: {"forward": (64, 32, 8, 3), "dv": (32, 64, 8, 3), "dk": (16, 64, 8, 2),
          "dq": (64, 32, 8, 3)},
}
_BLOCKS_FP32 = {
    16: {"forward": (128, 128, 8, 3), "dkdv": (64, 128, 8, 3), "dq": (128, 64, 8, 3)},
    32: {"forward": (128, 64, 4, 3), "dkdv": (64, 128, 8, 2), "dq": (128, 64, 8, 3)},
    64: {"forward": (128, 64, 8, 3), "dkdv": (32, 128, 8, 1), "dq": (128, 32, 8, 3)},
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
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, causal, scale, softcap, window,
                tile_counts):
        tokens, q_heads, head_dim = q.shape
        kv_heads = k.shape[1]
        configs = launch_config(head_dim, q.dtype)
        flags = dict(GROUP=q_heads // kv_heads, CAUSAL=causal, HAS_WINDOW=window is not None,
                     HAS_SOFTCAP=softcap is not None,
                     FP32_DOT=interpreting() or q.dtype == torch.float32)
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = torch.empty((q_heads, tokens), dtype=torch.float32, device=q.device)
        docs = cu_seqlens.numel() - 1
        config = configs["forward"]
        grid = (triton.cdiv(max(max_seqlen, 1), config["BLOCK_M"]), docs, q_heads)
        if tile_counts is not None:
            tile_counts.resize_(grid[2] * grid[1] * grid[0]).zero_()
        attention_forward_kernel[grid](
            q, k, v, out, lse, cu_seqlens, tile_counts if tile_counts is not None else lse,
            scale, softcap or 1.0, window or 0, head_dim, q.stride(0), q.stride(1), k.stride(0),
            k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1), lse.stride(0),
            COUNT_TILES=tile_counts is not None, **flags, **config)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.max_seqlen, ctx.scale, ctx.softcap, ctx.window = max_seqlen, scale, softcap, window
        ctx.flags, ctx.configs = flags, configs
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        delta = backward_delta(out, grad_out)  # [Hq, T] fp32, one fused pass
        dq = torch.empty_like(q, memory_format=torch.contiguous_format)
        dk = torch.empty_like(k, memory_format=torch.contiguous_format)
        dv = torch.empty_like(v, memory_format=torch.contiguous_format)
        configs, flags = ctx.configs, ctx.flags
        docs = cu_seqlens.numel() - 1
        common = (ctx.scale, ctx.softcap or 1.0, ctx.window or 0, q.shape[2], q.stride(0),
                  q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                  grad_out.stride(0), grad_out.stride(1))
        key_block_launches = ([("dkdv", True, True)] if "dkdv" in configs
                              else [("dk", True, False), ("dv", False, True)])
        for name, want_dk, want_dv in key_block_launches:
            config = configs[name]
            grid = (triton.cdiv(max(ctx.max_seqlen, 1), config["BLOCK_N"]), docs, k.shape[1])
            attention_backward_dkdv_kernel[grid](
                q, k, v, grad_out, lse, delta, dk, dv, cu_seqlens, *common, dk.stride(0),
                dk.stride(1), dv.stride(0), dv.stride(1), lse.stride(0), WANT_DK=want_dk,
                WANT_DV=want_dv, **flags, **config)
        config = configs["dq"]
        grid = (triton.cdiv(max(ctx.max_seqlen, 1), config["BLOCK_M"]), docs, q.shape[1])
        attention_backward_dq_kernel[grid](
            q, k, v, grad_out, lse, delta, dq, cu_seqlens, *common, dq.stride(0), dq.stride(1),
            lse.stride(0), **flags, **config)
        return dq, dk, dv, None, None, None, None, None, None, None


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens: torch.Tensor, max_seqlen: int, *, causal: bool = True,
                     softmax_scale: float | None = None, window: int | None = None,
                     softcap: float | None = None,
                     tile_counts: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of packed documents (see the module docstring); returns [T, Hq, D] in q's
    dtype. ``tile_counts``, if given (an int32 tensor), receives the number of key blocks each
    forward program visited. Inputs are assumed checked (cptfast.ops does)."""
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    return _VarlenAttention.apply(q, k, v, cu_seqlens, int(max_seqlen), causal, float(scale),
                                  None if softcap is None else float(softcap), window,
                                  tile_counts)
