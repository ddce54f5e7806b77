"""Packed-sequence attention: work skipped by document masking, and (on a GPU) speed.

On the CPU, exact counts: rows of 8,192 tokens packed with documents of lognormal length
(mean ~600 tokens); the programs the forward launches (its work list of live blocks, against
the dense grid of documents x query blocks), the tiles it visits (`live_tiles`, the kernel's
own loop bounds, checked against the kernel in tests/kernels/test_attention.py) and the FLOPs
of the visible (query, key) pairs, against dense causal attention over the whole packed row
(what SDPA with a causal mask does). On the CPU, timed: fwd+bwd of `cptfast.varlen_attention`
(its CPU path, one SDPA per document) against SDPA over the packed row with a dense document
mask (the exact stock-PyTorch alternative) and against plain causal SDPA (which leaks across
documents), one row of 4,096 tokens (x CPTFAST_BENCH_SCALE, at least 1,024), 8 / 4 heads,
D = 64, fp32. On a GPU: fwd+bwd TFLOP/s on a
batch of 8 packed rows of 8,192 tokens, 32 heads, D = 128, bf16, against flash-attn's varlen
kernel over the same cu_seqlens, and per row (batch 8 x 8,192) SDPA with a dense document mask
and FlexAttention with a document block mask (rebuilt per batch), each when available. Goal on
H100 at D=128: >= 0.8x flash-attn 2 varlen.
"""

import numpy as np
import pytest
import torch
from conftest import (SCALE, gpu_ms, median_seconds, record_metric, record_ratio,
                      record_roofline, record_series, short)

from cptfast.kernels.attention import launch_config, live_tiles, work_list

ROW, HEAD_DIM = 8192, 128


def packed_rows(rows: int, seed: int = 0, mean: float = 600) -> list[list[int]]:
    """cu_seqlens of `rows` rows of ROW tokens, documents of lognormal length (mean ~600)."""
    rng = np.random.default_rng(seed)
    layouts = []
    for _ in range(rows):
        bounds = [0]
        while bounds[-1] < ROW:
            length = int(np.clip(rng.lognormal(np.log(mean) - 0.5, 1.0), 1, ROW))
            bounds.append(min(ROW, bounds[-1] + length))
        layouts.append(bounds)
    return layouts


def visible_pairs(layout, causal=True):
    lengths = np.diff(layout)
    return int((lengths * (lengths + 1) // 2).sum()) if causal else int((lengths ** 2).sum())


def test_tiles_and_flops_vs_dense_causal(benchmark):
    config = launch_config(HEAD_DIM)["forward"]
    block_m, block_n = config["BLOCK_M"], config["BLOCK_N"]
    layouts = packed_rows(max(4, int(32 * SCALE)))

    def count():
        return sum(live_tiles(layout, block_m, block_n) for layout in layouts)

    ours_tiles = benchmark.pedantic(count, rounds=1, iterations=1)
    dense_tiles = len(layouts) * live_tiles([0, ROW], block_m, block_n)
    ours_pairs = sum(visible_pairs(layout) for layout in layouts)
    dense_pairs = len(layouts) * visible_pairs([0, ROW])
    flops_per_pair = 4 * HEAD_DIM  # QK^T and PV, multiply-add = 2 FLOPs each (forward)
    mean_doc = np.mean([np.mean(np.diff(layout)) for layout in layouts])
    benchmark.extra_info.update(tiles=ours_tiles, dense_tiles=dense_tiles, pairs=ours_pairs,
                                dense_pairs=dense_pairs, blocks=(block_m, block_n))
    record_ratio("attention tiles visited (exact count)", "dense causal over the packed row",
                 dense_tiles / ours_tiles, f"{ours_tiles:,} vs {dense_tiles:,} tiles of "
                                           f"{block_m}x{block_n}; rows of {ROW}, mean document "
                                           f"{mean_doc:,.0f} tokens")
    record_ratio("attention forward FLOPs (visible pairs)", "dense causal over the packed row",
                 dense_pairs / ours_pairs,
                 f"{ours_pairs * flops_per_pair / 1e9:,.1f} vs "
                 f"{dense_pairs * flops_per_pair / 1e9:,.1f} GFLOP per head over "
                 f"{len(layouts)} rows")
    # Programs launched per head: the work list (live blocks, at most one padding program per
    # document more) against the dense grid of documents x cdiv(max_seqlen, BLOCK_M) it
    # replaced, at 8 packed rows of 8,192 tokens (one batch).
    batch = layouts[:8]
    cu = np.concatenate([[0]] + [np.array(layout[1:]) + i * ROW for i, layout in enumerate(batch)])
    documents, max_seqlen = len(cu) - 1, int(np.diff(cu).max())
    work = work_list(torch.tensor(cu, dtype=torch.int32), int(cu[-1]), max_seqlen, block_m,
                     queries=True)
    live = int((work[:, 0] >= 0).sum())
    dense_programs = documents * -(-max_seqlen // block_m)
    record_ratio("attention programs launched per head (8 x 8,192 tokens)",
                 "dense documents x query-blocks grid", dense_programs / work.shape[0],
                 f"{work.shape[0]:,} launched for {live:,} live query blocks vs "
                 f"{dense_programs:,} ({1 - live / dense_programs:.0%} of the dense grid's "
                 f"programs would exit at once); {documents} documents")
    record_metric("tile efficiency (visible pairs / visited tile area)",
                  f"{ours_pairs / (ours_tiles * block_m * block_n):.1%}",
                  "the rest is masked work inside boundary tiles")
    # How the saving depends on the document lengths.
    tiles_saved, flops_saved = [], []
    for mean in (100, 300, 600, 1200, 2400, 4800):
        rows = packed_rows(max(2, int(8 * SCALE)), seed=1, mean=mean)
        tiles = sum(live_tiles(layout, block_m, block_n) for layout in rows)
        pairs = sum(visible_pairs(layout) for layout in rows)
        tiles_saved.append((mean, len(rows) * live_tiles([0, ROW], block_m, block_n) / tiles))
        flops_saved.append((mean, len(rows) * visible_pairs([0, ROW]) / pairs))
    record_series("attention work saved vs document length",
                  f"mean document length (tokens; rows of {ROW})", "dense causal / ours",
                  {"tiles visited": tiles_saved, "FLOPs of visible pairs": flops_saved})


def least_work(pairs: int, tokens: int, q_heads: int, kv_heads: int, head_dim: int,
               element_bytes: int) -> tuple[float, float]:
    """FLOPs and bytes of attention fwd+bwd at the least: 4·D per visible pair and head in the
    forward (QKᵀ and PV), 2.5x that in the backward (with the recomputed scores); q, k, v, the
    output and its gradient read once, dq, dk, dv written once."""
    flops = 3.5 * 4 * head_dim * pairs * q_heads
    moved = element_bytes * tokens * head_dim * (4 * q_heads + 4 * kv_heads)
    return flops, moved


def test_attention_speed_cpu(benchmark):
    import cptfast

    row, q_heads, kv_heads, head_dim = max(1024, int(4096 * SCALE)), 8, 4, 64
    layout = [b for b in packed_rows(1, seed=2)[0] if b < row] + [row]
    cu_seqlens = torch.tensor(layout, dtype=torch.int32)
    lengths = np.diff(layout)
    torch.manual_seed(0)
    q = torch.randn(row, q_heads, head_dim, requires_grad=True)
    k, v = (torch.randn(row, kv_heads, head_dim, requires_grad=True) for _ in range(2))
    grad = torch.randn_like(q)
    document = torch.repeat_interleave(torch.arange(len(lengths)), torch.from_numpy(lengths))
    position = torch.arange(row)
    same_document_causal = ((document[:, None] == document[None, :])
                            & (position[:, None] >= position[None, :]))

    def ours():
        cptfast.varlen_attention(q, k, v, cu_seqlens, int(lengths.max())).backward(grad)

    def sdpa(mask=None):
        def step():
            out = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                attn_mask=mask, is_causal=mask is None, enable_gqa=True)
            out[0].transpose(0, 1).backward(grad)
        return step

    reference = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=same_document_causal, enable_gqa=True)[0].transpose(0, 1)
    assert torch.allclose(cptfast.varlen_attention(q, k, v, cu_seqlens, int(lengths.max())),
                          reference, atol=1e-5)
    ours_s = benchmark.pedantic(lambda: median_seconds(ours), rounds=1, iterations=1)
    masked_s, causal_s = median_seconds(sdpa(same_document_causal)), median_seconds(sdpa())
    shape = (f"1 row of {row} tokens, {len(lengths)} documents (mean {lengths.mean():,.0f}), "
             f"{q_heads}/{kv_heads} heads, D={head_dim}, fp32")
    record_ratio("varlen attention fwd+bwd (CPU)", "SDPA + dense document mask",
                 masked_s / ours_s, f"{ours_s * 1e3:,.1f} ms vs {masked_s * 1e3:,.1f} ms; {shape}")
    record_ratio("varlen attention fwd+bwd (CPU)", "plain causal SDPA (leaks)",
                 causal_s / ours_s, f"{causal_s * 1e3:,.1f} ms: attends across documents")
    work = least_work(visible_pairs(layout), row, q_heads, kv_heads, head_dim, 4)
    for variant, seconds in (("cptfast varlen (per-document SDPA)", ours_s),
                             ("SDPA + dense document mask", masked_s),
                             ("plain causal SDPA (leaks)", causal_s)):
        record_roofline("varlen attention fwd+bwd", variant, "cpu", *work, seconds)


GPU_ROWS, GPU_HEADS = 8, 32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")
def test_attention_speed_gpu(benchmark):
    import triton

    import cptfast

    layouts = packed_rows(GPU_ROWS)
    cu = np.concatenate([[0]] + [np.array(layout[1:]) + i * ROW
                                 for i, layout in enumerate(layouts)])
    cu_seqlens = torch.tensor(cu, dtype=torch.int32, device="cuda")
    max_seqlen = int(np.diff(cu).max())
    tokens, heads = GPU_ROWS * ROW, GPU_HEADS
    q, k, v = (torch.randn(tokens, heads, HEAD_DIM, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))
    grad = torch.randn_like(q)
    work = least_work(sum(visible_pairs(layout) for layout in layouts), tokens, heads, heads,
                      HEAD_DIM, 2)
    flops = work[0]
    operation = "varlen attention fwd+bwd (D=128, bf16)"
    shape = (f"{GPU_ROWS} rows x {ROW} tokens, {len(cu) - 1} documents, {heads} heads, "
             f"D={HEAD_DIM}, bf16")

    def ours():
        cptfast.varlen_attention(q, k, v, cu_seqlens, max_seqlen).backward(grad)

    ours_ms = benchmark.pedantic(lambda: triton.testing.do_bench(ours, return_mode="median"),
                                 rounds=1, iterations=1)
    record_roofline(operation, "cptfast Triton", "cuda", *work, ours_ms / 1e3)
    record_metric("varlen attention fwd+bwd (GPU, D=128)", f"{flops / ours_ms / 1e9:,.0f} "
                  "TFLOP/s", f"{ours_ms:.2f} ms; {shape}; FLOPs of the visible pairs")

    baselines = {}
    try:
        from flash_attn import flash_attn_varlen_func

        def flash():
            flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                   causal=True).backward(grad)

        baselines["flash-attn varlen"] = (flash, " (goal >= 0.8x)")
    except ModuleNotFoundError as error:
        record_ratio("varlen attention fwd+bwd (GPU)", "flash-attn varlen", float("nan"),
                     "not installed (pip install flash-attn)" if error.name == "flash_attn"
                     else f"cannot be imported: {short(error)}")
    except Exception as error:  # installed but built for another torch / CUDA
        record_ratio("varlen attention fwd+bwd (GPU)", "flash-attn varlen", float("nan"),
                     f"cannot be imported: {short(error)}")

    # The per-row baselines see the batch as [rows, heads, ROW, D] with each row's documents.
    document = torch.stack([torch.repeat_interleave(torch.arange(len(layout) - 1),
                                                    torch.from_numpy(np.diff(layout)))
                            for layout in layouts]).to("cuda")  # [rows, ROW]
    position = torch.arange(ROW, device="cuda")

    def per_row(t):
        return t.view(GPU_ROWS, ROW, heads, HEAD_DIM).transpose(1, 2)

    def sdpa_dense_mask():  # the mask is built per batch, as a packed loader requires
        mask = ((document[:, :, None] == document[:, None, :])
                & (position[:, None] >= position[None, :]))[:, None]
        out = torch.nn.functional.scaled_dot_product_attention(
            per_row(q), per_row(k), per_row(v), attn_mask=mask)
        out.transpose(1, 2).reshape(tokens, heads, HEAD_DIM).backward(grad)

    baselines["SDPA + dense document mask"] = (sdpa_dense_mask, "")
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def document_causal(b, h, q_index, kv_index):
            return (document[b, q_index] == document[b, kv_index]) & (q_index >= kv_index)

        compiled = torch.compile(flex_attention)

        def flex():  # the block mask is rebuilt per batch, as a packed loader requires
            block_mask = create_block_mask(document_causal, GPU_ROWS, None, ROW, ROW,
                                           device="cuda")
            out = compiled(per_row(q), per_row(k), per_row(v), block_mask=block_mask)
            out.transpose(1, 2).reshape(tokens, heads, HEAD_DIM).backward(grad)

        baselines["FlexAttention + document block mask"] = (flex, "")
    except ImportError as error:
        record_ratio("varlen attention fwd+bwd (GPU)", "FlexAttention", float("nan"),
                     f"not available in this torch ({short(error)})")
    for name, (fn, goal) in baselines.items():
        try:
            their_ms = gpu_ms(fn, repeats=5)
        except Exception as error:  # out of memory, unsupported: reported, not fatal
            record_ratio("varlen attention fwd+bwd (GPU)", name, float("nan"),
                         f"failed: {short(error)}")
            torch.cuda.empty_cache()
            continue
        record_roofline(operation, name, "cuda", *work, their_ms / 1e3)
        record_ratio("varlen attention fwd+bwd (GPU, D=128)", name, their_ms / ours_ms,
                     f"{their_ms:.2f} ms vs ours {ours_ms:.2f} ms" + goal)
