// Decode-attention instantiations for __nv_bfloat16, head_dim 64 (one file each: they compile in parallel).
#include "decode.cuh"

namespace cq {
template cudaError_t launch_d<__nv_bfloat16, 64>(const AttnParams&, cudaStream_t);
}  // namespace cq
