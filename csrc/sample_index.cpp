#include "sample_index.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <functional>
#include <thread>
#include <set>
#include <stdexcept>

#include "splitmix.h"

namespace cptfast {

TokenType common_token_type(const std::vector<TokenType>& types) {
  bool mixed = false, wide = false;
  for (TokenType t : types) {
    mixed = mixed || t != types[0];
    wide = wide || token_itemsize(t) == 8;
  }
  if (!mixed) return types[0];
  return wide ? TokenType::kI64 : TokenType::kU32;  // ids are non-negative (vocabulary-checked)
}

namespace {
// Whether two files are pieces of one delimiter-split stream (a document may cross them).
bool same_stream(const TokenShard& a, const TokenShard& b) {
  return a.delimiter_role() != DelimiterRole::kNone && a.kind() == b.kind() &&
         a.delimiter_role() == b.delimiter_role() && a.delimiter() == b.delimiter() &&
         a.num_tokens() > 0 && b.num_tokens() > 0;
}

bool is_delimiter(const TokenShard& s, int64_t i) {
  return load_token(s.tokens(), s.token_type(), i) == s.delimiter();
}
}  // namespace

Source::Source(std::vector<std::shared_ptr<TokenShard>> shards) : shards_(std::move(shards)) {
  if (shards_.empty()) throw std::invalid_argument("a source needs at least one shard file");
  std::vector<TokenType> types;
  std::vector<int64_t> lengths;  // int64 while documents may still grow across files
  stream_start_.push_back(0);
  bool open = false;  // the last document may go on in the next file
  for (size_t k = 0; k < shards_.size(); ++k) {
    const TokenShard& shard = *shards_[k];
    types.push_back(shard.token_type());
    const auto& offsets = shard.document_offsets();
    const int64_t local = static_cast<int64_t>(offsets.size()) - 1;
    const bool follows = k > 0 && same_stream(*shards_[k - 1], shard);  // one stream
    const bool continues = open && follows && !lengths.empty();
    if (open && !continues) ++cut_documents_;  // the previous file's last document is cut
    int64_t skip = 0;
    if (continues && offsets[0] > 0) {
      lengths.back() += offsets[0];  // the leading end-of-text closes the previous document
    } else if (continues && local > 0 &&
               !(shard.delimiter_role() == DelimiterRole::kStart && is_delimiter(shard, 0))) {
      lengths.back() += offsets[1];  // the head is the rest of the previous document
      skip = 1;
    }
    skip_.push_back(skip);
    first_doc_.push_back(static_cast<int64_t>(lengths.size()));
    for (int64_t d = skip; d < local; ++d) lengths.push_back(offsets[d + 1] - offsets[d]);
    const int64_t n = shard.num_tokens();
    if (shard.delimiter_role() == DelimiterRole::kNone || n == 0) {
      open = false;
    } else {
      // The first file of a stream whose head did not open with the delimiter starts cut
      // (llm.c prepends the delimiter to every document, a BOS begins one).
      const bool prepended = shard.delimiter_role() == DelimiterRole::kStart ||
                             shard.kind() == ShardKind::kLlmc;
      if (!follows && prepended && !is_delimiter(shard, 0) && local > 0) ++cut_documents_;
      open = shard.delimiter_role() == DelimiterRole::kStart || !is_delimiter(shard, n - 1);
      // A start-delimited stream's last document is complete at the source's end.
      if (shard.delimiter_role() == DelimiterRole::kStart && k + 1 == shards_.size()) open = false;
    }
    stream_start_.push_back(stream_start_.back() + n);
  }
  if (open) ++cut_documents_;
  first_doc_.push_back(static_cast<int64_t>(lengths.size()));
  token_type_ = common_token_type(types);
  lengths_.reserve(lengths.size());
  for (size_t d = 0; d < lengths.size(); ++d) {
    if (lengths[d] > INT32_MAX) {
      throw std::invalid_argument(first_path() + ": document " + std::to_string(d) +
                                  " of the source has more than 2^31 - 1 tokens");
    }
    lengths_.push_back(static_cast<int32_t>(lengths[d]));
    num_tokens_ += lengths[d];
  }
  if (lengths_.size() >= (1ull << 32)) {
    throw std::invalid_argument("a source may hold at most 2^32 - 1 documents; split it");
  }
  if (num_tokens_ == 0) {
    throw std::invalid_argument("source " + shards_[0]->path() +
                                " has no tokens (every document is empty)");
  }
}

void Source::copy_tokens(int64_t doc, int64_t offset, int64_t count, uint8_t* out,
                         TokenType out_type) const {
  if (doc < 0 || doc >= num_documents() || offset < 0 || count < 0 ||
      offset + count > lengths_[doc]) {
    throw ShardError(
        "source " + first_path() + ": tokens [" + std::to_string(offset) + ", " +
        std::to_string(offset + count) + ") of document " + std::to_string(doc) +
        " are outside the source (" + std::to_string(num_documents()) + " documents" +
        (doc >= 0 && doc < num_documents() ? ", this one of " + std::to_string(lengths_[doc]) +
                                                 " tokens"
                                           : std::string()) +
        "): the epoch index does not belong to these shards. Delete the loader's index cache "
        "(index_cache=, default ~/.cache/cptfast/index) and report this as a bug.");
  }
  // The shard holding the document's first token (the last one whose first document it is).
  size_t k = std::upper_bound(first_doc_.begin(), first_doc_.end() - 1, doc) - first_doc_.begin() - 1;
  const int64_t local = doc - first_doc_[k] + skip_[k];
  int64_t position = stream_start_[k] + shards_[k]->document_offsets()[local] + offset;
  const int64_t out_size = token_itemsize(out_type);
  while (count > 0) {  // a document continued in the next file crosses into its mapping
    while (position >= stream_start_[k + 1]) ++k;
    const TokenShard& shard = *shards_[k];
    const int64_t start = position - stream_start_[k];
    const int64_t n = std::min(count, stream_start_[k + 1] - position);
    if (shard.token_type() == out_type) {
      std::memcpy(out, static_cast<const uint8_t*>(shard.tokens()) + start * shard.itemsize(),
                  n * out_size);
    } else {  // a source of files of other dtypes: widen
      for (int64_t i = 0; i < n; ++i) {
        store_token(out, out_type, i, load_token(shard.tokens(), shard.token_type(), start + i));
      }
    }
    out += n * out_size;
    position += n;
    count -= n;
  }
}

std::shared_ptr<Epoch> build_concat_epoch(const Source& src, uint64_t seed, uint64_t source_id,
                                          uint64_t epoch) {
  auto out = std::make_shared<Epoch>();
  const int64_t n = src.num_documents();
  out->order = shuffled_indices<uint32_t>(n, stream_state(seed, source_id, epoch, 0));
  out->stream_start.resize(n + 1);
  int64_t position = 0;
  for (int64_t k = 0; k < n; ++k) {
    out->stream_start[k] = position;
    position += src.length(out->order[k]);
  }
  out->stream_start[n] = position;
  return out;
}

std::shared_ptr<Epoch> build_bestfit_epoch(const Source& src, int64_t seq_len, int64_t window,
                                           uint64_t seed, uint64_t source_id, uint64_t epoch) {
  auto out = std::make_shared<Epoch>();
  const int64_t n = src.num_documents();
  const auto order = shuffled_indices<uint32_t>(n, stream_state(seed, source_id, epoch, 0));
  out->row_first.push_back(0);
  std::vector<Piece> pieces;
  std::vector<std::vector<Piece>> rows;
  std::set<std::pair<int64_t, int64_t>> open;  // (remaining capacity, row id)
  for (int64_t w = 0; w * window < n; ++w) {
    pieces.clear();
    for (int64_t k = w * window; k < std::min(n, (w + 1) * window); ++k) {
      const uint32_t doc = order[k];
      const int64_t length = src.length(doc);
      for (int64_t start = 0; start < length; start += seq_len) {
        pieces.push_back({doc, static_cast<int32_t>(start),
                          static_cast<int32_t>(std::min(seq_len, length - start))});
      }
    }
    // Best-fit decreasing: longest first (stable), each into the fullest row it fits.
    std::stable_sort(pieces.begin(), pieces.end(),
                     [](const Piece& a, const Piece& b) { return a.length > b.length; });
    rows.clear();
    open.clear();
    for (const Piece& piece : pieces) {
      auto fit = open.lower_bound({piece.length, INT64_MIN});
      int64_t row, remaining;
      if (fit == open.end()) {
        row = static_cast<int64_t>(rows.size());
        rows.emplace_back();
        remaining = seq_len - piece.length;
      } else {
        row = fit->second;
        remaining = fit->first - piece.length;
        open.erase(fit);
      }
      rows[row].push_back(piece);
      if (remaining > 0) open.insert({remaining, row});
    }
    const auto emitted = shuffled_indices<uint32_t>(rows.size(),
                                                    stream_state(seed, source_id, epoch, 1 + w));
    for (uint32_t r : emitted) {
      out->pieces.insert(out->pieces.end(), rows[r].begin(), rows[r].end());
      out->row_first.push_back(static_cast<int64_t>(out->pieces.size()));
    }
  }
  return out;
}

namespace {
constexpr char kEpochMagic[8] = {'C', 'P', 'T', 'I', 'D', 'X', '2', '\0'};

// Fletcher-style sums over 8-byte words in four interleaved lanes: position-sensitive (a
// swapped, dropped or flipped word changes them) and fast enough to run as the bytes arrive.
// Not cryptographic: it guards against torn, truncated and bit-rotted files, not forgeries.
struct Checksum {
  uint64_t a[4] = {0x9e3779b97f4a7c15ull, 0, 0, 0}, b[4] = {0, 0, 0, 0};
  void add(const void* data, size_t bytes) {
    const uint8_t* p = static_cast<const uint8_t*>(data);
    size_t i = 0;
    for (; i + 32 <= bytes; i += 32) {  // word j of each 32-byte block goes to lane j
      uint64_t w[4];
      std::memcpy(w, p + i, 32);
      for (int j = 0; j < 4; ++j) {
        a[j] += w[j];
        b[j] += a[j];
      }
    }
    for (; i + 8 <= bytes; i += 8) {  // whole words of the tail: lane 0
      uint64_t word;
      std::memcpy(&word, p + i, 8);
      a[0] += word;
      b[0] += a[0];
    }
    uint64_t last = 0;
    std::memcpy(&last, p + i, bytes - i);
    a[0] += last ^ (static_cast<uint64_t>(bytes) << 56);  // the length counts too
    b[0] += a[0];
  }
  // An array is summed in chunks of kChunk bytes (the last one shorter), so a reader can sum
  // each chunk as it arrives, while it is still in the cache.
  static constexpr size_t kChunk = size_t{1} << 18;
  void add_array(const void* data, size_t bytes) {
    for (size_t at = 0; at < bytes; at += kChunk) {
      add(static_cast<const uint8_t*>(data) + at, std::min(kChunk, bytes - at));
    }
  }
  // The lanes folded into two words (odd multipliers keep them apart).
  uint64_t sum_a() const { return a[0] + 3 * a[1] + 5 * a[2] + 7 * a[3]; }
  uint64_t sum_b() const { return b[0] + 3 * b[1] + 5 * b[2] + 7 * b[3]; }
};

// Header: magic, then these words, then the checksum of the magic and the words.
struct EpochHeader {
  uint64_t documents, tokens;
  uint64_t counts[4];  // order, stream_start, row_first, pieces
  uint64_t sum_a, sum_b;
};

uint64_t header_checksum(const EpochHeader& h) {
  Checksum c;
  c.add(kEpochMagic, 8);
  c.add(&h, sizeof(h));
  return c.sum_a() ^ (c.sum_b() * 0xff51afd7ed558ccdull);
}

// Reads an array chunk by chunk, summing each one as it arrives (as Checksum::add_array).
template <typename T>
bool read_array(std::FILE* f, std::vector<T>* values, uint64_t count, Checksum* sum) {
  values->resize(count);
  uint8_t* bytes = reinterpret_cast<uint8_t*>(values->data());
  const size_t total = count * sizeof(T);
  for (size_t at = 0; at < total; at += Checksum::kChunk) {
    const size_t n = std::min(Checksum::kChunk, total - at);
    if (std::fread(bytes + at, 1, n, f) != n) return false;
    sum->add(bytes + at, n);
  }
  return true;
}

template <typename T>
bool write_array(std::FILE* f, const std::vector<T>& values, Checksum* sum) {
  sum->add_array(values.data(), values.size() * sizeof(T));
  return values.empty() || std::fwrite(values.data(), sizeof(T), values.size(), f) == values.size();
}

// The shape an epoch of `source` must have: what a stale or forged cache file gets wrong.
bool plausible(const Epoch& e, const Source& source) {
  const uint64_t n = static_cast<uint64_t>(source.num_documents());
  if (!e.order.empty() || !e.stream_start.empty()) {  // concat
    return e.row_first.empty() && e.pieces.empty() && e.order.size() == n &&
           e.stream_start.size() == n + 1 && e.stream_start.front() == 0 &&
           e.stream_start.back() == source.num_tokens();
  }
  return !e.row_first.empty() && e.row_first.front() == 0 &&
         e.row_first.back() == static_cast<int64_t>(e.pieces.size());
}
}  // namespace

bool load_epoch(const std::string& path, const Source& source, Epoch* out) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) return false;
  char magic[8];
  EpochHeader h;
  uint64_t stored_checksum = 0;
  bool ok = std::fread(magic, 1, 8, f) == 8 && std::memcmp(magic, kEpochMagic, 8) == 0 &&
            std::fread(&h, sizeof(h), 1, f) == 1 && std::fread(&stored_checksum, 8, 1, f) == 1 &&
            stored_checksum == header_checksum(h) &&
            h.documents == static_cast<uint64_t>(source.num_documents()) &&
            h.tokens == static_cast<uint64_t>(source.num_tokens());
  // Each count is bounded by the file size before anything is allocated.
  if (ok) {
    std::fseek(f, 0, SEEK_END);
    const uint64_t size = static_cast<uint64_t>(std::ftell(f));
    const uint64_t expected = 8 + sizeof(h) + 8 + h.counts[0] * sizeof(uint32_t) +
                              h.counts[1] * sizeof(int64_t) + h.counts[2] * sizeof(int64_t) +
                              h.counts[3] * sizeof(Piece);
    ok = h.counts[0] <= size && h.counts[1] <= size && h.counts[2] <= size &&
         h.counts[3] <= size && expected == size;
    std::fseek(f, 8 + sizeof(h) + 8, SEEK_SET);
  }
  Checksum sum;
  ok = ok && read_array(f, &out->order, h.counts[0], &sum) &&
       read_array(f, &out->stream_start, h.counts[1], &sum) &&
       read_array(f, &out->row_first, h.counts[2], &sum) &&
       read_array(f, &out->pieces, h.counts[3], &sum) && sum.sum_a() == h.sum_a && sum.sum_b() == h.sum_b &&
       plausible(*out, source);
  std::fclose(f);
  return ok;
}

void save_epoch(const std::string& path, const Source& source, const Epoch& epoch) {
  const std::string partial = path + ".partial-" + std::to_string(::getpid()) + "-" +
                              std::to_string(std::hash<std::thread::id>{}(std::this_thread::get_id()));
  std::FILE* f = std::fopen(partial.c_str(), "wb");
  if (f == nullptr) return;
  EpochHeader h{static_cast<uint64_t>(source.num_documents()),
                static_cast<uint64_t>(source.num_tokens()),
                {epoch.order.size(), epoch.stream_start.size(), epoch.row_first.size(),
                 epoch.pieces.size()},
                0, 0};
  // The arrays go after the header, whose checksum covers their sums: write a placeholder
  // header, the arrays, then the real header.
  const uint64_t zero = 0;
  bool ok = std::fwrite(kEpochMagic, 1, 8, f) == 8 && std::fwrite(&h, sizeof(h), 1, f) == 1 &&
            std::fwrite(&zero, 8, 1, f) == 1;
  Checksum sum;
  ok = ok && write_array(f, epoch.order, &sum) && write_array(f, epoch.stream_start, &sum) &&
       write_array(f, epoch.row_first, &sum) && write_array(f, epoch.pieces, &sum);
  h.sum_a = sum.sum_a();
  h.sum_b = sum.sum_b();
  const uint64_t checksum = header_checksum(h);
  ok = ok && std::fseek(f, 8, SEEK_SET) == 0 && std::fwrite(&h, sizeof(h), 1, f) == 1 &&
       std::fwrite(&checksum, 8, 1, f) == 1;
  ok = std::fflush(f) == 0 && ::fsync(::fileno(f)) == 0 && ok;
  std::fclose(f);
  if (!ok || std::rename(partial.c_str(), path.c_str()) != 0) std::remove(partial.c_str());
}

SourceStream::SourceStream(std::shared_ptr<Source> source, uint64_t source_id, Packing packing,
                           int64_t seq_len, int64_t window, uint64_t seed, std::string cache_prefix)
    : source_(std::move(source)), source_id_(source_id), packing_(packing), seq_len_(seq_len),
      window_(window), seed_(seed), cache_prefix_(std::move(cache_prefix)) {}

std::shared_ptr<const Epoch> SourceStream::epoch(int64_t e) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto found = cache_.find(e);
  if (found != cache_.end()) return found->second;
  const std::string cached = cache_prefix_.empty() ? ""
                                                   : cache_prefix_ + "-e" + std::to_string(e) + ".cptidx";
  auto loaded = std::make_shared<Epoch>();
  std::shared_ptr<const Epoch> built;
  if (!cached.empty() && load_epoch(cached, *source_, loaded.get())) {
    built = loaded;
  } else {
    auto fresh = packing_ == Packing::kConcat
                     ? build_concat_epoch(*source_, seed_, source_id_, e)
                     : build_bestfit_epoch(*source_, seq_len_, window_, seed_, source_id_, e);
    if (!cached.empty()) save_epoch(cached, *source_, *fresh);
    built = fresh;
  }
  cache_[e] = built;
  // A few epochs stay built (a batch can straddle a boundary); readers hold their own reference.
  while (cache_.size() > 4) cache_.erase(cache_.begin()->first == e ? std::next(cache_.begin())
                                                                     : cache_.begin());
  return built;
}

std::pair<int64_t, int64_t> SourceStream::locate_bestfit_row(int64_t r) {
  while (true) {
    int64_t next_epoch;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const auto& first = bestfit_epoch_first_row_;
      if (r < first.back()) {
        const int64_t e = std::upper_bound(first.begin(), first.end(), r) - first.begin() - 1;
        return {e, r - first[e]};
      }
      next_epoch = static_cast<int64_t>(first.size()) - 1;
    }
    const int64_t rows = epoch(next_epoch)->num_rows();
    std::lock_guard<std::mutex> lock(mutex_);
    if (static_cast<int64_t>(bestfit_epoch_first_row_.size()) - 1 == next_epoch) {
      bestfit_epoch_first_row_.push_back(bestfit_epoch_first_row_.back() + rows);
    }
  }
}

int64_t SourceStream::row_tokens(int64_t r) {
  if (packing_ == Packing::kConcat) return seq_len_;
  const auto [e, i] = locate_bestfit_row(r);
  const auto ep = epoch(e);
  int64_t total = 0;
  const auto [first, last] = row_pieces(*ep, e, i);
  for (int64_t p = first; p < last; ++p) total += ep->pieces[p].length;
  return total;
}

int64_t SourceStream::row_epoch(int64_t r) {
  if (packing_ == Packing::kConcat) return r * seq_len_ / source_->num_tokens();
  return locate_bestfit_row(r).first;
}

void SourceStream::broken_index(int64_t e, const std::string& problem) const {
  throw ShardError("source " + source_->first_path() + ", epoch " + std::to_string(e) +
                   ": the epoch index is broken (" + problem + "); it does not belong to these "
                   "shards. Delete the loader's index cache (index_cache=, default "
                   "~/.cache/cptfast/index) and report this as a bug.");
}

std::pair<int64_t, int64_t> SourceStream::row_pieces(const Epoch& ep, int64_t e, int64_t i) const {
  const int64_t first = ep.row_first[i], last = ep.row_first[i + 1];
  if (first < 0 || last < first || last > static_cast<int64_t>(ep.pieces.size())) {
    broken_index(e, "row " + std::to_string(i) + " points at pieces [" + std::to_string(first) +
                        ", " + std::to_string(last) + ")");
  }
  return {first, last};
}

int32_t SourceStream::fill_row(int64_t r, const RowSink& sink, TokenType type, int64_t pad_id) {
  const int64_t isz = token_itemsize(type);
  const int64_t slots = seq_len_ + 1;
  int64_t filled = 0;
  sink.segment_starts->push_back(0);
  if (packing_ == Packing::kConcat) {
    const int64_t per_epoch = source_->num_tokens();
    int64_t position = r * seq_len_;
    std::shared_ptr<const Epoch> ep;
    int64_t ep_number = -1;
    while (filled < slots) {
      const int64_t e = position / per_epoch, within = position % per_epoch;
      if (e != ep_number) ep = epoch(ep_number = e);
      const auto& starts = ep->stream_start;
      const int64_t k = std::upper_bound(starts.begin(), starts.end(), within) - starts.begin() - 1;
      // k indexes order (< D); a broken stream_start could point anywhere: copy_tokens checks.
      const int64_t doc = k >= 0 && k < static_cast<int64_t>(ep->order.size()) ? ep->order[k] : -1;
      const int64_t offset = k >= 0 ? within - starts[k] : -1;
      if (offset == 0 && filled > 0) sink.segment_starts->push_back(static_cast<int32_t>(filled));
      const int64_t n = std::min<int64_t>(
          (doc >= 0 && doc < source_->num_documents() ? source_->length(doc) : 0) - offset,
          slots - filled);
      if (n <= 0) broken_index(e, "document " + std::to_string(doc) + " at stream position " +
                                      std::to_string(within) + " has no tokens left");
      source_->copy_tokens(doc, offset, n, sink.tokens + filled * isz, type);
      filled += n;
      position += n;
    }
    return static_cast<int32_t>(filled);
  }
  const auto [e, i] = locate_bestfit_row(r);
  const auto ep = epoch(e);
  const auto [first, last] = row_pieces(*ep, e, i);
  for (int64_t p = first; p < last; ++p) {
    const Piece& piece = ep->pieces[p];
    if (filled > 0) sink.segment_starts->push_back(static_cast<int32_t>(filled));
    if (piece.length > slots - filled) {
      broken_index(e, "row " + std::to_string(i) + " holds more than " + std::to_string(slots) +
                          " tokens");
    }
    source_->copy_tokens(piece.doc, piece.start, piece.length, sink.tokens + filled * isz, type);
    filled += piece.length;
  }
  for (int64_t t = filled; t < slots; ++t) store_token(sink.tokens, type, t, pad_id);
  return static_cast<int32_t>(filled);
}

int pick_source(const std::vector<double>& probabilities, const MixState& state,
                const std::vector<int64_t>& next_row_tokens) {
  int64_t sum = 0;
  for (int64_t t : state.tokens) sum += t;
  const double total = static_cast<double>(sum);
  int best = -1;
  double best_deadline = 0;
  for (size_t s = 0; s < probabilities.size(); ++s) {
    const double p = probabilities[s];
    if (!(p > 0) || static_cast<double>(state.tokens[s]) > p * total) continue;
    const double deadline = static_cast<double>(state.tokens[s] + next_row_tokens[s]) / p;
    if (best < 0 || deadline < best_deadline) {
      best = static_cast<int>(s);
      best_deadline = deadline;
    }
  }
  if (best >= 0) return best;
  double best_deficit = 0;  // only reachable through rounding
  for (size_t s = 0; s < probabilities.size(); ++s) {
    if (!(probabilities[s] > 0)) continue;
    const double deficit = probabilities[s] * total - static_cast<double>(state.tokens[s]);
    if (best < 0 || deficit > best_deficit) {
      best = static_cast<int>(s);
      best_deficit = deficit;
    }
  }
  return best;
}

}  // namespace cptfast
