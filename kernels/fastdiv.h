// Division by a divisor that is fixed for a whole launch, without the hardware's missing integer divide: host side
// (plain C++, so that tests/test_fastdiv.py can compile it without CUDA).
#pragma once

#include <stdint.h>

namespace cq {

// n / d for 0 <= n < 2^31 and 1 <= d < 2^31 without a division instruction sequence: q = (umulhi(n, m) + n) >> s
// with s = ceil(log2 d) and m = floor(2^32 (2^s - d) / d) + 1 (division by invariant integers, Granlund and
// Montgomery 1994). Built on the host once per launch (fast_div), used on the device by fdiv (common.cuh).
struct FastDiv {
  uint32_t m;
  int s;
};
inline FastDiv fast_div(int d) {  // d >= 1
  int s = 0;
  while ((int64_t{1} << s) < d) ++s;
  const uint64_t m = ((uint64_t{1} << 32) * ((uint64_t{1} << s) - static_cast<uint64_t>(d))) / static_cast<uint64_t>(d) + 1;
  return FastDiv{static_cast<uint32_t>(m), s};
}

// The host's form of the quotient that fdiv (common.cuh) computes on the device with __umulhi.
inline int fast_div_apply(int n, FastDiv f) {
  const uint32_t hi = static_cast<uint32_t>((static_cast<uint64_t>(static_cast<uint32_t>(n)) * f.m) >> 32);
  return static_cast<int>((hi + static_cast<uint32_t>(n)) >> f.s);
}

}  // namespace cq
