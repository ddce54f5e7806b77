#include "token_shard.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <type_traits>
#include <sstream>

namespace cptfast {
namespace {

[[noreturn]] void fail(const std::string& path, uint64_t byte, const std::string& problem,
                       const std::string& fix) {
  std::ostringstream msg;
  msg << path << ": " << problem << " (at byte " << byte << "). " << fix;
  throw ShardError(msg.str());
}

template <typename T>
int64_t max_of(const T* p, int64_t n) {
  T best = p[0];
  for (int64_t i = 1; i < n; ++i) best = p[i] > best ? p[i] : best;  // vectorises at -O3
  return static_cast<int64_t>(best);
}

template <typename T>
int64_t min_of(const T* p, int64_t n) {
  T best = p[0];
  for (int64_t i = 1; i < n; ++i) best = p[i] < best ? p[i] : best;
  return static_cast<int64_t>(best);
}

template <typename F>
auto dispatch(TokenType t, const void* p, F&& f) {
  switch (t) {
    case TokenType::kU8: return f(static_cast<const uint8_t*>(p));
    case TokenType::kI8: return f(static_cast<const int8_t*>(p));
    case TokenType::kI16: return f(static_cast<const int16_t*>(p));
    case TokenType::kU16: return f(static_cast<const uint16_t*>(p));
    case TokenType::kI32: return f(static_cast<const int32_t*>(p));
    case TokenType::kU32: return f(static_cast<const uint32_t*>(p));
    case TokenType::kI64: return f(static_cast<const int64_t*>(p));
  }
  return f(static_cast<const uint8_t*>(p));
}

}  // namespace

MappedFile::MappedFile(const std::string& path) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    fail(path, 0, std::string("cannot open: ") + std::strerror(errno),
         "Check the path; shards are written by `cptfast prepare`.");
  }
  struct stat st;
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(path, 0, "not a regular file", "Point at the shard file itself.");
  }
  size_ = static_cast<size_t>(st.st_size);
  if (size_ == 0) {
    ::close(fd);
    fail(path, 0, "file is empty", "The file was truncated or never written; re-create it.");
  }
  void* mapped = ::mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd, 0);
  ::close(fd);  // the mapping keeps the file alive
  if (mapped == MAP_FAILED) {
    fail(path, 0, std::string("mmap failed: ") + std::strerror(errno),
         "Check free address space and file permissions.");
  }
  data_ = static_cast<const uint8_t*>(mapped);
}

MappedFile::~MappedFile() {
  if (data_ != nullptr) ::munmap(const_cast<uint8_t*>(data_), size_);
}

int64_t TokenShard::max_token_id() {
  if (max_token_id_ == -2) {
    max_token_id_ = num_tokens_ == 0 ? -1 : dispatch(token_type_, tokens(), [&](auto* p) {
      return max_of(p, num_tokens_);
    });
  }
  return max_token_id_;
}

void TokenShard::check_token_range(int64_t vocab_size) {
  if (num_tokens_ == 0) return;
  int64_t lowest = dispatch(token_type_, tokens(), [&](auto* p) { return min_of(p, num_tokens_); });
  if (lowest >= 0 && max_token_id() < vocab_size) return;
  // Slow path, only on failure: find the first offending token to name it.
  for (int64_t i = 0; i < num_tokens_; ++i) {
    int64_t tok = load_token(tokens(), token_type_, i);
    if (tok < 0 || tok >= vocab_size) {
      auto doc = std::upper_bound(doc_offsets_.begin(), doc_offsets_.end(), i) - doc_offsets_.begin() - 1;
      std::ostringstream problem;
      problem << "token id " << tok << " (token " << i << ", document " << doc
              << ") is outside the vocabulary [0, " << vocab_size << ")";
      fail(path(), token_byte_start_ + static_cast<uint64_t>(i) * itemsize(), problem.str(),
           "The shard was made with a different tokenizer than the one given; re-run "
           "`cptfast prepare` with the model's tokenizer or pass the right vocab size.");
    }
  }
}

void TokenShard::split_on_delimiter(int64_t delimiter, DelimiterRole role) {
  delimiter_ = delimiter;
  role_ = role;
  doc_offsets_.assign(1, 0);
  cut_documents_ = 0;
  dispatch(token_type_, tokens(), [&](auto* p) {
    using T = std::remove_cv_t<std::remove_pointer_t<decltype(p)>>;
    // A delimiter outside T's range can never match; comparing after the cast would alias.
    if (num_tokens_ == 0 || delimiter < static_cast<int64_t>(std::numeric_limits<T>::min()) ||
        delimiter > static_cast<int64_t>(std::numeric_limits<T>::max())) {
      return 0;
    }
    const T d = static_cast<T>(delimiter);
    const bool ends = role == DelimiterRole::kEnd;
    // llm.c puts the delimiter before every document: in the end role, the file's leading
    // one ends nothing. (A nanoGPT file that starts with EOS starts with an empty document.)
    const bool prepended = !ends || kind_ == ShardKind::kLlmc;
    if (ends && prepended && p[0] == d) doc_offsets_[0] = 1;
    for (int64_t i = 0; i < num_tokens_; ++i) {
      if (p[i] != d) continue;
      const int64_t boundary = ends ? i + 1 : i;
      if (boundary > doc_offsets_.back()) doc_offsets_.push_back(boundary);
    }
    // Edges cut mid-document: a file that does not open with the delimiter although every
    // document starts with one (llm.c, BOS-led files), and one that does not end with it
    // although every document ends with one.
    cut_documents_ = (prepended && p[0] != d) + (ends && p[num_tokens_ - 1] != d);
    return 0;
  });
  if (doc_offsets_.back() != num_tokens_) doc_offsets_.push_back(num_tokens_);
}

std::shared_ptr<TokenShard> TokenShard::open_megatron(const std::string& bin_path,
                                                      const std::string& idx_path) {
  const char* fix_rebuild = "The index is corrupt or belongs to another .bin; rebuild the shard "
                            "with `cptfast prepare` (or Megatron's preprocess_data.py).";
  MappedFile idx(idx_path);
  const uint8_t* b = idx.data();
  const uint64_t size = idx.size();
  if (size < kMMIdIdxHeaderBytes) {
    fail(idx_path, size, "truncated header: an MMIDIDX index has at least 34 bytes", fix_rebuild);
  }
  if (std::memcmp(b, kMMIdIdxMagic, sizeof(kMMIdIdxMagic)) != 0) {
    fail(idx_path, 0, "wrong magic: expected b'MMIDIDX\\x00\\x00'",
         "This is not a Megatron/cptfast .idx file; for llm.c or raw token files pass "
         "format='llmc' or format='headerless'.");
  }
  const uint64_t version = read_le<uint64_t>(b, kMMIdIdxVersionAt);
  if (version != kMMIdIdxVersion) {
    fail(idx_path, kMMIdIdxVersionAt,
         "unsupported index version " + std::to_string(version) + " (expected 1)", fix_rebuild);
  }
  const uint8_t code = b[kMMIdIdxDtypeAt];
  auto shard = std::shared_ptr<TokenShard>(new TokenShard());
  if (!mmidx_token_type(code, &shard->token_type_)) {
    fail(idx_path, kMMIdIdxDtypeAt,
         "dtype code " + std::to_string(code) + " is not an integer token type (expected 1, 2, 3, "
         "4, 5 or 8)", fix_rebuild);
  }
  const uint64_t n_seq = read_le<uint64_t>(b, kMMIdIdxSeqCountAt);
  const uint64_t n_doc_idx = read_le<uint64_t>(b, kMMIdIdxDocCountAt);
  // Each sequence needs 12 index bytes and each document entry 8: reject counts that could not
  // fit before multiplying, so a corrupt count cannot overflow the size arithmetic.
  if (n_seq > size / 12 || n_doc_idx > size / 8) {
    fail(idx_path, kMMIdIdxSeqCountAt,
         "header counts (" + std::to_string(n_seq) + " sequences, " + std::to_string(n_doc_idx) +
             " document entries) do not fit in a file of " + std::to_string(size) + " bytes",
         fix_rebuild);
  }
  const uint64_t lengths_at = kMMIdIdxHeaderBytes;
  const uint64_t pointers_at = lengths_at + 4 * n_seq;
  const uint64_t doc_idx_at = pointers_at + 8 * n_seq;
  const uint64_t expected = doc_idx_at + 8 * n_doc_idx;
  if (size != expected && size != expected + n_seq /* multimodal modes */) {
    fail(idx_path, std::min(size, expected),
         "file has " + std::to_string(size) + " bytes but its header (" + std::to_string(n_seq) +
             " sequences, " + std::to_string(n_doc_idx) + " document entries) needs " +
             std::to_string(expected),
         "The index was truncated or overwritten; rebuild it.");
  }
  if (n_doc_idx < 1) {
    fail(idx_path, kMMIdIdxDocCountAt, "document count is 0; it must be documents + 1",
         fix_rebuild);
  }

  shard->kind_ = ShardKind::kMegatron;
  shard->index_path_ = idx_path;
  shard->tokens_file_ = std::make_shared<MappedFile>(bin_path);
  const int isz = shard->itemsize();
  const uint64_t bin_size = shard->tokens_file_->size();

  // Sequences must tile the .bin exactly, in order: each starts where the previous one ended.
  std::vector<int64_t> seq_start(n_seq + 1);
  uint64_t running = 0;
  for (uint64_t i = 0; i < n_seq; ++i) {
    const int32_t len = read_le<int32_t>(b, lengths_at + 4 * i);
    const int64_t ptr = read_le<int64_t>(b, pointers_at + 8 * i);
    if (len < 0) {
      fail(idx_path, lengths_at + 4 * i,
           "sequence " + std::to_string(i) + " has negative length " + std::to_string(len),
           fix_rebuild);
    }
    if (ptr < 0 || static_cast<uint64_t>(ptr) != running) {
      fail(idx_path, pointers_at + 8 * i,
           "sequence " + std::to_string(i) + " starts at .bin byte " + std::to_string(ptr) +
               " but the sequences before it end at byte " + std::to_string(running) +
               " (offsets must be monotonic and contiguous)",
           fix_rebuild);
    }
    seq_start[i] = static_cast<int64_t>(running / isz);
    running += static_cast<uint64_t>(len) * isz;
    if (running > bin_size) {
      fail(idx_path, lengths_at + 4 * i,
           "sequence " + std::to_string(i) + " ends at byte " + std::to_string(running) +
               " past the end of " + bin_path + " (" + std::to_string(bin_size) + " bytes)",
           "The .bin was truncated, or the .idx belongs to another .bin; rebuild the shard.");
    }
  }
  seq_start[n_seq] = static_cast<int64_t>(running / isz);
  if (running != bin_size) {
    fail(bin_path, running,
         "file has " + std::to_string(bin_size) + " bytes but " + idx_path + " describes " +
             std::to_string(running),
         "The .bin has trailing bytes or the .idx belongs to another .bin; rebuild the shard.");
  }

  shard->num_tokens_ = static_cast<int64_t>(bin_size / isz);
  shard->doc_offsets_.resize(n_doc_idx);
  int64_t previous = 0;
  for (uint64_t d = 0; d < n_doc_idx; ++d) {
    const int64_t seq = read_le<int64_t>(b, doc_idx_at + 8 * d);
    const bool bad = (d == 0 && seq != 0) || seq < previous || seq > static_cast<int64_t>(n_seq) ||
                     (d + 1 == n_doc_idx && seq != static_cast<int64_t>(n_seq));
    if (bad) {
      fail(idx_path, doc_idx_at + 8 * d,
           "document index entry " + std::to_string(d) + " is " + std::to_string(seq) +
               " (entries must rise from 0 to the sequence count " + std::to_string(n_seq) + ")",
           fix_rebuild);
    }
    shard->doc_offsets_[d] = seq_start[seq];
    previous = seq;
  }
  return shard;
}

std::shared_ptr<TokenShard> TokenShard::open_llmc(const std::string& path, int64_t delimiter,
                                                   DelimiterRole role) {
  auto shard = std::shared_ptr<TokenShard>(new TokenShard());
  shard->kind_ = ShardKind::kLlmc;
  shard->tokens_file_ = std::make_shared<MappedFile>(path);
  const uint8_t* b = shard->tokens_file_->data();
  const uint64_t size = shard->tokens_file_->size();
  const char* fix = "Re-create the shard with llm.c's data scripts or convert it with "
                    "`cptfast prepare`.";
  if (size < kLlmcHeaderBytes) {
    fail(path, size, "truncated header: llm.c shards start with 1024 header bytes", fix);
  }
  const int32_t magic = read_le<int32_t>(b, 0);
  if (magic != kLlmcMagicGpt2 && magic != kLlmcMagicLlama3) {
    fail(path, 0,
         "wrong magic " + std::to_string(magic) + " (expected 20240520 for GPT-2 or 20240801 for "
         "Llama-3)",
         "This is not an llm.c shard; for raw token files pass format='headerless'.");
  }
  const int32_t version = read_le<int32_t>(b, 4);
  if (version == kLlmcVersionU16) {
    shard->token_type_ = TokenType::kU16;
  } else if (version == kLlmcVersionU32) {
    shard->token_type_ = TokenType::kU32;
  } else {
    fail(path, 4, "unsupported version " + std::to_string(version) +
                      " (expected 1 for uint16 tokens or 7 for uint32)", fix);
  }
  const int32_t count = read_le<int32_t>(b, 8);
  const uint64_t expected = kLlmcHeaderBytes + static_cast<uint64_t>(count) * shard->itemsize();
  if (count <= 0 || size != expected) {
    fail(path, count <= 0 ? 8 : std::min(size, expected),
         "header says " + std::to_string(count) + " " + token_type_name(shard->token_type_) +
             " tokens, which needs " + std::to_string(expected) + " bytes, but the file has " +
             std::to_string(size),
         "The shard was truncated or its header is corrupt; re-create it.");
  }
  shard->token_byte_start_ = kLlmcHeaderBytes;
  shard->num_tokens_ = count;
  // llm.c prepends the delimiter to every document. GPT-2's is end-of-text, which the model
  // must learn to predict: it ends the previous document. Llama-3's is a BOS: it begins one.
  const bool gpt2 = magic == kLlmcMagicGpt2;
  if (delimiter < 0) delimiter = gpt2 ? kGpt2EndOfText : kLlama3BeginOfText;
  if (role == DelimiterRole::kNone) role = gpt2 ? DelimiterRole::kEnd : DelimiterRole::kStart;
  shard->split_on_delimiter(delimiter, role);
  return shard;
}

std::shared_ptr<TokenShard> TokenShard::open_headerless(const std::string& path, TokenType type,
                                                        int64_t eos_id, DelimiterRole role) {
  auto shard = std::shared_ptr<TokenShard>(new TokenShard());
  shard->kind_ = ShardKind::kHeaderless;
  shard->token_type_ = type;
  shard->tokens_file_ = std::make_shared<MappedFile>(path);
  const uint64_t size = shard->tokens_file_->size();
  const int isz = shard->itemsize();
  if (size % isz != 0) {
    fail(path, size - size % isz,
         "file size " + std::to_string(size) + " is not a whole number of " + token_type_name(type) +
             " tokens",
         "The file was truncated mid-token, or its token type is not " +
             std::string(token_type_name(type)) + "; pass the dtype it was written with.");
  }
  shard->num_tokens_ = static_cast<int64_t>(size / isz);
  shard->split_on_delimiter(eos_id, role == DelimiterRole::kNone ? DelimiterRole::kEnd : role);
  return shard;
}

std::shared_ptr<TokenShard> TokenShard::open_datatrove(const std::string& path,
                                                       const std::string& index_path,
                                                       TokenType type) {
  auto shard = std::shared_ptr<TokenShard>(new TokenShard());
  shard->kind_ = ShardKind::kDatatrove;
  shard->token_type_ = type;
  shard->index_path_ = index_path;
  shard->tokens_file_ = std::make_shared<MappedFile>(path);
  const uint64_t size = shard->tokens_file_->size();
  const int isz = shard->itemsize();
  const char* fix = "Re-create the file with datatrove's tokenizer, or check that the .ds and "
                    ".ds.index belong together and the token size is right.";
  if (size % isz != 0) {
    fail(path, size - size % isz,
         "file size " + std::to_string(size) + " is not a whole number of " +
             token_type_name(type) + " tokens", fix);
  }
  shard->num_tokens_ = static_cast<int64_t>(size / isz);
  MappedFile index(index_path);
  if (index.size() % 8 != 0) {
    fail(index_path, index.size() - index.size() % 8,
         "file size is not a whole number of uint64 document ends", fix);
  }
  const uint64_t n = index.size() / 8;
  shard->doc_offsets_.assign(1, 0);
  for (uint64_t d = 0; d < n; ++d) {
    const uint64_t end = read_le<uint64_t>(index.data(), 8 * d);
    if (end < static_cast<uint64_t>(shard->doc_offsets_.back()) ||
        end > static_cast<uint64_t>(shard->num_tokens_)) {
      fail(index_path, 8 * d,
           "document " + std::to_string(d) + " ends at token " + std::to_string(end) +
               ", before the previous end or past the " + std::to_string(shard->num_tokens_) +
               " tokens of " + path, fix);
    }
    shard->doc_offsets_.push_back(static_cast<int64_t>(end));
  }
  if (shard->doc_offsets_.back() != shard->num_tokens_) {
    fail(index_path, index.size(),
         "the last document ends at token " + std::to_string(shard->doc_offsets_.back()) +
             " but " + path + " holds " + std::to_string(shard->num_tokens_) + " tokens", fix);
  }
  return shard;
}

}  // namespace cptfast
