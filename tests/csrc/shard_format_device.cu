// Compiled by tests/test_cuda_build.py for sm_80 and sm_90: proves the shared host/device
// header really builds as device code (nothing built here can run without a GPU).
#include "shard_format.h"

__global__ void widen_tokens(const void* tokens, int type, long long n, long long* out) {
  long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x;
  cptfast::TokenType t;
  if (!cptfast::mmidx_token_type(static_cast<unsigned char>(type), &t)) return;
  if (i < n) out[i] = cptfast::load_token(tokens, t, i) * cptfast::token_itemsize(t);
}
