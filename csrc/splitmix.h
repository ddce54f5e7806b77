// The one random number generator of the sample index: splitmix64, its seeding and the
// Fisher-Yates shuffle built on it. The numpy oracle (cptfast/data/packing_reference.py)
// implements the same three rules, so both produce identical orders for identical seeds.
#pragma once

#include <cstdint>
#include <vector>

#include "shard_format.h"

namespace cptfast {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;

CPTFAST_HD inline uint64_t splitmix_finalize(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

CPTFAST_HD inline uint64_t mix64(uint64_t x) { return splitmix_finalize(x + kGolden); }

// The seed of one independent stream: (run seed, source, epoch, purpose). Purpose 0 orders an
// epoch's documents; purpose 1 + w orders the rows of best-fit window w.
CPTFAST_HD inline uint64_t stream_state(uint64_t seed, uint64_t source, uint64_t epoch,
                                        uint64_t purpose) {
  return mix64(mix64(mix64(mix64(seed) ^ source) ^ epoch) ^ purpose);
}

struct SplitMix64 {
  uint64_t state;
  CPTFAST_HD uint64_t next() { return splitmix_finalize(state += kGolden); }
  // Uniform in [0, bound): the high half of a 64 x 64-bit product (bias < bound / 2^64).
  CPTFAST_HD uint64_t below(uint64_t bound) {
    return static_cast<uint64_t>((static_cast<unsigned __int128>(next()) * bound) >> 64);
  }
};

// Fisher-Yates from the last index down: the permutation of 0..n-1 for `state`.
template <typename Index>
std::vector<Index> shuffled_indices(uint64_t n, uint64_t state) {
  std::vector<Index> order(n);
  for (uint64_t i = 0; i < n; ++i) order[i] = static_cast<Index>(i);
  SplitMix64 rng{state};
  for (uint64_t i = n; i-- > 1;) {
    const uint64_t j = rng.below(i + 1);
    Index tmp = order[i];
    order[i] = order[j];
    order[j] = tmp;
  }
  return order;
}

}  // namespace cptfast
