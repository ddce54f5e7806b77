// Zero-copy readers of token shards: Megatron MMIDIDX (.bin + .idx, our native layout), llm.c
// .bin shards, headerless uint16/uint32 token files and datatrove .ds files (+ .ds.index). Each open maps the token file
// read-only, validates every structural fact of the format, and builds the token offset of
// every document, so that document i is the view tokens[offsets[i], offsets[i+1]).
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "shard_format.h"

namespace cptfast {

// A malformed, truncated or mismatched shard. The message names the file, the byte offset and
// what to do; the Python binding raises it as cptfast.errors.ShardFormatError.
class ShardError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A read-only memory mapping of a whole file. Missing and empty files are ShardErrors.
class MappedFile {
 public:
  explicit MappedFile(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

enum class ShardKind { kMegatron, kLlmc, kHeaderless, kDatatrove };

// How a delimiter token splits a token stream into documents.
//  kEnd: the delimiter is a document's last token (nanoGPT and GPT-2 llm.c end-of-text: so it
//        is a label). A delimiter that opens the file ends nothing and belongs to no document.
//  kStart: the delimiter is a document's first token (a Llama BOS).
enum class DelimiterRole { kNone, kEnd, kStart };

class TokenShard {
 public:
  const std::string& path() const { return tokens_file_->path(); }
  const std::string& index_path() const { return index_path_; }
  ShardKind kind() const { return kind_; }
  TokenType token_type() const { return token_type_; }
  int itemsize() const { return token_itemsize(token_type_); }
  int64_t num_tokens() const { return num_tokens_; }
  int64_t num_documents() const { return static_cast<int64_t>(doc_offsets_.size()) - 1; }
  const void* tokens() const { return tokens_file_->data() + token_byte_start_; }
  const std::vector<int64_t>& document_offsets() const { return doc_offsets_; }
  // Tokens inside documents (a leading end-delimiter that ends nothing is not counted).
  int64_t document_tokens() const { return doc_offsets_.back() - doc_offsets_.front(); }
  // The delimiter that split the file into documents and its role (-1 / kNone: an index did).
  int64_t delimiter() const { return delimiter_; }
  DelimiterRole delimiter_role() const { return role_; }
  // Documents the file's edges cut (they began in the previous file or go on in the next):
  // at most one at each edge; an llm.c writer cuts documents at shard boundaries.
  int64_t cut_documents() const { return cut_documents_; }
  // Largest token id in the file (scanned once, then cached); -1 for a file of no tokens.
  int64_t max_token_id();
  // Throws a ShardError naming the first token outside [0, vocab_size) and its byte offset.
  void check_token_range(int64_t vocab_size);

  static std::shared_ptr<TokenShard> open_megatron(const std::string& bin_path,
                                                   const std::string& idx_path);
  // delimiter < 0: the magic's own (GPT-2 end-of-text 50256, Llama-3 begin-of-text 128000);
  // role kNone: the magic's own (GPT-2 kEnd, Llama-3 kStart).
  static std::shared_ptr<TokenShard> open_llmc(const std::string& path, int64_t delimiter,
                                               DelimiterRole role);
  // role kNone: kEnd (each eos_id ends a document, as nanoGPT writes them).
  static std::shared_ptr<TokenShard> open_headerless(const std::string& path, TokenType type,
                                                     int64_t eos_id, DelimiterRole role);
  // datatrove: headerless tokens; `index_path` holds uint64 cumulative document end positions.
  static std::shared_ptr<TokenShard> open_datatrove(const std::string& path,
                                                    const std::string& index_path,
                                                    TokenType type);

 private:
  TokenShard() = default;
  // Splits the token stream into documents by `delimiter` in `role` (see DelimiterRole).
  void split_on_delimiter(int64_t delimiter, DelimiterRole role);

  std::shared_ptr<MappedFile> tokens_file_;
  std::string index_path_;
  ShardKind kind_ = ShardKind::kMegatron;
  TokenType token_type_ = TokenType::kU16;
  size_t token_byte_start_ = 0;
  int64_t num_tokens_ = 0;
  std::vector<int64_t> doc_offsets_;
  int64_t max_token_id_ = -2;  // -2: not scanned yet
  int64_t delimiter_ = -1;
  DelimiterRole role_ = DelimiterRole::kNone;
  int64_t cut_documents_ = 0;
};

}  // namespace cptfast
