"""The tensor-core decode places its work items with FastDiv (kernels/kernels.h): n / d as a multiply-high, an add and
a shift, with the multiplier built on the host (fast_div) and applied on the device (fdiv, common.cuh). kernels.h is
compiled here with the host's C++ compiler (a two-line stand-in for cuda_runtime.h, no CUDA needed), and fdiv's
formula, written out in host C++, is checked against integer division."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parents[1] / "kernels"

CHECK = r"""
#include <cstdio>
#include <random>
#include "kernels.h"
// fdiv (common.cuh) on the host: __umulhi(n, m) is the high word of the 64-bit product
static int fdiv_host(int n, cq::FastDiv f) {
  const uint32_t hi = static_cast<uint32_t>((static_cast<uint64_t>(static_cast<uint32_t>(n)) * f.m) >> 32);
  return static_cast<int>((hi + static_cast<uint32_t>(n)) >> f.s);
}
int main() {
  std::mt19937_64 rng(7);
  long checks = 0, wrong = 0;
  auto test = [&](long d) {
    const cq::FastDiv f = cq::fast_div(static_cast<int>(d));
    auto one = [&](long n) {
      if (n < 0 || n > 0x7fffffffL) return;
      ++checks;
      if (fdiv_host(static_cast<int>(n), f) != n / d && wrong++ < 5) std::printf("d=%ld n=%ld\n", d, n);
    };
    for (long n = 0; n < 4 * d + 64 && n < 20000; ++n) one(n);
    for (long k = 1; k <= 200; ++k) {  // multiples of d across the range, and their neighbours
      const long q = (0x7fffffffL / d) * k / 200;
      for (long e = -2; e <= 2; ++e) one(q * d + e);
    }
    for (long e = 0; e < 64; ++e) one(0x7fffffffL - e);
    for (int i = 0; i < 200; ++i) one(static_cast<long>(rng() & 0x7fffffff));
  };
  for (long d = 1; d <= 3000; ++d) test(d);
  for (int s = 1; s <= 30; ++s)
    for (long e = -3; e <= 3; ++e)
      if ((1L << s) + e >= 1) test((1L << s) + e);
  for (int i = 0; i < 3000; ++i) test(1 + static_cast<long>(rng() % 0x7ffffffe));
  std::printf("%ld checks, %ld wrong\n", checks, wrong);
  return wrong != 0;
}
"""


def test_fast_div_matches_integer_division(tmp_path):
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("needs a C++ compiler (c++, g++ or clang++) on PATH")
    src, exe = tmp_path / "check.cpp", tmp_path / "check"
    src.write_text(CHECK)
    (tmp_path / "cuda_runtime.h").write_text("#pragma once\ntypedef int cudaError_t;\ntypedef struct CUstream_st* cudaStream_t;\n")
    subprocess.run([cxx, "-O2", "-std=c++17", f"-I{tmp_path}", f"-I{KERNELS}", str(src), "-o", str(exe)], check=True,
                   capture_output=True, text=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout
    assert run.stdout.strip().endswith(", 0 wrong"), run.stdout
