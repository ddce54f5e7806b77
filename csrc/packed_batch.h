// A compact packed batch and the rule that expands it into model inputs. The rule lives here,
// once, as __host__ __device__ code: the CPU path (expand_row) and the CUDA kernel
// (expand_batch.cu, via expand_token) both call expand_position.
//
// Compact layout of a batch of B rows for sequence length T:
//   tokens          [B, T+1] token ids (uint16/uint32/int32); slots >= row_used[b] are padding.
//                   Slot T only supplies the label of position T-1 (concat rows overlap by one).
//   row_used        [B] slots holding real tokens (T+1 for concat rows, <= T for best-fit rows).
//   row_segments    [B+1] row b's segments are segment_starts[row_segments[b] .. row_segments[b+1]).
//   segment_starts  slot where each document (piece) begins, increasing, the first one 0.
// Expansion, for row b and position t < T inside segment [start, end):
//   input_ids = tokens[t], position_ids = t - start,
//   labels = tokens[t+1] if t+1 < end else -100   (no document predicts the next one),
// and at padding (t >= used): input_ids = pad_id, labels = -100, position_ids = t - used.
// Attention sequences (cu_seqlens): each segment clipped to [0, T), then the padding of the row
// as one more sequence.
#pragma once

#include <cstdint>

#include "shard_format.h"

namespace cptfast {

constexpr int64_t kIgnoreIndex = -100;

struct CompactBatchView {
  const void* tokens;
  TokenType token_type;
  int64_t rows;
  int64_t seq_len;  // T; a row has T + 1 token slots
  const int32_t* row_used;
  const int32_t* row_segments;
  const int32_t* segment_starts;
  int64_t pad_id;
};

struct ExpandedOutputs {
  int64_t* input_ids;     // [rows, T]
  int64_t* labels;        // [rows, T]
  int64_t* position_ids;  // [rows, T]
};

// The rule for one position t of row `row` whose segment is [start, end) (t < end <= used).
CPTFAST_HD inline void expand_position(const CompactBatchView& v, int64_t row, int64_t t,
                                       int64_t start, int64_t end, const ExpandedOutputs& out) {
  const int64_t slots = row * (v.seq_len + 1);
  const int64_t at = row * v.seq_len + t;
  out.input_ids[at] = load_token(v.tokens, v.token_type, slots + t);
  out.position_ids[at] = t - start;
  out.labels[at] = t + 1 < end ? load_token(v.tokens, v.token_type, slots + t + 1) : kIgnoreIndex;
}

CPTFAST_HD inline void expand_padding(const CompactBatchView& v, int64_t row, int64_t t,
                                      int64_t used, const ExpandedOutputs& out) {
  const int64_t at = row * v.seq_len + t;
  out.input_ids[at] = v.pad_id;
  out.labels[at] = kIgnoreIndex;
  out.position_ids[at] = t - used;
}

// One position, finding its segment by binary search (one GPU thread per token).
CPTFAST_HD inline void expand_token(const CompactBatchView& v, int64_t row, int64_t t,
                                    const ExpandedOutputs& out) {
  const int64_t used = v.row_used[row];
  if (t >= used) {
    expand_padding(v, row, t, used, out);
    return;
  }
  const int32_t* starts = v.segment_starts + v.row_segments[row];
  const int32_t count = v.row_segments[row + 1] - v.row_segments[row];
  int32_t lo = 0, hi = count;  // starts[lo] <= t < starts[hi], with starts[count] = +infinity
  while (hi - lo > 1) {
    const int32_t mid = (lo + hi) / 2;
    if (starts[mid] <= t) lo = mid; else hi = mid;
  }
  const int64_t end = lo + 1 < count ? starts[lo + 1] : used;
  expand_position(v, row, t, starts[lo], end, out);
}

// A whole row, walking its segments in order (the CPU path).
inline void expand_row(const CompactBatchView& v, int64_t row, const ExpandedOutputs& out) {
  const int64_t used = v.row_used[row];
  const int32_t first = v.row_segments[row], last = v.row_segments[row + 1];
  for (int32_t s = first; s < last; ++s) {
    const int64_t start = v.segment_starts[s];
    const int64_t end = s + 1 < last ? v.segment_starts[s + 1] : used;
    const int64_t stop = end < v.seq_len ? end : v.seq_len;
    for (int64_t t = start; t < stop; ++t) expand_position(v, row, t, start, end, out);
  }
  for (int64_t t = used; t < v.seq_len; ++t) expand_padding(v, row, t, used, out);
}

// Number of attention sequences of the batch (the length of cu_seqlens minus one).
inline int64_t count_sequences(const CompactBatchView& v) {
  int64_t n = 0;
  for (int64_t row = 0; row < v.rows; ++row) {
    for (int32_t s = v.row_segments[row]; s < v.row_segments[row + 1]; ++s) {
      n += v.segment_starts[s] < v.seq_len;
    }
    n += v.row_used[row] < v.seq_len;
  }
  return n;
}

// Fills cu_seqlens [count_sequences + 1] and returns max_seqlen; host-side, from metadata only,
// so a GPU batch never needs a device-to-host read to learn max_seqlen.
inline int64_t fill_cu_seqlens(const CompactBatchView& v, int32_t* cu_seqlens) {
  int64_t n = 0, longest = 0, total = 0;
  cu_seqlens[0] = 0;
  auto emit = [&](int64_t length) {
    total += length;
    cu_seqlens[++n] = static_cast<int32_t>(total);
    longest = length > longest ? length : longest;
  };
  for (int64_t row = 0; row < v.rows; ++row) {
    const int64_t used = v.row_used[row];
    const int32_t first = v.row_segments[row], last = v.row_segments[row + 1];
    for (int32_t s = first; s < last; ++s) {
      const int64_t start = v.segment_starts[s];
      if (start >= v.seq_len) continue;
      const int64_t end = s + 1 < last ? v.segment_starts[s + 1] : used;
      emit((end < v.seq_len ? end : v.seq_len) - start);
    }
    if (used < v.seq_len) emit(v.seq_len - used);
  }
  return longest;
}

}  // namespace cptfast
