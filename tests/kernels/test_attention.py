"""Packed-sequence attention, Triton (under TRITON_INTERPRET=1, or compiled on the GPU with
CPTFAST_TEST_DEVICE=cuda) and the per-document reference, against an explicit float64 softmax
per document. Inputs are drawn on the CPU and moved to the test device."""

import random
import sys
import types

import pytest
import torch

import cptfast
from cptfast.kernels.attention import backward_delta, launch_config, live_tiles, work_list
from cptfast.kernels.attention import varlen_attention as triton_attention


def oracle(q, k, v, cu_seqlens, causal=True, window=None, scale=None, softcap=None):
    """float64 attention written out: scores, mask, softmax, weighted sum, per document."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    out = torch.zeros_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        for head in range(q.shape[1]):
            scores = q[start:end, head] @ k[start:end, head // group].T * scale
            if softcap is not None:
                scores = softcap * torch.tanh(scores / softcap)
            i = torch.arange(end - start, device=q.device)[:, None]  # on q's device: the
            j = torch.arange(end - start, device=q.device)[None, :]  # mask is combined in place
            visible = torch.ones_like(scores, dtype=torch.bool)
            if causal:
                visible &= j <= i
            if window is not None:
                visible &= i - j <= window
            weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
            out[start:end, head] = weights @ v[start:end, head // group]
    return out


def random_layout(rng: random.Random, tokens: int) -> list[int]:
    """Document boundaries with length-1 documents and documents spanning several blocks."""
    bounds = [0]
    while bounds[-1] < tokens:
        length = rng.choice([1, 1, 2, 7, 64, 65, 90, 150])
        bounds.append(min(tokens, bounds[-1] + length))
    return bounds


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    monkeypatch.setenv("CPTFAST_BACKEND", request.param)
    return request.param


def tolerance(dtype, device, backend):
    """bf16 2e-2, fp32 1e-5; fp32 through the Triton kernel on a GPU, whose tl.dot rounds fp32
    inputs to TF32 (4x finer than bf16): 2e-2 / 4."""
    if dtype == torch.bfloat16:
        return 2e-2
    return 5e-3 if device.type == "cuda" and backend == "triton" else 1e-5


def relative_error(got, want):
    """Largest error relative to the largest expected magnitude; absolute when everything
    expected is exactly 0 (window=0: a single visible key, so dq is 0 up to rounding)."""
    assert not torch.isnan(got).any(), "NaN in the result"
    scale = want.abs().max().detach()
    error = (got.detach().double() - want.detach()).abs().max()
    return float(error / (scale if scale > 0 else 1.0))


CASES = [  # (layout seed or fixed layout, Hq, Hkv, D, causal, window, softcap)
    ("random0", 4, 2, 64, True, None, None),
    ("random1", 2, 2, 80, True, 17, None),
    ("random2", 3, 1, 32, False, None, None),
    ("random3", 2, 1, 96, True, 0, None),
    ([0, 200], 2, 2, 128, True, None, None),       # a single document: plain causal attention
    ([0, 1, 2, 3, 133], 1, 1, 16, True, 70, None),
    ("random4", 2, 2, 256, True, None, None),
    ("random5", 2, 1, 64, True, 9, 0.5),           # softcap small enough to bend the scores
    ("random6", 2, 2, 256, True, None, 2.0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout,q_heads,kv_heads,head_dim,causal,window,softcap", CASES)
def test_attention_against_oracle(backend, poisoned, device, layout, q_heads, kv_heads,
                                  head_dim, causal, window, softcap, dtype):
    tokens = 200 if head_dim < 256 else 110
    if isinstance(layout, str):
        layout = random_layout(random.Random(layout), tokens)
    tokens = layout[-1]
    cu_seqlens = torch.tensor(layout, dtype=torch.int32).to(device)
    max_seqlen = max(b - a for a, b in zip(layout, layout[1:]))
    generator = torch.Generator().manual_seed(len(layout) * head_dim)
    q, k, v = (torch.randn(tokens, h, head_dim, generator=generator).to(device, dtype)
               .requires_grad_() for h in (q_heads, kv_heads, kv_heads))
    out = cptfast.varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=causal, window=window,
                                   softcap=softcap)
    upstream = torch.randn(out.shape, generator=generator).to(device)
    grads = torch.autograd.grad(out, (q, k, v), upstream.to(dtype))

    inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = oracle(*inputs, cu_seqlens, causal=causal, window=window, softcap=softcap)
    want_grads = torch.autograd.grad(want, inputs, upstream.to(dtype).double())
    allowed = tolerance(dtype, device, backend)
    assert out.dtype == dtype and relative_error(out, want) < allowed
    for got, expected, name in zip(grads, want_grads, "qkv"):
        assert relative_error(got, expected) < allowed, f"d{name}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("head_dim", [16, 80, 128])
@pytest.mark.parametrize("tokens", [1, 37, 129])
def test_backward_delta_against_oracle(poisoned, device, tokens, head_dim, heads, dtype):
    # delta[h, t] = sum_d out[t, h, d] * grad_out[t, h, d], [Hq, T] fp32, from the fused
    # preprocessing kernel; every element written (the output buffer starts as NaN), the
    # padded head-dim lanes and the tokens past T masked. grad_out is a strided view (every
    # other head of a wider tensor), as the kernel takes token and head strides.
    generator = torch.Generator().manual_seed(tokens * head_dim + heads)
    out = torch.randn(tokens, heads, head_dim, generator=generator).to(device, dtype)
    wide = torch.randn(tokens, 2 * heads, head_dim, generator=generator).to(device, dtype)
    grad_out = wide[:, ::2]
    delta = backward_delta(out, grad_out)
    want = (out.double() * grad_out.double()).sum(-1).T
    assert delta.dtype == torch.float32 and delta.shape == (heads, tokens)
    assert delta.is_contiguous()
    allowed = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert relative_error(delta, want) < allowed


def test_no_document_sees_another(backend, device):
    # Changing every token of document 1 changes nothing in documents 0 and 2: neither the
    # output nor any gradient.
    layout = [0, 70, 150, 230]
    cu_seqlens = torch.tensor(layout, dtype=torch.int32).to(device)
    generator = torch.Generator().manual_seed(0)
    base = [torch.randn(230, 2, 32, generator=generator).to(device) for _ in range(3)]
    upstream = torch.randn(230, 2, 32, generator=generator).to(device)

    def run(tensors):
        tensors = [t.clone().requires_grad_() for t in tensors]
        out = cptfast.varlen_attention(*tensors, cu_seqlens, 80)
        return [out, *torch.autograd.grad(out, tensors, upstream)]

    changed = [t.clone() for t in base]
    for t in changed:
        t[70:150] = torch.randn(80, 2, 32, generator=generator).to(device) * 5
    first, second = run(base), run(changed)
    others = torch.cat([torch.arange(0, 70), torch.arange(150, 230)]).to(device)
    for a, b in zip(first, second):
        assert torch.equal(a[others], b[others])
        assert not torch.equal(a[70:150], b[70:150])


def visibility(length, causal, window):
    """[queries, keys] of one document: query i sees key j (causal: j <= i; window: i - j <=
    window)."""
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    visible = torch.ones(length, length, dtype=torch.bool)
    if causal:
        visible &= j <= i
    if window is not None:
        visible &= i - j <= window
    return visible


def exact_live_tiles(layout, block_m, block_n, causal, window):
    """Tiles holding at least one visible (query, key) pair, by brute force."""
    total = 0
    for start, end in zip(layout[:-1], layout[1:]):
        length = end - start
        visible = visibility(length, causal, window)
        for m in range(0, length, block_m):
            for n in range(0, length, block_n):
                total += bool(visible[m:m + block_m, n:n + block_n].any())
    return total


@pytest.mark.parametrize("seed", range(6))
def test_kernel_visits_exactly_the_live_tiles(seed, device):
    rng = random.Random(seed)
    layout = random_layout(rng, rng.choice([150, 300]))
    causal = seed % 3 != 2
    window = rng.choice([None, 0, 10, 64, 100])
    heads, head_dim = 2, 32
    config = launch_config(head_dim, torch.float32)["forward"]  # the inputs are fp32
    exact = exact_live_tiles(layout, config["BLOCK_M"], config["BLOCK_N"], causal, window)
    assert live_tiles(layout, config["BLOCK_M"], config["BLOCK_N"], causal, window) == exact
    tokens = layout[-1]
    q, k, v = (torch.randn(tokens, heads, head_dim).to(device) for _ in range(3))
    counts = torch.empty(0, dtype=torch.int32).to(device)
    triton_attention(q, k, v, torch.tensor(layout, dtype=torch.int32).to(device),
                     max(b - a for a, b in zip(layout, layout[1:])), causal=causal,
                     window=window, tile_counts=counts)
    assert int(counts.sum()) == heads * exact


def span_met(length, begin, block, queries, causal, window):
    """How many positions on the other side a block of positions meets, by brute force: the
    keys some query of a query block sees, or the queries that see some key of a key block."""
    visible = visibility(length, causal, window)
    rows = visible[begin:begin + block] if queries else visible[:, begin:begin + block].T
    return int(rows.any(dim=0).sum())


@pytest.mark.parametrize("seed", range(8))
def test_work_list_holds_each_live_block_once_costliest_first(seed):
    rng = random.Random(seed)
    layout = random_layout(rng, rng.choice([40, 300, 700]))
    if seed % 2:  # empty documents, which have no blocks at all
        layout = sorted(layout + [layout[1], layout[-1]])
    block = rng.choice([16, 32, 64, 128])
    queries, causal = bool(seed % 3), seed % 4 != 3
    window = rng.choice([None, 0, 10, 100])
    max_seqlen = max(b - a for a, b in zip(layout, layout[1:]))
    work = work_list(torch.tensor(layout, dtype=torch.int32), layout[-1], max_seqlen, block,
                     queries=queries, causal=causal, window=window)
    assert work.dtype == torch.int32 and work.shape[1] == 2
    documents = len(layout) - 1
    assert work.shape[0] == min(documents * -(-max_seqlen // block),
                                (layout[-1] + documents * (block - 1)) // block)
    live = [(d, b) for d in range(documents)
            for b in range(-(-(layout[d + 1] - layout[d]) // block))]
    items = [tuple(item) for item in work.tolist()]
    assert sorted(i for i in items if i[0] >= 0) == live  # each live block exactly once
    first_padding = next((n for n, i in enumerate(items) if i[0] < 0), len(items))
    assert all(i[0] < 0 for i in items[first_padding:])  # padding only at the end
    costs = [span_met(layout[d + 1] - layout[d], b * block, block, queries, causal, window)
             for d, b in items[:first_padding]]
    assert costs == sorted(costs, reverse=True)
    for (d0, b0), (d1, b1), c0, c1 in zip(items, items[1:first_padding], costs, costs[1:]):
        assert c0 > c1 or (d0, b0) < (d1, b1)  # ties keep document order


def test_packed_rows_launch_programs_for_live_blocks_only():
    # Eight rows of 8,192 tokens, documents of mean length ~600: the dense grid of
    # documents x cdiv(max_seqlen, 128) launches ~4x the programs that have work (here 2592
    # for 561), the work list at most one per document more than those.
    rng = random.Random(0)
    layout = [0]
    for _ in range(8):
        row_end = layout[-1] + 8192
        while layout[-1] < row_end:
            layout.append(min(row_end, layout[-1] + max(1, int(rng.expovariate(1 / 600)))))
    max_seqlen = max(b - a for a, b in zip(layout, layout[1:]))
    documents = len(layout) - 1
    work = work_list(torch.tensor(layout, dtype=torch.int32), layout[-1], max_seqlen, 128,
                     queries=True)
    live = sum(-(-(b - a) // 128) for a, b in zip(layout, layout[1:]))
    dense = documents * -(-max_seqlen // 128)
    assert int((work[:, 0] >= 0).sum()) == live
    assert work.shape[0] <= live + documents < dense / 3


def test_documents_and_the_diagonal_skip_tiles():
    # Two documents of two 64-token blocks each, causal: 3 live tiles per document instead of
    # the 16 of dense attention over the packed row. One 256-token document with a 10-token
    # window: the diagonal tile and the one before it, per query block (1 + 2 + 2 + 2).
    assert live_tiles([0, 128, 256], 64, 64) == 6
    assert live_tiles([0, 128, 256], 64, 64, window=10) == 6
    assert live_tiles([0, 256], 64, 64, window=10) == 7
    assert live_tiles([0, 256], 64, 64, causal=False) == 16


def test_bad_arguments_are_named(backend):
    # CPU tensors in both modes: the checks are made on the host before any launch.
    q = torch.randn(10, 4, 16)
    kv = torch.randn(10, 2, 16)
    good = torch.tensor([0, 4, 10], dtype=torch.int32)
    cases = [
        (torch.tensor([1, 4, 10], dtype=torch.int32), 6, "start at 0 and end"),
        (torch.tensor([0, 4, 9], dtype=torch.int32), 6, "start at 0 and end"),
        (torch.tensor([0, 6, 4, 10], dtype=torch.int32), 6, "non-decreasing"),
        (good, 5, "max_seqlen 5 is smaller than the longest document"),
        (good.long(), 6, "int32"),
    ]
    for cu_seqlens, max_seqlen, message in cases:
        with pytest.raises(ValueError, match=message):
            cptfast.varlen_attention(q, kv, kv, cu_seqlens, max_seqlen)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        cptfast.varlen_attention(torch.randn(10, 3, 16), kv, kv, good, 6)
    with pytest.raises(ValueError, match="above the supported 256"):
        big = torch.randn(10, 2, 320)
        cptfast.varlen_attention(big, big, big, good, 6)


def fake_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                max_seqlen_k, dropout_p=0.0, softmax_scale=None, causal=False,
                                window_size=(-1, -1), softcap=0.0):
    """flash-attn's documented semantics, written independently: query i of a sequence sees
    key j when i - left <= j <= i + right (-1: unbounded) and, if causal, j <= i."""
    assert torch.equal(cu_seqlens_q, cu_seqlens_k) and max_seqlen_q == max_seqlen_k
    left, right = window_size
    out = torch.zeros_like(q)
    group = q.shape[1] // k.shape[1]
    bounds = cu_seqlens_q.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        i = torch.arange(end - start)[:, None]
        j = torch.arange(end - start)[None, :]
        visible = torch.ones(end - start, end - start, dtype=torch.bool)
        if causal:
            visible &= j <= i
        if left >= 0:
            visible &= j >= i - left
        if right >= 0:
            visible &= j <= i + right
        for head in range(q.shape[1]):
            scores = q[start:end, head] @ k[start:end, head // group].T * softmax_scale
            if softcap > 0:
                scores = softcap * torch.tanh(scores / softcap)
            weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
            out[start:end, head] = weights @ v[start:end, head // group]
    return out


@pytest.mark.parametrize("causal,window,softcap", [(True, None, None), (True, 5, None),
                                                   (False, None, 1.5), (False, 3, None)])
def test_flash_attn_arguments_keep_our_semantics(monkeypatch, causal, window, softcap):
    # The dispatch to flash-attn runs only on CUDA; its argument mapping is checked here
    # against a stand-in module with flash-attn's semantics.
    from cptfast import ops
    monkeypatch.setitem(sys.modules, "flash_attn",
                        types.SimpleNamespace(flash_attn_varlen_func=fake_flash_attn_varlen_func))
    layout = [0, 1, 9, 30]
    cu_seqlens = torch.tensor(layout, dtype=torch.int32)
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(30, h, 16, generator=generator, dtype=torch.float64)
               for h in (4, 2, 2))
    got = ops._flash_attn_varlen(q, k, v, cu_seqlens, 21, causal=causal, softmax_scale=0.25,
                                 window=window, softcap=softcap)
    want = oracle(q, k, v, cu_seqlens, causal=causal, window=window, scale=0.25, softcap=softcap)
    assert relative_error(got, want) < 1e-12


def test_flash_attn_choice_is_checked(monkeypatch):
    from cptfast import ops
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # not installed
    with pytest.raises(ImportError, match="needs the flash-attn package"):
        ops._flash_attn_varlen(*(torch.randn(4, 1, 8) for _ in range(3)),
                               torch.tensor([0, 4], dtype=torch.int32), 4, causal=True,
                               softmax_scale=None, window=None)
    inputs = (*(torch.randn(4, 1, 8) for _ in range(3)), torch.tensor([0, 4], dtype=torch.int32),
              4)
    with pytest.raises(ValueError, match="implementation must be one of cptfast, flash_attn"):
        cptfast.varlen_attention(*inputs, implementation="flash")
    with pytest.raises(ValueError, match="runs on CUDA tensors only"):
        cptfast.varlen_attention(*inputs, implementation="flash_attn")
