"""Sanity checks of the packing reference against values derived by hand or independently."""

import numpy as np
import pytest

from packing_reference import (
    CompactRow, ReferenceStream, SplitMix64, best_fit_decreasing, expand, mix64, shuffle,
    stream_state,
)

MASK = (1 << 64) - 1


def docs(*lengths, base=0):
    """Documents with distinct tokens: document i holds base + 1000*i + 0, 1, ..."""
    return [np.arange(n, dtype=np.int64) + base + 1000 * i for i, n in enumerate(lengths)]


# -- RNG -------------------------------------------------------------------------------------

def test_splitmix64_known_outputs():
    rng = SplitMix64(0)
    assert [rng.next() for _ in range(3)] == [
        0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    assert mix64(0) == 0xE220A8397B1DCDAF  # mix64(x) is the first output from state x


def test_stream_state_is_nested_mix():
    seed, s, e, p = 7, 3, 2, 1
    expected = mix64(mix64(mix64(mix64(seed) ^ s) ^ e) ^ p)
    assert stream_state(seed, s, e, p) == expected
    assert stream_state(0, 0, 0, 0) != stream_state(0, 0, 0, 1)
    with pytest.raises(ValueError):
        stream_state(-1, 0, 0, 0)
    assert 0 <= stream_state(MASK, MASK, MASK, MASK) <= MASK


def test_shuffle_by_hand():
    # n = 2: j = top bit of 0xE220...; it is 1, so no swap.
    assert shuffle(2, 0).tolist() == [0, 1]
    # n = 3: i = 2: 0xE220.../2^64 ~ 0.88, *3 -> j = 2 (no swap);
    #        i = 1: 0x6E78.../2^64 ~ 0.43, *2 -> j = 0 (swap) -> [1, 0, 2].
    assert shuffle(3, 0).tolist() == [1, 0, 2]
    assert shuffle(0, 5).tolist() == []
    assert shuffle(1, 5).tolist() == [0]


@pytest.mark.parametrize("n", [2, 5, 17, 1000])
def test_shuffle_is_permutation(n):
    for state in (0, 1, 123456789, MASK):
        a = shuffle(n, state)
        assert a.dtype == np.int64
        assert sorted(a.tolist()) == list(range(n))
    assert shuffle(n, 1).tolist() == shuffle(n, 1).tolist()


# -- best fit --------------------------------------------------------------------------------

def test_best_fit_decreasing_by_hand():
    # Sorted: 7(i1) 6(i5) 5(i2) 5(i3) 4(i6) 3(i0) 2(i4); T = 10.
    # 7 -> r0 (rem 3); 6 -> r1 (4); 5 -> r2 (5); 5 -> r2 (0); 4 -> r1 (0); 3 -> r0 (0); 2 -> r3.
    assert best_fit_decreasing([3, 7, 5, 5, 2, 6, 4], 10) == [[1, 0], [5, 6], [2, 3], [4]]
    # Best (not first) fit: 12 -> r0 (8); 10 -> r1 (10); 9 -> r1 (1); 1 -> r1 (smallest rem 1).
    assert best_fit_decreasing([1, 9, 12, 10], 20) == [[2], [3, 1, 0]]
    # Equal remaining capacity: the lowest row id wins. 6 -> r0 (4); 6 -> r1 (4); 3 -> r0 (1);
    # 1 -> r0 (smallest remaining, 1 < 4).
    assert best_fit_decreasing([6, 6, 3, 1], 10) == [[0, 2, 3], [1]]
    # Stable sort: the two 3s keep window order.
    assert best_fit_decreasing([3, 5, 3], 5) == [[1], [0], [2]]


def naive_best_fit(lengths, capacity):
    """A plain scan, written independently of the bisect version."""
    visit = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows, remaining = [], []
    for i in visit:
        best = None
        for r, rem in enumerate(remaining):
            if rem >= lengths[i] and (best is None or rem < remaining[best]):
                best = r
        if best is None:
            rows.append([])
            remaining.append(capacity)
            best = len(rows) - 1
        rows[best].append(i)
        remaining[best] -= lengths[i]
    return rows


def test_best_fit_matches_naive_scan():
    rng = np.random.default_rng(0)
    for _ in range(50):
        cap = int(rng.integers(2, 40))
        lengths = rng.integers(1, cap + 1, size=int(rng.integers(0, 200))).tolist()
        assert best_fit_decreasing(lengths, cap) == naive_best_fit(lengths, cap)


def test_bestfit_stream_rows_by_hand():
    a = np.array([10, 11, 12])
    b = np.arange(20, 31)  # 11 tokens
    # T = 4: pieces A(3), B[0:4], B[4:8], B[8:11]; two 4s fill rows alone, each 3 gets a row.
    stream = ReferenceStream([[a, b, np.array([], dtype=np.int64)]], 4, packing="bestfit")
    rows = stream.bestfit_epoch_rows(0, 0)
    got = sorted(tuple(r.tokens[:r.used].tolist()) for r in rows)
    assert got == sorted([(10, 11, 12), (20, 21, 22, 23), (24, 25, 26, 27), (28, 29, 30)])
    for r in rows:
        assert r.segment_starts == [0] and r.token_count == r.used
        assert (r.tokens[r.used:] == 0).all() and len(r.tokens) == 5
    # T = 7: pieces B[0:7] (7), B[7:11] (4), A (3): 7 -> r0; 4 -> r1 (rem 3); A -> r1.
    stream = ReferenceStream([[a, b]], 7, packing="bestfit", pad_id=-1)
    rows = stream.bestfit_epoch_rows(0, 0)
    by_first = sorted(rows, key=lambda r: int(r.tokens[0]))
    assert by_first[0].tokens.tolist() == list(range(20, 27)) + [-1]
    assert by_first[1].tokens.tolist() == [27, 28, 29, 30, 10, 11, 12, -1]
    assert by_first[1].segment_starts == [0, 4]
    # Emission order is the window shuffle of creation order (r0 = B[0:7], r1 = B[7:11] + A).
    perm = shuffle(2, stream_state(0, 0, 0, 1)).tolist()
    assert [r.segment_starts for r in rows] == [[0] if p == 0 else [0, 4] for p in perm]


def test_bestfit_epochs_cover_every_token():
    sources = [docs(5, 0, 13, 2, 9, 4, 30, 1, 7)]
    stream = ReferenceStream(sources, 8, packing="bestfit", window=3, seed=11)
    for e in range(3):
        rows = stream.bestfit_epoch_rows(0, e)
        tokens = sorted(t for r in rows for t in r.tokens[:r.used].tolist())
        assert tokens == sorted(t for d in sources[0] for t in d.tolist())
        assert all(0 < r.used <= 8 for r in rows)
    n0 = len(stream.bestfit_epoch_rows(0, 0))
    assert stream.epoch_of_source_row(0, n0 - 1) == 0
    assert stream.epoch_of_source_row(0, n0) == 1
    assert stream.source_row(0, n0) is stream.bestfit_epoch_rows(0, 1)[0]


# -- concat ----------------------------------------------------------------------------------

def concat_stream(source, s, seed, epochs):
    out = []
    for e in range(epochs):
        for d in shuffle(len(source), stream_state(seed, s, e, 0)):
            out.extend(source[d].tolist())
    return out


def test_concat_rows_match_the_stream():
    source = docs(3, 0, 5, 1, 4)  # 13 tokens an epoch; rows span epoch boundaries
    T = 4
    stream = ReferenceStream([source], T, seed=3)
    flat = concat_stream(source, 0, 3, epochs=5)
    for r in range(12):
        row = stream.source_row(0, r)
        assert row.tokens.tolist() == flat[r * T:r * T + T + 1]
        assert row.used == T + 1 and row.token_count == T
        assert row.segment_starts[0] == 0
        assert stream.epoch_of_source_row(0, r) == (r * T) // 13


def test_concat_segment_starts_and_labels():
    source = docs(2, 3, 0, 1, 6)  # 12 tokens an epoch, T = 4: rows 0..2 are exactly epoch 0
    T = 4
    stream = ReferenceStream([source], T, seed=9)
    order = shuffle(len(source), stream_state(9, 0, 0, 0)).tolist()
    doc_starts, pos = set(), 0
    for d in order:
        if len(source[d]):
            doc_starts.add(pos)
            pos += len(source[d])
    doc_starts.add(12)  # epoch 1's first document
    labels = 0
    for r in range(3):
        row = stream.source_row(0, r)
        assert row.segment_starts == [0] + [p for p in range(1, T + 1) if r * T + p in doc_starts]
        labels += int((expand([row], T)["labels"] != -100).sum())
    # Every token of positions 1..12 is a label except document first tokens.
    assert labels == 12 - 4


def test_tiny_epochs():
    stream = ReferenceStream([[np.array([5])]], 3)  # one token an epoch: row = 5 5 5 5
    row = stream.source_row(0, 2)
    assert row.tokens.tolist() == [5, 5, 5, 5] and row.segment_starts == [0, 1, 2, 3]
    assert (expand([row], 3)["labels"] == -100).all()


# -- expansion -------------------------------------------------------------------------------

def test_expand_by_hand():
    padded = CompactRow(tokens=np.array([7, 8, 9, 4, 5, 0, 0]), used=5, segment_starts=[0, 3],
                        token_count=5)
    full = CompactRow(tokens=np.array([1, 2, 3, 4, 5]), used=5, segment_starts=[0, 2, 4],
                      token_count=4)
    out = expand([padded], 6, pad_id=99)
    assert out["input_ids"].tolist() == [[7, 8, 9, 4, 5, 99]]
    assert out["labels"].tolist() == [[8, 9, -100, 5, -100, -100]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0]]
    assert out["cu_seqlens"].tolist() == [0, 3, 5, 6] and out["max_seqlen"] == 3
    out = expand([full], 4)
    assert out["input_ids"].tolist() == [[1, 2, 3, 4]]
    assert out["labels"].tolist() == [[2, -100, 4, -100]]  # 5 starts a document: no label
    assert out["position_ids"].tolist() == [[0, 1, 0, 1]]
    assert out["cu_seqlens"].tolist() == [0, 2, 4] and out["max_seqlen"] == 2
    row2 = CompactRow(tokens=np.array([1, 2, 3, 4, 5]), used=5, segment_starts=[0],
                      token_count=4)
    out = expand([full, row2], 4)
    assert out["labels"].tolist() == [[2, -100, 4, -100], [2, 3, 4, 5]]
    assert out["cu_seqlens"].tolist() == [0, 2, 4, 8] and out["max_seqlen"] == 4
    for key in ("input_ids", "labels", "position_ids"):
        assert out[key].dtype == np.int64
    assert out["cu_seqlens"].dtype == np.int32


# -- mixture and distribution ----------------------------------------------------------------

def test_blend_by_hand():
    stream = ReferenceStream([docs(10), docs(10)], 4, weights=[3, 1])
    # values p*total - tokens: (0,0) -> 0; (-1,1) -> 1; (2,-2) -> 0; (1,-1) -> 0;
    # (0, 0) tie -> 0; (-1, 1) -> 1  (in units of T/4)
    assert [s for s, _ in stream.blend(6)] == [0, 1, 0, 0, 0, 1]
    assert stream.blend(6) == [(0, 0), (1, 0), (0, 1), (0, 2), (0, 3), (1, 1)]
    assert stream.blend_state(6) == ([4, 2], [16, 8])
    assert stream.blend_state(2) == ([1, 1], [4, 4])
    equal = ReferenceStream([docs(10), docs(10), docs(10)], 4)
    assert [s for s, _ in equal.blend(6)] == [0, 1, 2, 0, 1, 2]
    zero = ReferenceStream([docs(10), docs(10)], 4, weights=[0, 2])
    assert zero.blend(3) == [(1, 0), (1, 1), (1, 2)]


def test_blend_tracks_bestfit_token_counts():
    stream = ReferenceStream([docs(3, 5, 2, 7), docs(8, 8, 1)], 8, packing="bestfit",
                             weights=[1, 1], seed=5)
    rows, tokens = stream.blend_state(40)
    assert sum(rows) == 40
    for s in range(2):
        assert tokens[s] == sum(stream.source_row(s, r).token_count for r in range(rows[s]))


def test_batch_rows_interleave_ranks():
    stream = ReferenceStream([docs(50, 7), docs(30)], 4, weights=[2, 1], seed=1)
    for k in range(2):
        for rank in range(2):
            got = stream.batch_rows(k, 3, rank=rank, world_size=2)
            want = [stream.global_row(k * 6 + j * 2 + rank) for j in range(3)]
            assert all(a is b for a, b in zip(got, want))
    assert stream.batch_rows(0, 3, 1, 2)[0] is stream.global_row(1)


# -- validation ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    {"seq_len": 1},
    {"packing": "greedy"},
    {"window": 0},
    {"weights": [1.0]},
    {"weights": [1.0, -1.0]},
    {"weights": [0.0, 0.0]},
    {"weights": [1.0, float("nan")]},
])
def test_invalid_arguments(kwargs):
    args = {"seq_len": 4, **kwargs}
    seq_len = args.pop("seq_len")
    with pytest.raises(ValueError):
        ReferenceStream([docs(5), docs(5)], seq_len, **args)


def test_invalid_sources_and_ranks():
    with pytest.raises(ValueError):
        ReferenceStream([], 4)
    with pytest.raises(ValueError):
        ReferenceStream([docs(5), [np.array([], dtype=np.int64)]], 4)
    with pytest.raises(ValueError):
        ReferenceStream([docs(5), []], 4)
    stream = ReferenceStream([docs(5)], 4)
    with pytest.raises(ValueError):
        stream.batch_rows(0, 2, rank=2, world_size=2)
    with pytest.raises(ValueError):
        stream.batch_rows(0, 2, rank=-1, world_size=2)
