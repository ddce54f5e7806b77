// Python bindings of cptfast._C. Arrays handed to Python are read-only numpy views into the
// memory-mapped files; each keeps its reader (and so the mapping) alive through its base.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "token_shard.h"

namespace py = pybind11;
using cptfast::ShardKind;
using cptfast::TokenShard;
using cptfast::TokenType;

namespace {

TokenType parse_token_type(const std::string& name) {
  if (name == "uint16") return TokenType::kU16;
  if (name == "uint32") return TokenType::kU32;
  if (name == "int32") return TokenType::kI32;
  throw py::value_error("dtype must be 'uint16', 'uint32' or 'int32', got '" + name + "'");
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

  py::class_<TokenShard>(m, "TokenShard",
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
                               }
                               return "?";
                             })
      .def_property_readonly("dtype", [](const TokenShard& s) { return cptfast::token_type_name(s.token_type()); })
      .def_property_readonly("num_tokens", &TokenShard::num_tokens)
      .def_property_readonly("num_documents", &TokenShard::num_documents)
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
  m.def("open_llmc", &TokenShard::open_llmc, py::arg("path"), py::arg("delimiter") = -1,
        py::call_guard<py::gil_scoped_release>(),
        "Open an llm.c .bin shard; documents start at each delimiter token (default: the "
        "magic's own: 50256 for GPT-2, 128000 for Llama-3).");
  m.def("open_headerless",
        [](const std::string& path, const std::string& dtype, int64_t eos_id) {
          TokenType type = parse_token_type(dtype);
          py::gil_scoped_release release;
          return TokenShard::open_headerless(path, type, eos_id);
        },
        py::arg("path"), py::arg("dtype"), py::arg("eos_id"),
        "Open a headerless token file; each eos_id token ends a document.");
}
