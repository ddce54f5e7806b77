// Byte-level facts of the token-shard formats cptfast reads (docs/FORMATS.md describes them),
// as constants and small inline functions. Nothing here touches files or the OS, so
// the same functions serve the CPU readers and, later, CUDA code (CPTFAST_HD).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define CPTFAST_HD __host__ __device__
#else
#define CPTFAST_HD
#endif

namespace cptfast {

// ---- Megatron MMIDIDX (.idx beside a headerless .bin) -------------------------------------
constexpr char kMMIdIdxMagic[9] = {'M', 'M', 'I', 'D', 'I', 'D', 'X', '\0', '\0'};
constexpr uint64_t kMMIdIdxVersion = 1;
constexpr size_t kMMIdIdxVersionAt = 9;      // uint64
constexpr size_t kMMIdIdxDtypeAt = 17;       // uint8
constexpr size_t kMMIdIdxSeqCountAt = 18;    // uint64
constexpr size_t kMMIdIdxDocCountAt = 26;    // uint64 (documents + 1)
constexpr size_t kMMIdIdxHeaderBytes = 34;

// The token types a token file can hold. `code` is the MMIDIDX dtype code where one exists;
// uint32 has none in MMIDIDX but is what llm.c (version 7) and headerless files use.
enum class TokenType : uint8_t { kU8, kI8, kI16, kI32, kI64, kU16, kU32 };

// Maps an MMIDIDX dtype code to a token type; returns false for float codes and unknown codes.
CPTFAST_HD inline bool mmidx_token_type(uint8_t code, TokenType* out) {
  switch (code) {
    case 1: *out = TokenType::kU8; return true;
    case 2: *out = TokenType::kI8; return true;
    case 3: *out = TokenType::kI16; return true;
    case 4: *out = TokenType::kI32; return true;
    case 5: *out = TokenType::kI64; return true;
    case 8: *out = TokenType::kU16; return true;
    default: return false;  // 6 float64, 7 float32: not token ids
  }
}

CPTFAST_HD inline int token_itemsize(TokenType t) {
  switch (t) {
    case TokenType::kU8: case TokenType::kI8: return 1;
    case TokenType::kI16: case TokenType::kU16: return 2;
    case TokenType::kI32: case TokenType::kU32: return 4;
    case TokenType::kI64: return 8;
  }
  return 0;
}

// The numpy name of a token type ("uint16", ...).
CPTFAST_HD inline const char* token_type_name(TokenType t) {
  switch (t) {
    case TokenType::kU8: return "uint8";
    case TokenType::kI8: return "int8";
    case TokenType::kI16: return "int16";
    case TokenType::kU16: return "uint16";
    case TokenType::kI32: return "int32";
    case TokenType::kU32: return "uint32";
    case TokenType::kI64: return "int64";
  }
  return "?";
}

// Reads token `i` of a packed token array as a signed 64-bit id.
CPTFAST_HD inline int64_t load_token(const void* base, TokenType t, int64_t i) {
  switch (t) {
    case TokenType::kU8: return static_cast<const uint8_t*>(base)[i];
    case TokenType::kI8: return static_cast<const int8_t*>(base)[i];
    case TokenType::kI16: return static_cast<const int16_t*>(base)[i];
    case TokenType::kU16: return static_cast<const uint16_t*>(base)[i];
    case TokenType::kI32: return static_cast<const int32_t*>(base)[i];
    case TokenType::kU32: return static_cast<const uint32_t*>(base)[i];
    case TokenType::kI64: return static_cast<const int64_t*>(base)[i];
  }
  return -1;
}

// Writes `value` as token `i` of a packed token array of type t.
CPTFAST_HD inline void store_token(void* base, TokenType t, int64_t i, int64_t value) {
  switch (t) {
    case TokenType::kU8: static_cast<uint8_t*>(base)[i] = static_cast<uint8_t>(value); return;
    case TokenType::kI8: static_cast<int8_t*>(base)[i] = static_cast<int8_t>(value); return;
    case TokenType::kI16: static_cast<int16_t*>(base)[i] = static_cast<int16_t>(value); return;
    case TokenType::kU16: static_cast<uint16_t*>(base)[i] = static_cast<uint16_t>(value); return;
    case TokenType::kI32: static_cast<int32_t*>(base)[i] = static_cast<int32_t>(value); return;
    case TokenType::kU32: static_cast<uint32_t*>(base)[i] = static_cast<uint32_t>(value); return;
    case TokenType::kI64: static_cast<int64_t*>(base)[i] = value; return;
  }
}

// Unaligned little-endian read of a fixed-size integer at `bytes + at` (all our targets are
// little-endian, as the formats are).
template <typename T>
CPTFAST_HD inline T read_le(const uint8_t* bytes, size_t at) {
  T value;
  memcpy(&value, bytes + at, sizeof(T));
  return value;
}

// ---- llm.c shards: 256 x int32 header, then tokens ------------------------------------------
constexpr size_t kLlmcHeaderBytes = 1024;
constexpr int32_t kLlmcMagicGpt2 = 20240520;
constexpr int32_t kLlmcMagicLlama3 = 20240801;
constexpr int32_t kLlmcVersionU16 = 1;
constexpr int32_t kLlmcVersionU32 = 7;
constexpr int64_t kGpt2EndOfText = 50256;
constexpr int64_t kLlama3BeginOfText = 128000;

}  // namespace cptfast
