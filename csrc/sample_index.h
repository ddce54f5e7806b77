// The sample index: from (sources, T, seed, epoch) to shuffled, packed rows, and the
// deterministic token-weighted blend of several sources into one global stream of rows.
// The exact rules (shared with the numpy oracle) are in cptfast/data/packing_reference.py.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "token_shard.h"

namespace cptfast {

enum class Packing { kConcat, kBestfit };

// The token type that holds every id of all the given types: the common one, else the widest
// (uint32, or int64 when one is 64-bit), so files of different dtypes mix without loss.
TokenType common_token_type(const std::vector<TokenType>& types);

// The documents of one source: the shards' documents in order, numbered 0..num_documents-1.
// Consecutive files split by the same delimiter (llm.c shards, headerless files) form one
// token stream: a document a file's end cuts continues into the next file and is one document
// here, read across the two memory maps.
class Source {
 public:
  explicit Source(std::vector<std::shared_ptr<TokenShard>> shards);
  int64_t num_documents() const { return static_cast<int64_t>(lengths_.size()); }
  int64_t num_tokens() const { return num_tokens_; }
  // The type the source's tokens are handed out in (its shards' common type).
  TokenType token_type() const { return token_type_; }
  int64_t length(int64_t doc) const { return lengths_[doc]; }
  // Documents cut at the source's own edges (no next file to continue in, or no previous one).
  int64_t cut_documents() const { return cut_documents_; }
  // Copies tokens [offset, offset + count) of `doc` to `out` as `out_type`. Every access is
  // bounds-checked: a document or range outside the source (an epoch index that does not
  // belong to these shards) raises a ShardError naming the source and the document.
  void copy_tokens(int64_t doc, int64_t offset, int64_t count, uint8_t* out,
                   TokenType out_type) const;
  const std::string& first_path() const { return shards_[0]->path(); }

 private:
  std::vector<std::shared_ptr<TokenShard>> shards_;
  // Shard k's tokens sit at [stream_start_[k], stream_start_[k + 1]) of the source's stream;
  // its local documents skip_[k].. are the global ones first_doc_[k]..first_doc_[k + 1] - 1
  // (the first skip_[k] continue the previous file's last document).
  std::vector<int64_t> stream_start_;  // [shards + 1]
  std::vector<int64_t> first_doc_;     // [shards + 1]
  std::vector<int64_t> skip_;          // [shards]
  std::vector<int32_t> lengths_;
  int64_t num_tokens_ = 0;
  int64_t cut_documents_ = 0;
  TokenType token_type_ = TokenType::kU16;
};

// One piece of a document placed in a row: tokens [start, start + length) of `doc`.
struct Piece {
  uint32_t doc;
  int32_t start;
  int32_t length;
};

// What one epoch of one source packs into.
struct Epoch {
  // concat: document order and where each begins in the epoch's token stream ([D + 1]).
  std::vector<uint32_t> order;
  std::vector<int64_t> stream_start;
  // bestfit: rows as runs of pieces: row r holds pieces[row_first[r] .. row_first[r + 1]).
  std::vector<int64_t> row_first;
  std::vector<Piece> pieces;
  int64_t num_rows() const { return static_cast<int64_t>(row_first.size()) - 1; }
};

// The on-disk cache of built epochs: a header (the source's document and token counts, the
// array sizes, a checksum of the arrays, a checksum of the header itself), then the four
// arrays as they are in memory. load_epoch returns false for a missing, truncated, corrupt,
// stale (counts of another source) or foreign file, which is then rebuilt and rewritten;
// save_epoch writes atomically (temporary name, then rename) and leaves nothing on failure.
bool load_epoch(const std::string& path, const Source& source, Epoch* out);
void save_epoch(const std::string& path, const Source& source, const Epoch& epoch);

std::shared_ptr<Epoch> build_concat_epoch(const Source& src, uint64_t seed, uint64_t source_id,
                                          uint64_t epoch);
std::shared_ptr<Epoch> build_bestfit_epoch(const Source& src, int64_t seq_len, int64_t window,
                                           uint64_t seed, uint64_t source_id, uint64_t epoch);

// Fills one compact row: `tokens` has seq_len + 1 slots of the source's token type; segment
// starts are appended to `segment_starts`. Returns the number of used slots.
struct RowSink {
  uint8_t* tokens;
  std::vector<int32_t>* segment_starts;
};

// The endless row stream of one source across epochs (each epoch reshuffled), with a small
// cache of built epochs. Thread-safe.
class SourceStream {
 public:
  // cache_prefix: path prefix of this stream's cached epochs ("<prefix>-e<epoch>.cptidx"), a
  // digest of everything the index depends on; empty to keep epochs in memory only.
  SourceStream(std::shared_ptr<Source> source, uint64_t source_id, Packing packing,
               int64_t seq_len, int64_t window, uint64_t seed, std::string cache_prefix);
  // Tokens row r contributes to the mixture (T for concat, its real tokens for bestfit).
  int64_t row_tokens(int64_t r);
  // The epoch that row r starts in.
  int64_t row_epoch(int64_t r);
  // Fills row r into `sink` (tokens as `type`); returns the number of used slots.
  int32_t fill_row(int64_t r, const RowSink& sink, TokenType type, int64_t pad_id);
  const Source& source() const { return *source_; }

 private:
  std::shared_ptr<const Epoch> epoch(int64_t e);
  [[noreturn]] void broken_index(int64_t e, const std::string& problem) const;
  // bestfit: the checked range of pieces of row i of epoch e.
  std::pair<int64_t, int64_t> row_pieces(const Epoch& ep, int64_t e, int64_t i) const;
  // bestfit: (epoch, row within it) of source row r, building epochs as needed.
  std::pair<int64_t, int64_t> locate_bestfit_row(int64_t r);

  std::shared_ptr<Source> source_;
  uint64_t source_id_;
  Packing packing_;
  int64_t seq_len_, window_;
  uint64_t seed_;
  std::string cache_prefix_;
  std::mutex mutex_;
  std::map<int64_t, std::shared_ptr<const Epoch>> cache_;
  std::vector<int64_t> bestfit_epoch_first_row_{0};  // cumulative rows of epochs 0..k-1
};

// Position in the blended stream: the next global row and, per source, the next row and the
// tokens taken so far. This (with the seed) is the whole resumable state of the data.
struct MixState {
  int64_t global_row = 0;
  std::vector<int64_t> rows;
  std::vector<int64_t> tokens;
};

// Picks the source of the next global row: among sources of positive weight at or below their
// token share (tokens_s <= p_s * total), the earliest deadline (tokens_s + next_row_tokens_s) /
// p_s, the lowest index on ties; if rounding leaves none eligible, the largest p_s * total -
// tokens_s. Earliest-deadline-first over released rows keeps every share within one row.
int pick_source(const std::vector<double>& probabilities, const MixState& state,
                const std::vector<int64_t>& next_row_tokens);

}  // namespace cptfast
