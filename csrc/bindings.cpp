// Python bindings of cptfast._C. Arrays handed to Python are read-only numpy views into the
// memory-mapped files; each keeps its reader (and so the mapping) alive through its base.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "packed_loader.h"
#if CPTFAST_WITH_CUDA
#include "expand_batch.h"
#endif
#include "token_shard.h"

namespace py = pybind11;
using cptfast::CompactBatch;
using cptfast::CompactBatchView;
using cptfast::ExpandedOutputs;
using cptfast::MixState;
using cptfast::PackedLoader;
using cptfast::ShardKind;
using cptfast::Source;
using cptfast::TokenShard;
using cptfast::TokenType;

namespace {

TokenType parse_token_type(const std::string& name) {
  if (name == "uint16") return TokenType::kU16;
  if (name == "uint32") return TokenType::kU32;
  if (name == "int32") return TokenType::kI32;
  throw py::value_error("dtype must be 'uint16', 'uint32' or 'int32', got '" + name + "'");
}

cptfast::DelimiterRole parse_role(const std::string& role) {
  if (role.empty()) return cptfast::DelimiterRole::kNone;
  if (role == "end") return cptfast::DelimiterRole::kEnd;
  if (role == "start") return cptfast::DelimiterRole::kStart;
  throw py::value_error("delimiter_role must be 'end' or 'start', got '" + role + "'");
}

py::array readonly_view(py::dtype dtype, int64_t count, const void* data, py::handle owner) {
  py::array view(dtype, {count}, {dtype.itemsize()}, data, owner);
  py::detail::array_proxy(view.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
  return view;
}

py::array document_view(py::object self, int64_t i) {
  auto& shard = self.cast<TokenShard&>();
  const int64_t n = shard.num_documents();
  if (i < 0) i += n;
  if (i < 0 || i >= n) {
    throw py::index_error("document " + std::to_string(i) + " out of range for " +
                          std::to_string(n) + " documents in " + shard.path());
  }
  const auto& offsets = shard.document_offsets();
  const auto* base = static_cast<const uint8_t*>(shard.tokens()) + offsets[i] * shard.itemsize();
  return readonly_view(py::dtype(cptfast::token_type_name(shard.token_type())), offsets[i + 1] - offsets[i],
                       base, self);
}

template <typename T>
py::array vector_view(const std::vector<T>& values, py::handle owner) {
  return readonly_view(py::dtype::of<T>(), static_cast<int64_t>(values.size()), values.data(),
                       owner);
}

// A read-only numpy view of one of a CompactBatch's arrays, kept alive by the batch.
template <typename T>
auto vector_property(std::vector<T> CompactBatch::*member) {
  return [member](py::object self) { return vector_view(self.cast<CompactBatch&>().*member, self); };
}

// A writable, C-contiguous int64 array of shape [rows, seq_len], or a ValueError naming it.
int64_t* int64_output(py::array& a, const char* name, int64_t rows, int64_t seq_len) {
  const bool ok = a.dtype().is(py::dtype::of<int64_t>()) && a.ndim() == 2 &&
                  a.shape(0) == rows && a.shape(1) == seq_len && a.writeable() &&
                  (a.flags() & py::array::c_style);
  if (!ok) {
    throw py::value_error(std::string(name) + " must be a writable C-contiguous int64 array of "
                          "shape (" + std::to_string(rows) + ", " + std::to_string(seq_len) + ")");
  }
  return static_cast<int64_t*>(a.mutable_data());
}

py::tuple cu_seqlens_of(const CompactBatchView& v) {
  py::array_t<int32_t> cu(cptfast::count_sequences(v) + 1);
  const int64_t longest = cptfast::fill_cu_seqlens(v, cu.mutable_data());
  return py::make_tuple(cu, longest);
}

void expand_into(const CompactBatchView& v, const ExpandedOutputs& out, bool by_token) {
  py::gil_scoped_release release;
  for (int64_t row = 0; row < v.rows; ++row) {
    if (by_token) {
      for (int64_t t = 0; t < v.seq_len; ++t) cptfast::expand_token(v, row, t, out);
    } else {
      cptfast::expand_row(v, row, out);
    }
  }
}

// Checks a compact batch given from Python (the loader's own batches are correct by
// construction): segment starts rise from 0 inside the used slots of every row.
void check_compact(const CompactBatchView& v, int64_t num_segments) {
  if (v.row_segments[0] != 0 || v.row_segments[v.rows] != num_segments) {
    throw py::value_error("row_segments must start at 0 and end at len(segment_starts)");
  }
  for (int64_t row = 0; row < v.rows; ++row) {
    const int32_t first = v.row_segments[row], last = v.row_segments[row + 1];
    const int32_t used = v.row_used[row];
    if (used < 0 || used > v.seq_len + 1 || last < first || (used > 0) != (last > first)) {
      throw py::value_error("row " + std::to_string(row) + ": row_used must lie in [0, T+1] and "
                            "a row has segments exactly when it has tokens");
    }
    for (int32_t s = first; s < last; ++s) {
      const int32_t start = v.segment_starts[s];
      const bool bad = (s == first && start != 0) || (s > first && start <= v.segment_starts[s - 1]) ||
                       start >= used;
      if (bad) {
        throw py::value_error("row " + std::to_string(row) + ": segment starts must rise from 0 "
                              "and lie below row_used");
      }
    }
  }
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "cptfast C++ extension: memory-mapped token-shard readers";

  // ShardError becomes cptfast.errors.ShardFormatError, the one class Python code raises too.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const cptfast::ShardError& e) {
      py::object cls = py::module_::import("cptfast.errors").attr("ShardFormatError");
      PyErr_SetString(cls.ptr(), e.what());
    }
  });

  py::class_<TokenShard, std::shared_ptr<TokenShard>>(m, "TokenShard",
                         "A validated, memory-mapped token file; documents are zero-copy views.")
      .def_property_readonly("path", &TokenShard::path)
      .def_property_readonly("index_path",
                             [](const TokenShard& s) -> py::object {
                               if (s.index_path().empty()) return py::none();
                               return py::str(s.index_path());
                             })
      .def_property_readonly("format",
                             [](const TokenShard& s) {
                               switch (s.kind()) {
                                 case ShardKind::kMegatron: return "megatron";
                                 case ShardKind::kLlmc: return "llmc";
                                 case ShardKind::kHeaderless: return "headerless";
                                 case ShardKind::kDatatrove: return "datatrove";
                               }
                               return "?";
                             })
      .def_property_readonly("dtype", [](const TokenShard& s) { return cptfast::token_type_name(s.token_type()); })
      .def_property_readonly("num_tokens", &TokenShard::num_tokens)
      .def_property_readonly("num_documents", &TokenShard::num_documents)
      .def_property_readonly("document_tokens", &TokenShard::document_tokens,
                             "Tokens inside documents (num_tokens less a leading end-of-text)")
      .def_property_readonly("delimiter",
                             [](const TokenShard& s) -> py::object {
                               if (s.delimiter_role() == cptfast::DelimiterRole::kNone) return py::none();
                               return py::int_(s.delimiter());
                             },
                             "The token that splits documents (None: an index gives them)")
      .def_property_readonly("delimiter_role",
                             [](const TokenShard& s) -> py::object {
                               switch (s.delimiter_role()) {
                                 case cptfast::DelimiterRole::kEnd: return py::str("end");
                                 case cptfast::DelimiterRole::kStart: return py::str("start");
                                 default: return py::none();
                               }
                             },
                             "'end' (the delimiter is a document's last token), 'start', or None")
      .def_property_readonly("cut_documents", &TokenShard::cut_documents,
                             "Documents cut by the file's edges (0, 1 or 2)")
      .def("__len__", &TokenShard::num_documents)
      .def("document", &document_view, py::arg("i"), "Document i as a read-only numpy view.")
      .def("__getitem__", &document_view)
      .def("tokens",
           [](py::object self) {
             auto& s = self.cast<TokenShard&>();
             return readonly_view(py::dtype(cptfast::token_type_name(s.token_type())), s.num_tokens(),
                                  s.tokens(), self);
           },
           "All tokens of the file as one read-only numpy view.")
      .def("document_offsets",
           [](py::object self) {
             auto& s = self.cast<TokenShard&>();
             const auto& offsets = s.document_offsets();
             return readonly_view(py::dtype("int64"), static_cast<int64_t>(offsets.size()),
                                  offsets.data(), self);
           },
           "int64 [num_documents + 1]: document i is tokens[offsets[i]:offsets[i+1]].")
      .def("max_token_id", &TokenShard::max_token_id, py::call_guard<py::gil_scoped_release>())
      .def("check_token_range", &TokenShard::check_token_range, py::arg("vocab_size"),
           py::call_guard<py::gil_scoped_release>(),
           "Raise ShardFormatError naming the first token id outside [0, vocab_size).");

  m.def("open_megatron", &TokenShard::open_megatron, py::arg("bin_path"), py::arg("idx_path"),
        py::call_guard<py::gil_scoped_release>(),
        "Open a Megatron MMIDIDX .bin/.idx pair (cptfast's native shard layout).");
  m.def("open_llmc",
        [](const std::string& path, int64_t delimiter, const std::string& role) {
          const auto parsed = parse_role(role);
          py::gil_scoped_release release;
          return TokenShard::open_llmc(path, delimiter, parsed);
        },
        py::arg("path"), py::arg("delimiter") = -1, py::arg("delimiter_role") = "",
        "Open an llm.c .bin shard split at each delimiter (default: the magic's own: GPT-2's "
        "end-of-text 50256 ends a document, Llama-3's BOS 128000 begins one).");
  m.def("open_headerless",
        [](const std::string& path, const std::string& dtype, int64_t eos_id,
           const std::string& role) {
          TokenType type = parse_token_type(dtype);
          const auto parsed = parse_role(role);
          py::gil_scoped_release release;
          return TokenShard::open_headerless(path, type, eos_id, parsed);
        },
        py::arg("path"), py::arg("dtype"), py::arg("eos_id"), py::arg("delimiter_role") = "",
        "Open a headerless token file; each eos_id token ends a document (or, with "
        "delimiter_role='start', begins one).");
  m.def("open_datatrove",
        [](const std::string& path, const std::string& index_path, const std::string& dtype) {
          TokenType type = parse_token_type(dtype);
          py::gil_scoped_release release;
          return TokenShard::open_datatrove(path, index_path, type);
        },
        py::arg("path"), py::arg("index_path"), py::arg("dtype"),
        "Open a datatrove .ds token file with its .ds.index of uint64 document ends.");

  // std::invalid_argument from the index and loader arrives in Python as ValueError.
  py::class_<Source, std::shared_ptr<Source>>(m, "Source",
                                              "The documents of several shard files, in order.")
      .def(py::init<std::vector<std::shared_ptr<TokenShard>>>(), py::arg("shards"))
      .def_property_readonly("num_documents", &Source::num_documents)
      .def_property_readonly("num_tokens", &Source::num_tokens)
      .def_property_readonly("cut_documents", &Source::cut_documents,
                             "Documents cut at the source's edges (a cut inside it, between "
                             "files of one stream, is joined)")
      .def_property_readonly("dtype", [](const Source& s) {
        return cptfast::token_type_name(s.token_type());
      });

  py::class_<CompactBatch>(m, "CompactBatch",
                           "Rows of T+1 token slots with document boundaries; see packed_batch.h.")
      .def_property_readonly("rows", [](const CompactBatch& b) { return b.rows; })
      .def_property_readonly("seq_len", [](const CompactBatch& b) { return b.seq_len; })
      .def_property_readonly("pad_id", [](const CompactBatch& b) { return b.pad_id; })
      .def_property_readonly("tokens",
                             [](py::object self) {
                               auto& b = self.cast<CompactBatch&>();
                               py::dtype dtype(cptfast::token_type_name(b.token_type));
                               py::array flat = readonly_view(dtype, b.rows * (b.seq_len + 1),
                                                              b.tokens.data(), self);
                               return flat.attr("reshape")(b.rows, b.seq_len + 1);
                             })
      .def_property_readonly("row_used", vector_property(&CompactBatch::row_used))
      .def_property_readonly("row_segments", vector_property(&CompactBatch::row_segments))
      .def_property_readonly("segment_starts", vector_property(&CompactBatch::segment_starts))
      .def_property_readonly("row_source", vector_property(&CompactBatch::row_source))
      .def_property_readonly("global_row", vector_property(&CompactBatch::global_row))
      .def_property_readonly("source_row", vector_property(&CompactBatch::source_row))
      .def_property_readonly("state_after",
                             [](const CompactBatch& b) {
                               return py::make_tuple(b.state_after.global_row, b.state_after.rows,
                                                     b.state_after.tokens);
                             },
                             "(global_row, rows per source, tokens per source) after this batch")
      .def_property_readonly("expanded", [](const CompactBatch& b) { return b.expanded; })
      .def_property_readonly("max_seqlen", [](const CompactBatch& b) { return b.max_seqlen; })
      .def("expanded_arrays",
           [](py::object self) {
             auto& b = self.cast<CompactBatch&>();
             if (!b.expanded) throw py::value_error("this batch was not expanded on the host");
             auto matrix = [&](std::vector<int64_t>& values) {  // writable: the batch owns it
               return py::array(py::dtype::of<int64_t>(), {b.rows, b.seq_len}, values.data(), self);
             };
             return py::make_tuple(matrix(b.input_ids), matrix(b.labels), matrix(b.position_ids),
                                   py::array(py::dtype::of<int32_t>(),
                                             {static_cast<int64_t>(b.cu_seqlens.size())},
                                             b.cu_seqlens.data(), self));
           },
           "(input_ids, labels, position_ids, cu_seqlens) expanded by the gathering thread.")
      .def("expand_into",
           [](const CompactBatch& b, py::array input_ids, py::array labels,
              py::array position_ids) {
             ExpandedOutputs out{int64_output(input_ids, "input_ids", b.rows, b.seq_len),
                                 int64_output(labels, "labels", b.rows, b.seq_len),
                                 int64_output(position_ids, "position_ids", b.rows, b.seq_len)};
             expand_into(b.view(), out, false);
           },
           py::arg("input_ids"), py::arg("labels"), py::arg("position_ids"),
           "Write the expanded batch into three int64 [rows, T] arrays.")
      .def("cu_seqlens", [](const CompactBatch& b) { return cu_seqlens_of(b.view()); },
           "(cu_seqlens int32 [sequences + 1], max_seqlen)");

  py::class_<PackedLoader>(m, "PackedLoader")
      .def(py::init([](std::vector<std::shared_ptr<Source>> sources, std::vector<double> weights,
                       const std::string& packing, int64_t seq_len, int64_t batch_size,
                       int64_t window, uint64_t seed, int64_t rank, int64_t world_size,
                       int64_t num_threads, int64_t prefetch, int64_t pad_id,
                       int64_t global_row, std::vector<int64_t> rows,
                       std::vector<int64_t> tokens, std::vector<std::string> cache_prefixes,
                       bool expand) {
             cptfast::LoaderOptions options;
             if (packing == "concat") options.packing = cptfast::Packing::kConcat;
             else if (packing == "bestfit") options.packing = cptfast::Packing::kBestfit;
             else throw py::value_error("packing must be 'concat' or 'bestfit', got '" + packing + "'");
             options.seq_len = seq_len;
             options.batch_size = batch_size;
             options.window = window;
             options.seed = seed;
             options.rank = rank;
             options.world_size = world_size;
             options.num_threads = num_threads;
             options.prefetch = prefetch;
             options.pad_id = pad_id;
             options.expand = expand;
             MixState start{global_row, std::move(rows), std::move(tokens)};
             return std::make_unique<PackedLoader>(std::move(sources), std::move(weights), options,
                                                   std::move(start), std::move(cache_prefixes));
           }),
           py::arg("sources"), py::arg("weights"), py::arg("packing"), py::arg("seq_len"),
           py::arg("batch_size"), py::arg("window"), py::arg("seed"), py::arg("rank"),
           py::arg("world_size"), py::arg("num_threads"), py::arg("prefetch"), py::arg("pad_id"),
           py::arg("global_row") = 0, py::arg("rows") = std::vector<int64_t>{},
           py::arg("tokens") = std::vector<int64_t>{},
           py::arg("cache_prefixes") = std::vector<std::string>{}, py::arg("expand") = true)
      .def("next", &PackedLoader::next, py::call_guard<py::gil_scoped_release>(),
           "The next compact batch of this rank (waits for the background threads).")
      .def("row_epoch", &PackedLoader::row_epoch, py::arg("source"), py::arg("row"),
           py::call_guard<py::gil_scoped_release>(), "The epoch that a source's row starts in.");

  m.attr("has_cuda") = py::bool_(CPTFAST_WITH_CUDA != 0);
#if CPTFAST_WITH_CUDA
  // Device pointers arrive as integers (tensor.data_ptr()) so this file needs no torch headers.
  m.def("expand_on_device",
        [](uintptr_t tokens, const std::string& dtype, int64_t rows, int64_t seq_len,
           uintptr_t row_used, uintptr_t row_segments, uintptr_t segment_starts, int64_t pad_id,
           uintptr_t input_ids, uintptr_t labels, uintptr_t position_ids, uintptr_t stream) {
          CompactBatchView v{reinterpret_cast<const void*>(tokens), parse_token_type(dtype), rows,
                             seq_len, reinterpret_cast<const int32_t*>(row_used),
                             reinterpret_cast<const int32_t*>(row_segments),
                             reinterpret_cast<const int32_t*>(segment_starts), pad_id};
          ExpandedOutputs out{reinterpret_cast<int64_t*>(input_ids),
                              reinterpret_cast<int64_t*>(labels),
                              reinterpret_cast<int64_t*>(position_ids)};
          cptfast::launch_expand_batch(v, out, reinterpret_cast<void*>(stream));
        },
        "Launch the CUDA expansion of a compact batch whose arrays are on the device.");
#endif

  m.def("expand_compact",
        [](py::array tokens, py::array_t<int32_t, py::array::c_style | py::array::forcecast> row_used,
           py::array_t<int32_t, py::array::c_style | py::array::forcecast> row_segments,
           py::array_t<int32_t, py::array::c_style | py::array::forcecast> segment_starts,
           int64_t pad_id, bool by_token) {
          if (tokens.ndim() != 2 || !(tokens.flags() & py::array::c_style)) {
            throw py::value_error("tokens must be a C-contiguous [rows, T+1] array");
          }
          const std::string kind = py::str(tokens.dtype());
          TokenType type = parse_token_type(kind);
          const int64_t rows = tokens.shape(0), seq_len = tokens.shape(1) - 1;
          if (seq_len < 1 || row_used.size() != rows || row_segments.size() != rows + 1) {
            throw py::value_error("row_used needs one entry per row and row_segments rows + 1");
          }
          CompactBatchView v{tokens.data(), type, rows, seq_len, row_used.data(),
                             row_segments.data(), segment_starts.data(), pad_id};
          check_compact(v, segment_starts.size());
          py::array_t<int64_t> input_ids({rows, seq_len}), labels({rows, seq_len}),
              position_ids({rows, seq_len});
          // Poison the outputs so that a position the rule forgets cannot pass a test.
          for (auto* a : {&input_ids, &labels, &position_ids}) {
            std::fill(a->mutable_data(), a->mutable_data() + rows * seq_len, INT64_MIN);
          }
          expand_into(v, {input_ids.mutable_data(), labels.mutable_data(),
                          position_ids.mutable_data()}, by_token);
          py::tuple cu = cu_seqlens_of(v);
          return py::make_tuple(input_ids, labels, position_ids, cu[0], cu[1]);
        },
        py::arg("tokens"), py::arg("row_used"), py::arg("row_segments"), py::arg("segment_starts"),
        py::arg("pad_id") = 0, py::arg("by_token") = false,
        "Expand a compact batch given as arrays (the CPU rule; by_token uses the per-token "
        "search the CUDA kernel uses). Returns (input_ids, labels, position_ids, cu_seqlens, "
        "max_seqlen).");
}
