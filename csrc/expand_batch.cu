// CUDA expansion of a compact batch into input_ids / labels / position_ids: one thread per
// token, each applying the rule of packed_batch.h (the same code the CPU path runs).
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "expand_batch.h"

namespace cptfast {

__global__ void expand_batch_kernel(CompactBatchView view, ExpandedOutputs out) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= view.rows * view.seq_len) return;
  expand_token(view, i / view.seq_len, i % view.seq_len, out);
}

void launch_expand_batch(const CompactBatchView& view, const ExpandedOutputs& out, void* stream) {
  const int64_t n = view.rows * view.seq_len;
  if (n == 0) return;
  constexpr int kThreads = 256;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  expand_batch_kernel<<<static_cast<unsigned>(blocks), kThreads, 0,
                        static_cast<cudaStream_t>(stream)>>>(view, out);
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("expand_batch_kernel launch failed: ") +
                             cudaGetErrorString(status));
  }
}

}  // namespace cptfast
