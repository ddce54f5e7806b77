"""Reference implementation (test oracle) of the packed, shuffled, mixed, distributed data stream.

Clarity over speed: it is meant for small test corpora (a few thousand documents), and the
C++ loader is compared against it bit-for-bit. Only numpy and the standard library are used.

SPEC (condensed; "mod 2^64" arithmetic is done on Python ints masked to 64 bits)

1. RNG. G = 0x9E3779B97F4A7C15, M1 = 0xBF58476D1CE4E5B9, M2 = 0x94D049BB133111EB.
   finalize(z): z = (z ^ z>>30) * M1; z = (z ^ z>>27) * M2; return z ^ z>>31   (mod 2^64).
   mix64(x) = finalize(x + G).  SplitMix64(state).next(): state += G; return finalize(state).
   stream_state(seed, source, epoch, purpose)
       = mix64(mix64(mix64(mix64(seed) ^ source) ^ epoch) ^ purpose).
   shuffle(n, state): a = [0..n-1]; rng = SplitMix64(state);
       for i = n-1 down to 1: j = (rng.next() * (i+1)) >> 64; swap a[i], a[j].
2. Sources. A source is a list of 1-D integer documents (empty ones allowed). Epoch e's document
   order of source s is shuffle(D, stream_state(seed, s, e, 0)) over all D documents. A source
   with no tokens at all is a ValueError.
3. Compact row: tokens (int64, T+1 slots, slots >= used hold pad_id), used, segment_starts (slot
   where each document piece begins; [] when used == 0), token_count (mixture weight of the row).
4. concat: stream = epochs 0, 1, ... of the documents in epoch order, concatenated. Source row r
   is stream[r*T : r*T+T+1]; used = T+1; segment_starts = [0] + every slot p in 1..T where a
   document begins; token_count = T.
5. bestfit (window W documents): window w of epoch e is order[w*W : (w+1)*W]. Its pieces: for each
   non-empty document d in window order, pieces (d, k*T, min(T, L_d - k*T)) for k = 0, 1, ...
   while k*T < L_d. Stable sort by length descending. Best-fit decreasing: put each piece in the
   open row with the smallest remaining capacity >= its length (ties: lowest row id = creation
   order), else open a new row (capacity T). Emit the window's rows as
   rows[perm[0]], rows[perm[1]], ... with perm = shuffle(R_w, stream_state(seed, s, e, 1 + w)).
   Epoch rows = windows concatenated; source rows = epochs concatenated. tokens = pieces in
   append order; used = total length; segment_starts = each piece's start slot; token_count = used.
6. Mixture. p_s = w_s / sum(w) (float64; weights >= 0, sum > 0). For global row g = 0, 1, ...,
   among sources with p_s > 0: the eligible ones are those at or below their share,
   float(tokens_s) <= p_s * float(total); pick the eligible s with the earliest deadline
   float(tokens_s + L_s) / p_s (L_s = token_count of s's next row), ties -> lowest s (earliest
   deadline first among released rows keeps every share within one row of its target). If
   rounding leaves none eligible, pick the largest p_s * total - tokens_s instead. Global row g
   = source s's row rows_s; then rows_s += 1, tokens_s and total += token_count.
7. Distribution. Batch k of rank r (world W, batch B) = global rows k*W*B + j*W + r, j = 0..B-1.
8. Expansion to [B, T]: for t < used, with the segment [start, end) containing t (end = next
   start or used): input_ids = tokens[t], position_ids = t - start, labels = tokens[t+1] if
   t+1 < end else -100. For t >= used: input_ids = pad_id, labels = -100, position_ids = t - used.
   cu_seqlens (int32) = [0] + cumsum over rows of: each segment with start < T contributes
   min(end, T) - start; then T - used if used < T. max_seqlen = largest such length.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

MASK64 = (1 << 64) - 1
G = 0x9E3779B97F4A7C15
M1 = 0xBF58476D1CE4E5B9
M2 = 0x94D049BB133111EB

IGNORE_INDEX = -100
PACKINGS = ("concat", "bestfit")


# ----------------------------------------------------------------------------------------------
# 1. RNG
# ----------------------------------------------------------------------------------------------

def finalize(z: int) -> int:
    """The splitmix64 output function (mod 2^64)."""
    z = ((z ^ (z >> 30)) * M1) & MASK64
    z = ((z ^ (z >> 27)) * M2) & MASK64
    return z ^ (z >> 31)


def mix64(x: int) -> int:
    """finalize(x + G): one splitmix64 step from state x."""
    return finalize((x + G) & MASK64)


class SplitMix64:
    """The splitmix64 generator: state advances by G, output is finalize(state)."""

    def __init__(self, state: int) -> None:
        self.state = _check_u64(state, "state")

    def next(self) -> int:
        """Advance and return the next 64-bit output."""
        self.state = (self.state + G) & MASK64
        return finalize(self.state)


def stream_state(seed: int, source: int, epoch: int, purpose: int) -> int:
    """The seed of the random stream for (seed, source, epoch, purpose)."""
    for name, value in (("seed", seed), ("source", source), ("epoch", epoch),
                        ("purpose", purpose)):
        _check_u64(value, name)
    return mix64(mix64(mix64(mix64(seed) ^ source) ^ epoch) ^ purpose)


def shuffle(n: int, state: int) -> np.ndarray:
    """Fisher-Yates permutation of range(n); j uses the multiply-high of a 64-bit draw."""
    if n < 0:
        raise ValueError(f"shuffle: n must be >= 0, got {n}")
    a = list(range(n))
    rng = SplitMix64(state)
    for i in range(n - 1, 0, -1):
        j = (rng.next() * (i + 1)) >> 64  # exact in Python ints: no modulo bias tricks needed
        a[i], a[j] = a[j], a[i]
    return np.array(a, dtype=np.int64)


def _check_u64(value: int, name: str) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {type(value).__name__}")
    value = int(value)
    if not 0 <= value <= MASK64:
        raise ValueError(f"{name} must be in [0, 2**64), got {value}")
    return value


# ----------------------------------------------------------------------------------------------
# 3. Compact rows, 5. best-fit decreasing
# ----------------------------------------------------------------------------------------------

@dataclass
class CompactRow:
    """One packed row: T+1 token slots, of which the first `used` are real tokens."""

    tokens: np.ndarray
    used: int
    segment_starts: list[int]
    token_count: int


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Pack items (given in window order) into rows; returns each row's item indices in order.

    Items are visited by length descending (stable); each goes to the row with the smallest
    remaining capacity that fits it, ties to the lowest row id, else to a new row.
    """
    visit = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # sorted() is stable
    rows: list[list[int]] = []
    # (remaining, row_id) kept sorted: the first entry >= (length, -1) is exactly the row with
    # the smallest sufficient remaining capacity and, among equal ones, the lowest id.
    open_rows: list[tuple[int, int]] = []
    for i in visit:
        length = lengths[i]
        if not 0 < length <= capacity:
            raise ValueError(f"item length {length} not in [1, {capacity}]")
        k = bisect.bisect_left(open_rows, (length, -1))
        if k < len(open_rows):
            remaining, row_id = open_rows.pop(k)
        else:
            remaining, row_id = capacity, len(rows)
            rows.append([])
        rows[row_id].append(i)
        bisect.insort(open_rows, (remaining - length, row_id))
    return rows


# ----------------------------------------------------------------------------------------------
# 8. Expansion
# ----------------------------------------------------------------------------------------------

def expand(rows: list[CompactRow], seq_len: int, pad_id: int = 0) -> dict:
    """Expand compact rows into input_ids / labels / position_ids [B, T] plus cu_seqlens."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    T = seq_len
    B = len(rows)
    input_ids = np.full((B, T), pad_id, dtype=np.int64)
    labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
    position_ids = np.zeros((B, T), dtype=np.int64)
    lengths: list[int] = []
    for b, row in enumerate(rows):
        if not 0 <= row.used <= T + 1 or len(row.tokens) != T + 1:
            raise ValueError(f"row {b} does not fit seq_len {T} (used {row.used}, "
                             f"{len(row.tokens)} slots)")
        starts = list(row.segment_starts)
        ends = starts[1:] + [row.used]
        for start, end in zip(starts, ends):
            for t in range(start, min(end, T)):
                input_ids[b, t] = row.tokens[t]
                position_ids[b, t] = t - start
                if t + 1 < end:  # the next token belongs to the same piece: it is a label
                    labels[b, t] = row.tokens[t + 1]
            if start < T:
                lengths.append(min(end, T) - start)
        for t in range(row.used, T):
            position_ids[b, t] = t - row.used
        if row.used < T:
            lengths.append(T - row.used)  # the padding is its own sequence
    cu_seqlens = np.zeros(len(lengths) + 1, dtype=np.int32)
    cu_seqlens[1:] = np.cumsum(lengths, dtype=np.int64)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "cu_seqlens": cu_seqlens,
        "max_seqlen": int(max(lengths, default=0)),
    }


# ----------------------------------------------------------------------------------------------
# The stream: 2. sources, 4./5. source rows, 6. mixture, 7. distribution
# ----------------------------------------------------------------------------------------------

class ReferenceStream:
    """The whole packed stream, computed lazily with plain-dict caches."""

    def __init__(self, sources: list[list[np.ndarray]], seq_len: int, *,
                 packing: str = "concat", window: int = 1024,
                 weights: list[float] | None = None, seed: int = 0, pad_id: int = 0) -> None:
        if not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
            raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
        if packing not in PACKINGS:
            raise ValueError(f"unknown packing {packing!r}; expected one of {PACKINGS}")
        if not isinstance(window, (int, np.integer)) or window < 1:
            raise ValueError(f"window must be an integer >= 1, got {window!r}")
        if len(sources) == 0:
            raise ValueError("at least one source is needed")
        self.seq_len = int(seq_len)
        self.packing = packing
        self.window = int(window)
        self.seed = _check_u64(seed, "seed")
        self.pad_id = int(pad_id)
        self.sources: list[list[np.ndarray]] = [
            [_as_document(doc, s, i) for i, doc in enumerate(docs)]
            for s, docs in enumerate(sources)
        ]
        # Tokens per epoch: the same every epoch, since an epoch is a permutation of documents.
        self.epoch_tokens = [sum(len(d) for d in docs) for docs in self.sources]
        for s, n in enumerate(self.epoch_tokens):
            if n == 0:
                raise ValueError(f"source {s} holds no tokens")
        self.probs = _probabilities(weights, len(self.sources))

        self._orders: dict[tuple[int, int], np.ndarray] = {}
        self._concat_epochs: dict[tuple[int, int], tuple[np.ndarray, list[int]]] = {}
        self._bestfit_epochs: dict[tuple[int, int], list[CompactRow]] = {}
        self._rows: dict[tuple[int, int], CompactRow] = {}
        # Blend prefix: choices for global rows 0..len-1 and the state after them.
        self._choices: list[tuple[int, int]] = []
        self._blend_rows = [0] * len(self.sources)
        self._blend_tokens = [0] * len(self.sources)
        self._blend_total = 0

    # -- 2. epoch orders --------------------------------------------------------------------

    def epoch_order(self, s: int, e: int) -> np.ndarray:
        """Document order of source s in epoch e."""
        key = (s, e)
        if key not in self._orders:
            self._orders[key] = shuffle(len(self.sources[s]), stream_state(self.seed, s, e, 0))
        return self._orders[key]

    # -- 4. concat ----------------------------------------------------------------------------

    def _concat_epoch(self, s: int, e: int) -> tuple[np.ndarray, list[int]]:
        """Epoch e's tokens in order, and the offsets where its non-empty documents begin."""
        key = (s, e)
        if key not in self._concat_epochs:
            docs = [self.sources[s][i] for i in self.epoch_order(s, e)]
            starts, offset = [], 0
            for doc in docs:
                if len(doc) > 0:
                    starts.append(offset)
                    offset += len(doc)
            self._concat_epochs[key] = (np.concatenate(docs).astype(np.int64), starts)
        return self._concat_epochs[key]

    def _concat_row(self, s: int, r: int) -> CompactRow:
        T = self.seq_len
        N = self.epoch_tokens[s]
        first = r * T  # stream position of slot 0
        tokens = np.empty(T + 1, dtype=np.int64)
        segment_starts = [0]
        filled = 0
        while filled < T + 1:  # a row may span several epochs when an epoch is short
            pos = first + filled
            e, offset = divmod(pos, N)
            epoch_tokens, doc_starts = self._concat_epoch(s, e)
            take = min(T + 1 - filled, N - offset)
            tokens[filled:filled + take] = epoch_tokens[offset:offset + take]
            for doc_start in doc_starts:
                slot = filled + (doc_start - offset)
                if offset <= doc_start < offset + take and slot >= 1:
                    segment_starts.append(slot)
            filled += take
        return CompactRow(tokens=tokens, used=T + 1, segment_starts=segment_starts,
                          token_count=T)

    # -- 5. bestfit ---------------------------------------------------------------------------

    def bestfit_epoch_rows(self, s: int, e: int) -> list[CompactRow]:
        """All rows of epoch e of source s, in emission order."""
        key = (s, e)
        if key in self._bestfit_epochs:
            return self._bestfit_epochs[key]
        T, W = self.seq_len, self.window
        docs = self.sources[s]
        order = self.epoch_order(s, e)
        epoch_rows: list[CompactRow] = []
        for w in range((len(order) + W - 1) // W):
            pieces: list[np.ndarray] = []
            for d in order[w * W:(w + 1) * W]:
                doc = docs[d]
                for start in range(0, len(doc), T):  # empty documents yield no pieces
                    pieces.append(doc[start:start + T])
            packed = best_fit_decreasing([len(p) for p in pieces], T)
            rows = [self._bestfit_row([pieces[i] for i in members]) for members in packed]
            perm = shuffle(len(rows), stream_state(self.seed, s, e, 1 + w))
            epoch_rows.extend(rows[int(i)] for i in perm)
        self._bestfit_epochs[key] = epoch_rows
        return epoch_rows

    def _bestfit_row(self, pieces: list[np.ndarray]) -> CompactRow:
        tokens = np.full(self.seq_len + 1, self.pad_id, dtype=np.int64)
        segment_starts, used = [], 0
        for piece in pieces:
            segment_starts.append(used)
            tokens[used:used + len(piece)] = piece
            used += len(piece)
        return CompactRow(tokens=tokens, used=used, segment_starts=segment_starts,
                          token_count=used)

    def _bestfit_locate(self, s: int, r: int) -> tuple[int, int]:
        """(epoch, index within that epoch) of bestfit source row r."""
        e = 0
        while True:
            n = len(self.bestfit_epoch_rows(s, e))
            if r < n:
                return e, r
            r -= n
            e += 1

    # -- source rows --------------------------------------------------------------------------

    def source_row(self, s: int, r: int) -> CompactRow:
        """Row r of source s's own row stream."""
        self._check_source(s)
        if r < 0:
            raise ValueError(f"row index must be >= 0, got {r}")
        key = (s, r)
        if key not in self._rows:
            if self.packing == "concat":
                self._rows[key] = self._concat_row(s, r)
            else:
                e, i = self._bestfit_locate(s, r)
                self._rows[key] = self.bestfit_epoch_rows(s, e)[i]
        return self._rows[key]

    def epoch_of_source_row(self, s: int, r: int) -> int:
        """The epoch in which row r of source s starts."""
        self._check_source(s)
        if r < 0:
            raise ValueError(f"row index must be >= 0, got {r}")
        if self.packing == "concat":
            return (r * self.seq_len) // self.epoch_tokens[s]
        return self._bestfit_locate(s, r)[0]

    def _token_count(self, s: int, r: int) -> int:
        if self.packing == "concat":
            return self.seq_len  # no need to build the row
        return self.source_row(s, r).token_count

    # -- 6. mixture ---------------------------------------------------------------------------

    def blend(self, n: int) -> list[tuple[int, int]]:
        """(source, source row) of global rows 0..n-1."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        while len(self._choices) < n:
            best = self._pick_source()
            r = self._blend_rows[best]
            count = self._token_count(best, r)
            self._choices.append((best, r))
            self._blend_rows[best] += 1
            self._blend_tokens[best] += count
            self._blend_total += count
        return self._choices[:n]

    def _pick_source(self) -> int:
        """Earliest deadline among the sources at or below their share (section 6)."""
        total = float(self._blend_total)
        positive = [s for s, p in enumerate(self.probs) if p > 0.0]
        eligible = [s for s in positive
                    if float(self._blend_tokens[s]) <= self.probs[s] * total]
        if not eligible:  # only reachable through rounding: fall back to the largest deficit
            best, best_value = -1, 0.0
            for s in positive:
                value = self.probs[s] * total - float(self._blend_tokens[s])
                if best < 0 or value > best_value:  # strict: ties keep the lowest s
                    best, best_value = s, value
            return best
        best, best_deadline = -1, 0.0
        for s in eligible:
            row_tokens = self._token_count(s, self._blend_rows[s])
            deadline = float(self._blend_tokens[s] + row_tokens) / self.probs[s]
            if best < 0 or deadline < best_deadline:  # strict: ties keep the lowest s
                best, best_deadline = s, deadline
        return best

    def blend_state(self, n: int) -> tuple[list[int], list[int]]:
        """(rows_s, tokens_s) per source after global rows 0..n-1 were taken."""
        choices = self.blend(n)
        rows = [0] * len(self.sources)
        tokens = [0] * len(self.sources)
        for s, r in choices:  # replay: the cached state is only the one after the longest prefix
            rows[s] += 1
            tokens[s] += self._token_count(s, r)
        return rows, tokens

    def global_row(self, g: int) -> CompactRow:
        """Global row g of the mixed stream."""
        if g < 0:
            raise ValueError(f"global row index must be >= 0, got {g}")
        s, r = self.blend(g + 1)[g]
        return self.source_row(s, r)

    # -- 7. distribution ----------------------------------------------------------------------

    def batch_rows(self, k: int, batch_size: int, rank: int = 0,
                   world_size: int = 1) -> list[CompactRow]:
        """The compact rows of batch k of `rank` (global rows k*W*B + j*W + rank)."""
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if k < 0:
            raise ValueError(f"batch index must be >= 0, got {k}")
        base = k * world_size * batch_size
        return [self.global_row(base + j * world_size + rank) for j in range(batch_size)]

    def batch(self, k: int, batch_size: int, rank: int = 0, world_size: int = 1) -> dict:
        """expand(batch_rows(...)): the batch as the model sees it."""
        return expand(self.batch_rows(k, batch_size, rank, world_size), self.seq_len,
                      self.pad_id)

    def _check_source(self, s: int) -> None:
        if not 0 <= s < len(self.sources):
            raise ValueError(f"source index must be in [0, {len(self.sources)}), got {s}")


def _as_document(doc, s: int, i: int) -> np.ndarray:
    """A document as a 1-D int64 array (an empty one of any dtype is fine)."""
    array = np.asarray(doc)
    if array.ndim != 1:
        raise ValueError(f"source {s} document {i}: expected a 1-D array, got {array.ndim}-D")
    if array.size and array.dtype.kind not in "iu":
        raise ValueError(f"source {s} document {i}: expected integer tokens, got {array.dtype}")
    return array.astype(np.int64)


def _probabilities(weights: list[float] | None, n: int) -> list[float]:
    """p_s = w_s / sum(w) in float64; the sum is taken left to right."""
    if weights is None:
        weights = [1.0] * n
    if len(weights) != n:
        raise ValueError(f"expected {n} weights (one per source), got {len(weights)}")
    values = [float(w) for w in weights]
    for s, w in enumerate(values):
        if not np.isfinite(w) or w < 0:
            raise ValueError(f"weight of source {s} must be finite and >= 0, got {w}")
    total = 0.0
    for w in values:  # explicit loop: sum() may use compensated summation on newer Pythons
        total += w
    if not total > 0:
        raise ValueError("the weights must not all be zero")
    return [w / total for w in values]
