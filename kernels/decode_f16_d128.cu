// Decode-attention instantiations for __half, head_dim 128 (one file each: they compile in parallel).
#include "decode.cuh"

namespace cq {
template cudaError_t launch_d<__half, 128>(const AttnParams&, cudaStream_t);
}  // namespace cq
