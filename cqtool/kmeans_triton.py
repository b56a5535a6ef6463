"""Fused nearest-centroid search (the k-means assignment step) as one Triton kernel.

    points:    xop [g, N, D] fp32  split operand of the centred points (see `point_operand`)
    centroids: cop [g, Kp, D] fp32 split operand of the centroids (see `centroid_operand`), Kp a multiple of BK
    ->         a [g, N] int32 nearest centroid, and optionally d [g, N] fp32 its squared distance

One program takes BN points of one group, loops over the centroids BK at a time, gets |C|^2 - 2 x.C for the
whole [BN, BK] tile from one tensor-core product, and keeps a running minimum per tile slot in registers: only
the [N] assignment leaves the chip, where the torch path writes (and re-reads) the [N, K] distance block.

Accuracy: tf32 products are exact when both factors already have tf32's 10 mantissa bits, so both operands are
split into tf32 hi + lo parts on the host and the three significant products are laid along the inner dimension
(x.C = xh.Ch + xl.Ch + xh.Cl, plus |C|^2 as hi + lo): the distances come out to ~2^-21 relative to |x||C|, like
fp32, with fp32 accumulation. D = 3c + 2 padded to a power of 2 >= 16 (c = 8: 32, so the padding is nearly free).

Nothing here imports triton at module import; `kernel()` builds it on first use.
"""
from __future__ import annotations

import functools
import os

import torch

BN = 128  # points per program
BK = 64  # centroids per tile
NUM_WARPS = 8
MAX_GRID_Y = 65535  # CUDA's limit on the second grid dimension: more groups go in several launches
PAD_DIST = 1e38  # |C|^2 of a padding centroid: never the nearest


def inner_dim(c: int) -> int:
    """Inner dimension of the split operands for c channels: 3c + 2 rounded up to a power of 2, at least 16."""
    return max(16, 1 << (3 * c + 1).bit_length())


def _tf32_split(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a fp32 -> (hi, lo), both with zero low 13 mantissa bits (exact tf32 values), hi + lo = a to ~2^-21."""
    mask = torch.tensor(-8192, dtype=torch.int32, device=a.device)  # 0xFFFFE000
    hi = (a.contiguous().view(torch.int32) & mask).view(torch.float32)
    lo = ((a - hi).view(torch.int32) & mask).view(torch.float32)
    return hi, lo


def point_operand(xc: torch.Tensor) -> torch.Tensor:
    """Centred points xc [g, N, c] fp32 -> xop [g, N, D] = [xh, xl, xh, 1, 1, 0...] fp32."""
    g, N, c = xc.shape
    D = inner_dim(c)
    out = torch.zeros(g, N, D, device=xc.device, dtype=torch.float32)
    step = max(1, (1 << 24) // max(1, N * c))  # bounded temporaries
    for g0 in range(0, g, step):
        hi, lo = _tf32_split(xc[g0 : g0 + step].float())
        o = out[g0 : g0 + step]
        o[..., :c] = hi
        o[..., c : 2 * c] = lo
        o[..., 2 * c : 3 * c] = hi
        o[..., 3 * c : 3 * c + 2] = 1.0
    return out


def centroid_operand(C: torch.Tensor, block: int = BK) -> torch.Tensor:
    """Centroids C [g, K, c] fp32 -> cop [g, Kp, D] = [-2Ch, -2Ch, -2Cl, |C|^2 hi, |C|^2 lo, 0...], Kp = K
    rounded up to `block`; the padding rows have |C|^2 = PAD_DIST."""
    g, K, c = C.shape
    D = inner_dim(c)
    Kp = -(-K // block) * block
    out = torch.zeros(g, Kp, D, device=C.device, dtype=torch.float32)
    hi, lo = _tf32_split(-2.0 * C.float())
    nh, nl = _tf32_split(C.float().square().sum(-1, keepdim=True))
    out[:, :K, :c] = hi
    out[:, :K, c : 2 * c] = hi
    out[:, :K, 2 * c : 3 * c] = lo
    out[:, :K, 3 * c : 3 * c + 1] = nh
    out[:, :K, 3 * c + 1 : 3 * c + 2] = nl
    out[:, K:, 3 * c] = PAD_DIST
    return out


def nearest(xop: torch.Tensor, cop: torch.Tensor, xnorm: torch.Tensor | None = None,
            out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Nearest centroid for every point: xop [g, N, D], cop [g, Kp, D] -> (a [g, N] int32, d [g, N] fp32 or None).

    d (the squared distance to that centroid, clamped at 0) is computed only when xnorm [g, N] = |x|^2 is given.
    out: an int32 [g, N] buffer to write a into. Among exactly equal distances the lowest index wins.
    """
    g, N, D = xop.shape
    Kp = cop.shape[1]
    if cop.shape[0] != g or cop.shape[2] != D or Kp % BK:
        raise ValueError(f"cop must be [g={g}, K multiple of {BK}, D={D}], got {list(cop.shape)}")
    xop, cop = xop.contiguous(), cop.contiguous()
    a = out if out is not None else torch.empty(g, N, dtype=torch.int32, device=xop.device)
    d = None
    if xnorm is not None:
        xnorm = xnorm.contiguous().float()
        d = torch.empty(g, N, dtype=torch.float32, device=xop.device)
    k = kernel()
    for g0 in range(0, g, MAX_GRID_Y):
        g1 = min(g, g0 + MAX_GRID_Y)
        grid = (triton_cdiv(N, BN), g1 - g0)
        k[grid](xop[g0:g1], cop[g0:g1], a[g0:g1],
                xnorm[g0:g1] if d is not None else a[g0:g1], d[g0:g1] if d is not None else a[g0:g1],
                N, N_TILES=Kp // BK, D=D, BN=BN, BK=BK, WRITE_D=d is not None, num_warps=NUM_WARPS)
    return a, d


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel():
    """The jitted kernel (built once per interpreter mode: TRITON_INTERPRET=1 runs it on CPU tensors)."""
    return _build(interpreting())


@functools.cache
def _build(interpret: bool):
    import triton
    import triton.language as tl

    @triton.jit
    def _nearest_kernel(x_ptr, c_ptr, a_ptr, xn_ptr, d_ptr, N,
                        N_TILES: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, WRITE_D: tl.constexpr):
        pid_n = tl.program_id(0)
        g = tl.program_id(1).to(tl.int64)  # g * N * D overflows int32 at calibration scale
        rows = pid_n * BN + tl.arange(0, BN)
        rmask = rows < N
        kd = tl.arange(0, D)
        cols = tl.arange(0, BK)
        x = tl.load(x_ptr + g * N * D + rows[:, None] * D + kd[None, :], mask=rmask[:, None], other=0.0)
        cbase = c_ptr + g * N_TILES * BK * D
        best = tl.full((BN, BK), float("inf"), tl.float32)
        bt = tl.zeros((BN, BK), dtype=tl.int32)
        for t in range(0, N_TILES):
            ct = tl.load(cbase + (t * BK + cols)[None, :] * D + kd[:, None])  # [D, BK]
            # operands are exact tf32 values (split on the host): tf32 products are exact, accumulation fp32
            dist = tl.dot(x, ct, input_precision="tf32")
            lt = dist < best
            best = tl.where(lt, dist, best)
            bt = tl.where(lt, t, bt)
        m = tl.min(best, axis=1)
        idx = tl.where(best == m[:, None], bt * BK + cols[None, :], 2147483647)
        tl.store(a_ptr + g * N + rows, tl.min(idx, axis=1), mask=rmask)
        if WRITE_D:
            xn = tl.load(xn_ptr + g * N + rows, mask=rmask, other=0.0)
            tl.store(d_ptr + g * N + rows, tl.maximum(m + xn, 0.0), mask=rmask)

    return _nearest_kernel
