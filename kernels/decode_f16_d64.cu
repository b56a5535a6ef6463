// Decode-attention instantiations for __half, head_dim 64 (one file each: they compile in parallel).
#include "decode.cuh"

namespace cq {
template cudaError_t launch_d<__half, 64>(const AttnParams&, cudaStream_t);
}  // namespace cq
