// Host entry point of the CUDA expansion kernel (csrc/expand_batch.cu). Only declared where the
// extension is built with CUDA; the pointers in `view` and `out` must be device pointers.
#pragma once

#include "packed_batch.h"

namespace cptfast {

// Expands a compact batch already on the device, one thread per token, on `stream`
// (a cudaStream_t, passed untyped so that callers need no CUDA headers).
void launch_expand_batch(const CompactBatchView& view, const ExpandedOutputs& out, void* stream);

}  // namespace cptfast
