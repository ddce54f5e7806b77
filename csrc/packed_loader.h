// The packed loader: plans which global rows this rank reads (the blend is computed on every
// rank, identically), gathers them from the memory maps on background threads into compact
// batches, and hands them out in order through a bounded queue.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "packed_batch.h"
#include "sample_index.h"

namespace cptfast {

struct CompactBatch {
  int64_t rows = 0, seq_len = 0;
  TokenType token_type = TokenType::kU16;
  std::vector<uint8_t> tokens;            // [rows, seq_len + 1] of token_type
  std::vector<int32_t> row_used;          // [rows]
  std::vector<int32_t> row_segments;      // [rows + 1]
  std::vector<int32_t> segment_starts;
  std::vector<int32_t> row_source;        // [rows] source of each row
  std::vector<int64_t> global_row;        // [rows] position of each row in the global stream
  std::vector<int64_t> source_row;        // [rows] position of each row in its source's stream
  MixState state_after;                   // the global position once this batch is consumed
  int64_t pad_id = 0;
  // Filled by the gathering thread when the loader expands on the host (LoaderOptions::expand).
  bool expanded = false;
  std::vector<int64_t> input_ids, labels, position_ids;  // [rows, seq_len]
  std::vector<int32_t> cu_seqlens;
  int64_t max_seqlen = 0;

  CompactBatchView view() const {
    return {tokens.data(), token_type, rows, seq_len, row_used.data(), row_segments.data(),
            segment_starts.data(), pad_id};
  }
};

struct LoaderOptions {
  Packing packing = Packing::kConcat;
  int64_t seq_len = 2048;
  int64_t batch_size = 1;  // rows per rank per batch
  int64_t window = 1024;   // bestfit window, in documents
  uint64_t seed = 0;
  int64_t rank = 0, world_size = 1;
  int64_t num_threads = 2;  // 0: gather on the calling thread
  int64_t prefetch = 4;     // batches ready or being gathered ahead of the consumer
  int64_t pad_id = 0;
  bool expand = true;  // expand on the gathering threads (batches bound for the CPU)
};

class PackedLoader {
 public:
  // cache_prefixes: one per source (see SourceStream), or empty for no on-disk index cache.
  PackedLoader(std::vector<std::shared_ptr<Source>> sources, std::vector<double> weights,
               LoaderOptions options, MixState start, std::vector<std::string> cache_prefixes);
  ~PackedLoader();
  PackedLoader(const PackedLoader&) = delete;
  PackedLoader& operator=(const PackedLoader&) = delete;

  // The next batch of this rank; blocks until it is gathered. Rethrows a worker's error.
  std::unique_ptr<CompactBatch> next();
  int64_t row_epoch(int source, int64_t row) { return streams_[source]->row_epoch(row); }
  int num_sources() const { return static_cast<int>(streams_.size()); }

 private:
  struct Plan {
    int64_t index;
    std::vector<int32_t> source;
    std::vector<int64_t> source_row, global_row;
    MixState state_after;
  };
  Plan plan_next();  // caller holds mutex_
  std::unique_ptr<CompactBatch> gather(const Plan& plan);
  void worker();

  std::vector<std::unique_ptr<SourceStream>> streams_;
  std::vector<double> probabilities_;
  LoaderOptions options_;
  TokenType token_type_;

  std::mutex mutex_;
  std::condition_variable changed_;
  MixState planned_;  // blend state after the last planned batch
  int64_t next_to_plan_ = 0, next_to_deliver_ = 0;
  std::map<int64_t, std::unique_ptr<CompactBatch>> ready_;
  std::exception_ptr error_;
  bool stopping_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace cptfast
