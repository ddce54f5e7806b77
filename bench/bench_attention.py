"""Packed-sequence attention: work skipped by document masking, and (on a GPU) speed.

On the CPU (exact counts, no timing): rows of 8,192 tokens packed with documents of
lognormal length (mean ~600 tokens); the tiles our forward visits (`live_tiles`, the kernel's
own loop bounds, checked against the kernel in tests/kernels/test_attention.py) and the
attention FLOPs of the visible (query, key) pairs, against dense causal attention over the
whole packed row (what SDPA with a causal mask does). On a GPU: fwd+bwd TFLOP/s against
flash-attn's varlen kernel, SDPA with a dense document mask and FlexAttention with a document
block mask, each when available. Goal on H100 at D=128: >= 0.8x flash-attn 2 varlen.
"""

import numpy as np
import pytest
import torch
from conftest import SCALE, record_metric, record_ratio, record_series

from cptfast.kernels.attention import launch_config, live_tiles

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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")
def test_attention_speed_gpu(benchmark):
    import triton

    import cptfast

    layouts = packed_rows(4)
    cu = np.concatenate([[0]] + [np.array(layout[1:]) + i * ROW for i, layout in enumerate(layouts)])
    cu_seqlens = torch.tensor(cu, dtype=torch.int32, device="cuda")
    max_seqlen = int(np.diff(cu).max())
    tokens, heads = len(layouts) * ROW, 32
    q, k, v = (torch.randn(tokens, heads, HEAD_DIM, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))
    grad = torch.randn_like(q)
    flops = 3.5 * sum(visible_pairs(layout) for layout in layouts) * 4 * HEAD_DIM * heads

    def ours():
        cptfast.varlen_attention(q, k, v, cu_seqlens, max_seqlen).backward(grad)

    ours_ms = benchmark.pedantic(lambda: triton.testing.do_bench(ours, return_mode="median"),
                                 rounds=1, iterations=1)
    note = f"ours {flops / ours_ms / 1e9:,.0f} TFLOP/s fwd+bwd"
    try:
        from flash_attn import flash_attn_varlen_func

        def flash():
            flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                   causal=True).backward(grad)

        flash_ms = triton.testing.do_bench(flash, return_mode="median")
        record_ratio("varlen attention fwd+bwd (GPU, D=128)", "flash-attn varlen",
                     flash_ms / ours_ms, note + " (goal >= 0.8x)")
    except ImportError:
        record_ratio("varlen attention fwd+bwd (GPU)", "flash-attn varlen", float("nan"),
                     "flash-attn not installed")
