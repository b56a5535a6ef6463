"""Batched weighted k-means: one independent problem per channel group, all groups solved together.

    x:         [G, N, c]  G problems (channel groups, possibly of several layers), N points of c channels
    weights:   [G, N]     non-negative sample weights (Fisher), or None for uniform
    centroids: [G, K, c]  fp32

Objective per group: sum_i w_i ||x_i - C[a_i]||^2 / sum_i w_i, a_i the nearest centroid; a centroid is the
weighted mean of its points.

The torch backend runs exact Lloyd iterations for all groups at once:
  * weighted k-means++ seeding (D^2 sampling), batched over groups, on up to 128 K tokens per group (LLM
    activations are heavy-tailed: seeding on a small subsample misses the outliers and costs ~1% objective).
  * assignment: |x - C|^2 = [x, |x|^2, 1] . [-2C, 1, |C|^2] as one batched matmul per block of points, in
    blocks sized from a memory budget, so the [G, N, K] distance tensor never exists. With c = 8 the matmul
    has an inner dimension of 10: it is bound by writing the [n, K] block, not by flops. So on CUDA the block
    is computed in fp16 with a 3-term hi/lo split of both operands (fp32-accurate products, fp32 accumulation;
    the points are scaled per group so the largest distance fits fp16) and written as fp16: half the memory
    traffic of fp32, and the rounding of the output is relative to the distance itself, not to |x|^2 (it holds
    while a group's distances span < ~1e9, i.e. outliers < ~5000x the typical token norm). On CPU it stays fp32 and
    the argmin uses a packed int32 key (see _nearest), ~3x faster than torch's min-with-index there.
  * on CUDA with triton installed, the assignment is instead one fused Triton kernel (kmeans_triton.py): tf32
    tensor-core products of exact hi/lo split operands (fp32-accurate), a running argmin in registers, only
    the [N] assignment written. 3.6x faster than the fp16 bmm path on the full 8c8b problem (H100). Without
    triton, or if the kernel fails, the fp16 path below runs and a RuntimeWarning says so once.
  * cluster sums (weighted x, |x|^2, weight, count) are kept in fp64 and updated only for points that changed
    cluster, so the objective of every iteration is exact and costs no extra pass over the points.
  * groups stop independently (relative objective change below `tol`, or a fixed point) and leave the batch.
Distance bounds (Hamerly, or per-block Yinyang) were tried and dropped: on heavy-tailed activations a few
outlier centroids move 50-100x more than the median one, and 40% of the points still needed a full scan per
iteration, so the bookkeeping cost more than it saved.
"""
from __future__ import annotations

import functools
import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from .config import ConfigError

BACKENDS = ("auto", "torch", "faiss")
INIT_POINTS_PER_CENTROID = 128  # k-means++ on min(N, 128 K) tokens, the same random ones for every group
SPLIT_EPS = 1.0 / 1024  # empty-cluster split: +- this fraction of the group's RMS (faiss uses the same EPS)
CPU_STATE_BYTES = 1 << 30
CPU_SCAN_ELEMS = 1 << 20  # 4 MB fp32 distance blocks: stay in cache
GPU_SCAN_ELEMS = 1 << 28  # 512 MB fp16 blocks: large enough that kernel launches do not dominate
_KERNEL_FAILED = False  # set when the Triton kernel failed once in this process: later fits skip it
FP16_RANGE = 1.6e4  # scaled max |x|^2 on the fp16 path: distances (<= 4 max |x|^2) stay below 65504


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # [G, K, c] float32, on the device k-means ran on
    objective: torch.Tensor  # [G] float32: final weighted mean squared distance to the nearest centroid
    iterations: int  # Lloyd iterations run (the most any group ran)
    history: list[float]  # objective (mean over groups) after each iteration
    refilled: int  # empty clusters refilled over the run
    seconds: float
    backend: str  # "torch" | "faiss-cpu" | "faiss-gpu"


def fit(
    x: torch.Tensor,
    k: int,
    weights: torch.Tensor | None = None,
    iters: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
    backend: str = "auto",
    device: torch.device | str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> KMeansResult:
    """Weighted k-means with `k` centroids for each of the G groups of x [G, N, c].

    iters: Lloyd iterations (centroid updates) at most. tol: a group stops once the relative change of its
    objective is below tol (0: no early stop). A group also stops at a fixed point (no point changed cluster,
    no cluster refilled): more iterations would change nothing. seed: same seed, same device -> identical
    result on CPU.
    backend: "torch" (batched, this module); "faiss": faiss.Kmeans, one run per group, on GPU when faiss sees
    one, k-means++ seeding where the faiss version has it, no subsampling; "auto": faiss only where faiss
    has a GPU and torch would not compute on CUDA, torch otherwise. Why not faiss-cpu by default: on 2 CPU
    cores faiss is ~1.1-1.3x faster at N = 32768 tokens per group but ~6x slower at N = 4096 (it pays per
    group), its OpenMP threads spin badly when another process shares the cores (a 2048-token SmolLM2
    calibration took > 10 min instead of ~1), and with Fisher-like weights torch's objective came out ~2%
    lower in our runs. Pass backend="faiss" to use it anyway.
    device: where the torch backend computes (default: x's device); x may stay on CPU, it is moved chunk by
    chunk. progress(done, total): called after every iteration, counted in group-iterations (total = G *
    iters; a group that stops early counts as done).
    N <= k needs no iterations: every point becomes a centroid and the others repeat points (objective 0).
    """
    t0 = time.perf_counter()
    G, N, c = _check(x, k, weights, iters, tol, backend)
    dev = _device(device, x)
    if backend == "auto":
        backend = "faiss" if dev.type != "cuda" and _faiss_gpus() > 0 else "torch"
    if N <= k:
        res = _every_point(x, k, dev)
    elif backend == "faiss":
        res = _fit_faiss(x, k, weights, iters, tol, seed, progress)
    else:
        res = _fit_torch(x, k, weights, iters, tol, seed, dev, progress)
    if progress is not None:
        progress(G * iters, G * iters)
    if res.centroids.is_cuda:
        torch.cuda.synchronize(res.centroids.device)
    res.seconds = time.perf_counter() - t0
    return res


def objective(x: torch.Tensor, centroids: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Exact weighted mean squared distance to the nearest centroid: x [G, N, c], centroids [G, K, c] -> [G] fp32.

    fp32 on x's device, after centring each group (so |x|^2 does not swamp the distances); sums in fp64.
    The number `fit` reports, and the one to compare backends with.
    """
    G, N, c = x.shape
    if centroids.dim() != 3 or centroids.shape[0] != G or centroids.shape[2] != c:
        raise ConfigError(f"centroids must be [G={G}, K, c={c}], got {list(centroids.shape)}")
    dev = x.device
    out = torch.empty(G, dtype=torch.float64, device=dev)
    step = _group_chunk(dev, N, c)
    for g0 in range(0, G, step):
        xa, mean = _augment(x[g0 : g0 + step], dev)
        C = centroids[g0 : g0 + step].to(dev, torch.float32) - mean
        a = _nearest(xa, _aug_centroids(C), _scan_elems(dev, torch.float32))
        d = _dist2(xa[..., :c], C, a).double()
        if weights is None:
            out[g0 : g0 + step] = d.mean(1)
        else:
            w = weights[g0 : g0 + step].to(dev, torch.float64)
            out[g0 : g0 + step] = (d * w).sum(1) / w.sum(1)
    return out.float()


# ----------------------------------------------------------------------------------------------- checks


def _check(x, k, weights, iters, tol, backend) -> tuple[int, int, int]:
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.is_floating_point():
        got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ConfigError(f"x must be a float tensor [G, N, c], got {got}")
    G, N, c = x.shape
    if min(G, N, c) < 1:
        raise ConfigError(f"x must have G, N, c >= 1, got {list(x.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"k must be an int >= 1, got {k!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ConfigError(f"iters must be an int >= 1, got {iters!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < math.inf:
        raise ConfigError(f"tol must be a number >= 0, got {tol!r}")
    if backend not in BACKENDS:
        raise ConfigError(f"k-means backend must be one of {list(BACKENDS)}, got {backend!r}")
    if not torch.isfinite(x).all():
        raise ConfigError("x contains NaN or inf")
    if weights is not None:
        if not isinstance(weights, torch.Tensor) or tuple(weights.shape) != (G, N):
            got = list(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
            raise ConfigError(f"weights must be [G={G}, N={N}], got {got}")
        if not torch.isfinite(weights).all() or (weights < 0).any():
            raise ConfigError("weights must be finite and >= 0")
        zero = (weights.sum(1) <= 0).nonzero()
        if zero.numel():
            raise ConfigError(f"weights of group {int(zero[0])} sum to 0; every group needs a positive weight")
    return G, N, c


def _device(device, x: torch.Tensor) -> torch.device:
    if device is None:
        return x.device
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device must be like 'cpu', 'cuda' or 'cuda:1', got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device must be cpu or cuda, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but torch sees no CUDA GPU; use device='cpu'")
    return dev


def _faiss_gpus() -> int:
    """GPUs faiss can use (0 when faiss is not installed or is a CPU build)."""
    try:
        import faiss
    except ImportError:
        return 0
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


# --------------------------------------------------------------------------------------- chunk sizing


def _bytes_per_group(N: int, c: int, dev: torch.device) -> int:
    # xa fp32 (c+2), fp16 split operand 3 (c+2) on CUDA, w fp32, a and the new a int64, plus the seeding's
    # copies of the points (~10 (c+2)) or the scan's [N] temporaries, whichever is larger
    lhs = max(6 * (c + 2), 4 * _kt_inner_dim(c)) if dev.type == "cuda" else 0
    return N * (4 * (c + 2) + lhs + 4 + 2 * 8 + 10 * (c + 2) + 16)


def _group_chunk(dev: torch.device, N: int, c: int) -> int:
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        budget = free // 2
    else:
        budget = CPU_STATE_BYTES
    return max(1, budget // _bytes_per_group(N, c, dev))


def _kt_inner_dim(c: int) -> int:
    return max(16, 1 << (3 * c + 1).bit_length())  # kmeans_triton.inner_dim, without importing it


def _scan_elems(dev: torch.device, dtype: torch.dtype) -> int:
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return max(1 << 20, min(GPU_SCAN_ELEMS, free // (8 * dtype.itemsize)))
    return CPU_SCAN_ELEMS


# ------------------------------------------------------------------------------------- distance core


def _augment(x: torch.Tensor, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """x [g, N, c] -> (xa [g, N, c+2] = [x - mean, |x - mean|^2, 1] fp32 on dev, mean [g, 1, c])."""
    g, N, c = x.shape
    xa = torch.empty(g, N, c + 2, device=dev, dtype=torch.float32)
    xc = xa[..., :c]
    xc.copy_(x)
    mean = xc.mean(1, keepdim=True)
    xc.sub_(mean)
    torch.linalg.vector_norm(xc, dim=-1, out=xa[..., c]).square_()
    xa[..., c + 1] = 1.0
    return xa, mean


def _aug_centroids(C: torch.Tensor) -> torch.Tensor:
    """C [g, K, c] -> [g, c+2, K] such that xa @ it = |x - C|^2 (expanded: -2 x.C + |x|^2 + |C|^2)."""
    ones = torch.ones_like(C[..., :1])
    return torch.cat([-2 * C, ones, (C * C).sum(-1, keepdim=True)], -1).transpose(1, 2).contiguous()


def _split16(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    hi = a.half()
    return hi, (a - hi.float()).half()


def _half_operands(xa: torch.Tensor, cat: torch.Tensor | None, s: torch.Tensor):
    """fp16 hi/lo operands whose product is |s x - s C|^2 to ~fp32 accuracy: x.C = xh.Ch + xl.Ch + xh.Cl.

    xa [g, N, c+2] -> [g, N, 3(c+2)] (when cat is None); cat [g, c+2, K] -> [g, 3(c+2), K]. s [g]: per-group
    scale (a power of 2) that keeps the scaled distances inside fp16's range.
    """
    if cat is None:
        g, N, m = xa.shape
        out = torch.empty(g, N, 3 * m, device=xa.device, dtype=torch.float16)
        f = torch.ones(g, 1, m, device=xa.device)
        f[..., :-2] = s.view(-1, 1, 1)
        f[..., -2] = (s * s).view(-1, 1)
        step = max(1, (1 << 24) // N)  # bounded fp32 temporaries
        for g0 in range(0, g, step):
            hi, lo = _split16(xa[g0 : g0 + step] * f[g0 : g0 + step])
            torch.cat([hi, lo, hi], -1, out=out[g0 : g0 + step])
        return out
    f = torch.ones(cat.shape[0], cat.shape[1], 1, device=cat.device)
    f[:, :-2] = s.view(-1, 1, 1)
    f[:, -1] = (s * s).view(-1, 1)
    hi, lo = _split16(cat * f)
    return torch.cat([hi, hi, lo], 1)


def _nearest(lhs: torch.Tensor, rhs: torch.Tensor, elems: int) -> torch.Tensor:
    """Nearest centroid: lhs [g, n, m] @ rhs [g, m, K] gives squared distances -> a [g, n] int64.

    Computed in blocks of at most `elems` distances. fp32 on CPU uses a packed key: the distance's float bits
    with the low mantissa bits replaced by the centroid index, compared as int32 (torch's min-with-index is
    ~10x slower than amin there). The winner is then chosen on distances truncated to 23 - log2(K) mantissa
    bits (3e-5 relative at K=256); a negative distance (rounding near 0) packs below every positive one.
    """
    g, n, _ = lhs.shape
    K = rhs.shape[-1]
    dev = lhs.device
    a = torch.zeros(g, n, dtype=torch.int64, device=dev)
    if K == 1:
        return a
    gs = max(1, min(g, elems // (n * K)))
    ns = max(1, min(n, elems // (gs * K)))
    buf = torch.empty(gs * ns * K, device=dev, dtype=lhs.dtype)
    packed = dev.type == "cpu" and lhs.dtype == torch.float32
    if packed:
        low = (1 << (K - 1).bit_length()) - 1
        ids = torch.arange(K, dtype=torch.int32, device=dev)
    for g0 in range(0, g, gs):
        g1 = min(g, g0 + gs)
        for n0 in range(0, n, ns):
            n1 = min(n, n0 + ns)
            d = torch.bmm(lhs[g0:g1, n0:n1], rhs[g0:g1], out=buf[: (g1 - g0) * (n1 - n0) * K].view(g1 - g0, n1 - n0, K))
            if packed:
                di = d.view(torch.int32)
                di.bitwise_and_(~low).bitwise_or_(ids)
                a[g0:g1, n0:n1] = di.amin(-1) & low
            else:
                a[g0:g1, n0:n1] = d.argmin(-1)
    return a


def _dist2(x: torch.Tensor, C: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Exact |x - C[a]|^2: x [g, n, c], C [g, K, c], a [g, n] -> [g, n] fp32."""
    ca = C.gather(1, a.unsqueeze(-1).expand(-1, -1, C.shape[-1]))
    return (x - ca).square_().sum(-1)


# -------------------------------------------------------------------------------------- torch backend


def _fit_torch(x, k, weights, iters, tol, seed, dev, progress) -> KMeansResult:
    G, N, c = x.shape
    gen = torch.Generator().manual_seed(seed)
    # the seeding's random draws for every group, made before the groups are split into chunks: the chunk size
    # follows the free GPU memory, and a group's result must not (same seed, same codebook, run after run)
    sub, uni = _seeding_draws(gen, N, k, G)
    step = min(G, _group_chunk(dev, N, c))
    cents = torch.empty(G, k, c, device=dev)
    obj = torch.empty(G, dtype=torch.float64, device=dev)
    hist = torch.empty(iters, G, dtype=torch.float64, device=dev)
    ran = torch.zeros(G, dtype=torch.int64)
    refilled = 0
    for g0 in range(0, G, step):
        g1 = min(G, g0 + step)
        xa, mean = _augment(x[g0:g1], dev)
        w = None if weights is None else weights[g0:g1].to(dev, torch.float32).contiguous()
        report = None
        if progress is not None:
            report = lambda done, base=g0 * iters: progress(base + done, G * iters)  # noqa: E731
        lloyd = _Lloyd(xa, w, k, gen, half=dev.type == "cuda", draws=(sub, uni[g0:g1]))
        lloyd.run(iters, tol, report)
        cents[g0:g1] = lloyd.out_C + mean
        obj[g0:g1] = lloyd.out_obj
        hist[:, g0:g1] = lloyd.hist
        ran[g0:g1] = lloyd.ran
        refilled += lloyd.refilled
        del lloyd, xa, w
    T = int(ran.max())
    return KMeansResult(cents, obj.float(), T, hist[:T].mean(1).tolist(), refilled, 0.0, "torch")


def _seeding_draws(gen: torch.Generator, N: int, k: int, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k-means++ seeding's random numbers for g groups of N points: the points it seeds from (the same
    min(N, INIT_POINTS_PER_CENTROID k) for every group) and one uniform per (group, centroid)."""
    return torch.randperm(N, generator=gen)[: min(N, INIT_POINTS_PER_CENTROID * k)], torch.rand(g, k, generator=gen)


class _Lloyd:
    """Lloyd iterations for one chunk of g groups, all tensors on one device.

    State: xa [g, N, c+2] centred points, w [g, N] or None, a [g, N] assignment, C [g, K, c] centroids,
    S [g, K, c+3] fp64 cluster sums of the current assignment (sum w x, sum w |x|^2, sum w, count).
    """

    def __init__(self, xa: torch.Tensor, w: torch.Tensor | None, k: int, gen: torch.Generator, half: bool,
                 fused: bool | None = None, draws: tuple[torch.Tensor, torch.Tensor] | None = None):
        g, N, c2 = xa.shape
        self.c, self.k, self.half = c2 - 2, k, half
        dev = xa.device
        self.xa, self.w = xa, w
        self.scale = xa[..., -2].mean(1).sqrt().clamp_min(1e-30)  # RMS of the centred group: split size
        # fused: the Triton kernel (kmeans_triton) finds the nearest centroid without writing distances;
        # default: on CUDA when triton loads
        use = dev.type == "cuda" and not _KERNEL_FAILED if fused is None else fused
        self.kt = _triton_kmeans() if use else None
        self.s = self.lhs = None
        if self.kt is not None:
            self.lhs = self.kt.point_operand(xa[..., :-2])
        else:
            self._operands()
        if draws is None:  # draws: _seeding_draws made by the caller, else from gen
            draws = _seeding_draws(gen, N, k, g)
        sub, uni = draws[0].to(dev), draws[1].to(dev)
        self.C = _kmeanspp(xa[:, sub], None if w is None else w[:, sub], k, uni)
        self.a = self._nearest()
        self.S = self._sums()
        self.W = self.S[..., self.c + 1].sum(1)
        self.refilled = 0
        self.last = self._objective()  # of the seeding
        self.out_C = self.C.clone()
        self.out_obj = self.last.clone()

    def _operands(self) -> None:
        """The bmm path's operands: fp16 hi/lo split on CUDA (half), the fp32 points themselves on CPU."""
        xa = self.xa
        self.elems = _scan_elems(xa.device, torch.float16 if self.half else torch.float32)
        if self.half:
            top = xa[..., -2].amax(1).clamp_min(1e-30)
            # a power of 2, capped so that s^2 stays finite in fp32 (an all-zero group has top = 1e-30)
            self.s = torch.exp2(torch.floor(torch.log2(torch.sqrt(FP16_RANGE / top)))).clamp_max(2.0**50)
            self.lhs = _half_operands(xa, None, self.s)
        else:
            self.s = self.lhs = None

    def _nearest(self) -> torch.Tensor:
        if self.kt is not None:
            try:
                return self.kt.nearest(self.lhs, self.kt.centroid_operand(self.C))[0].long()
            except Exception as e:  # a compile or launch failure: the bmm path is slower but gives the same answer
                global _KERNEL_FAILED
                if not _KERNEL_FAILED:
                    _warn_fallback(f"the Triton assignment kernel failed ({type(e).__name__}: {e})")
                _KERNEL_FAILED = True
                self.kt = None
                self.lhs = None
                self._operands()
        cat = _aug_centroids(self.C)
        if self.half:
            return _nearest(self.lhs, _half_operands(self.xa, cat, self.s), self.elems)
        return _nearest(self.xa, cat, self.elems)

    def _rows(self, xa_rows: torch.Tensor, w_rows: torch.Tensor | None) -> torch.Tensor:
        """Points [..., c+2] -> their contribution to the cluster sums [..., c+3] (fp64)."""
        src = xa_rows.double()
        if w_rows is not None:
            src = src * w_rows.double().unsqueeze(-1)
        return torch.cat([src, torch.ones_like(src[..., :1])], -1)

    def _sums(self) -> torch.Tensor:
        g, N, c2 = self.xa.shape
        S = torch.zeros(g * self.k, c2 + 1, dtype=torch.float64, device=self.xa.device)
        step = max(1, (1 << 22) // N)
        for g0 in range(0, g, step):
            g1 = min(g, g0 + step)
            flat = self.a[g0:g1] + torch.arange(g0, g1, device=self.xa.device).unsqueeze(1) * self.k
            src = self._rows(self.xa[g0:g1], None if self.w is None else self.w[g0:g1])
            S.index_add_(0, flat.reshape(-1), src.reshape(-1, c2 + 1))
        return S.view(g, self.k, c2 + 1)

    def _objective(self) -> torch.Tensor:
        c, S, C = self.c, self.S, self.C.double()
        sse = S[..., c] - 2 * (C * S[..., :c]).sum(-1) + S[..., c + 1] * (C * C).sum(-1)
        return (sse.sum(1) / self.W).clamp_min(0)

    def _update(self) -> None:
        c, S = self.c, self.S
        mass = S[..., c + 1 : c + 2]
        C = torch.where(mass > 0, S[..., :c] / mass.clamp_min(1e-300), self.C.double()).float()
        split = _refill(C, S[..., c + 2], self.scale)
        self.refilled += int(split.sum())
        self.changed = split > 0
        self.C = C

    def _assign(self) -> None:
        c, k = self.c, self.k
        g, N, _ = self.xa.shape
        an = self._nearest()
        moved = (an != self.a).view(-1).nonzero().squeeze(1)
        self.changed |= torch.bincount(moved // N, minlength=g) > 0
        # only points that changed cluster touch the sums: a few % after the first iterations
        for f in moved.split(1 << 22):
            r = f // N
            ao, anf = self.a.view(-1).index_select(0, f), an.view(-1).index_select(0, f)
            src = self._rows(self.xa.view(-1, c + 2).index_select(0, f),
                             None if self.w is None else self.w.view(-1).index_select(0, f))
            self.S.view(-1, c + 3).index_add_(0, torch.cat([r * k + anf, r * k + ao]), torch.cat([src, -src]))
        self.a = an

    def run(self, iters: int, tol: float, report: Callable[[int], None] | None) -> None:
        g = self.xa.shape[0]
        dev = self.xa.device
        self.hist = torch.empty(iters, g, dtype=torch.float64, device=dev)
        self.ran = torch.full((g,), iters, dtype=torch.int64)
        ids = torch.arange(g, device=dev)  # chunk ids of the rows in the working state
        live = torch.ones(g, dtype=torch.bool, device=dev)  # rows not yet converged
        for t in range(1, iters + 1):
            self._update()
            self._assign()
            cur = self._objective()
            self.hist[t - 1, ids[live]] = cur[live]
            # a group whose points all kept their cluster is at a fixed point: more iterations change nothing
            done = live & ~self.changed
            if t == iters:
                done = live
            elif tol > 0:
                done |= live & ((self.last - cur).abs() <= tol * self.last)
            self.last = cur
            if done.any():
                fin = ids[done]
                self.out_C[fin] = self.C[done]
                self.out_obj[fin] = cur[done]
                self.ran[fin.cpu()] = t
                live &= ~done
                if t < iters:
                    self.hist[t:, fin] = cur[done].unsqueeze(0)
            n_live = int(live.sum())
            if report is not None:
                report((g - n_live) * iters + n_live * t)
            if n_live == 0:
                break
            if n_live <= 3 * live.numel() // 4:  # drop converged groups from the batch
                for name in ("xa", "lhs", "w", "a", "S", "W", "C", "s", "scale", "last", "changed"):
                    v = getattr(self, name)
                    if v is not None:
                        setattr(self, name, v[live])
                ids, live = ids[live], torch.ones(n_live, dtype=torch.bool, device=dev)


@functools.cache
def _triton_kmeans():
    """The kmeans_triton module when triton imports, else None (with one warning that says why)."""
    try:
        import triton  # noqa: F401

        from . import kmeans_triton
    except Exception as e:  # ImportError, or a triton install that is broken in another way
        _warn_fallback(f"triton is not usable ({type(e).__name__}: {e})")
        return None
    return kmeans_triton


def _warn_fallback(why: str) -> None:
    warnings.warn(f"k-means on CUDA: {why}; using the slower fp16 matmul + argmin assignment instead "
                  "(pip install triton for the fused kernel)", RuntimeWarning, stacklevel=3)


def _kmeanspp(xs: torch.Tensor, ws: torch.Tensor | None, k: int, uni: torch.Tensor) -> torch.Tensor:
    """Weighted k-means++ seeding, batched: xs [g, m, c+2] (augmented), ws [g, m] or None, uni [g, k] in [0, 1).

    Centroid j is point i with probability w_i D_i^2 / sum (D_i: distance to the nearest centroid so far;
    the first one with probability w_i / sum). Returns C [g, k, c].
    """
    g, m, c2 = xs.shape
    c = c2 - 2
    rows = torch.arange(g, device=xs.device)
    xt = xs.transpose(1, 2).contiguous()  # [g, c+2, m]: a row-vector product per step is ~10x faster than GEMV
    C = torch.empty(g, k, c, device=xs.device)
    D = torch.empty(g, m, device=xs.device)
    p = ws.clone() if ws is not None else torch.ones(g, m, device=xs.device)
    for j in range(k):
        if j and ws is not None:
            torch.mul(D, ws, out=p)
        elif j:
            p.copy_(D)
        cum = p.cumsum(1)
        pick = torch.searchsorted(cum, uni[:, j : j + 1] * cum[:, -1:], right=True).squeeze(1).clamp_(max=m - 1)
        cj = xs[rows, pick, :c]
        C[:, j] = cj
        dj = torch.bmm(_aug_centroids(cj.unsqueeze(1)).transpose(1, 2), xt).squeeze(1).clamp_min_(0)
        if j:
            torch.minimum(D, dj, out=D)
        else:
            D.copy_(dj)
    return C


def _refill(C: torch.Tensor, count: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Give every empty cluster half of a big one (in place on C [g, K, c]; count [g, K]; scale [g]).

    The r-th empty cluster of a group (by index) splits the r-th largest cluster by point count, faiss style:
    the two copies of its centroid move by +-SPLIT_EPS * scale along a fixed (+1, -1, +1, ...) direction, so
    the next assignment divides its points between them. Only a cluster with 2 or more points is split; empty
    clusters left over are tried again next iteration. Returns the number of clusters refilled per group [g].
    """
    empty = count == 0
    n_empty = empty.sum(1)
    R = int(n_empty.max())
    if R == 0:
        return torch.zeros_like(n_empty)
    g, K, c = C.shape
    e = torch.sort(empty.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :R]
    big = torch.sort(count, dim=1, descending=True, stable=True).indices[:, :R]
    ok = (torch.arange(R, device=C.device) < n_empty.unsqueeze(1)) & (count.gather(1, big) >= 2)
    sign = 1.0 - 2.0 * (torch.arange(c, device=C.device) % 2)
    p = (SPLIT_EPS * scale).view(g, 1, 1) * sign
    okc = ok.unsqueeze(-1)
    ib, ie = big.unsqueeze(-1).expand(-1, -1, c), e.unsqueeze(-1).expand(-1, -1, c)
    cb = C.gather(1, ib)
    # donors first: where ok is False the writes put back what was there
    C.scatter_(1, ib, torch.where(okc, cb - p, cb))
    C.scatter_(1, ie, torch.where(okc, cb + p, C.gather(1, ie)))
    return ok.sum(1)


def _every_point(x: torch.Tensor, k: int, dev: torch.device) -> KMeansResult:
    G, N, c = x.shape
    idx = torch.arange(k, device=x.device) % N
    cents = x[:, idx].to(dev, torch.float32)
    return KMeansResult(cents, torch.zeros(G, device=dev), 0, [], 0, 0.0, "torch")


# -------------------------------------------------------------------------------------- faiss backend


def _fit_faiss(x, k, weights, iters, tol, seed, progress) -> KMeansResult:
    try:
        import faiss
    except ImportError:
        raise ConfigError("k-means backend 'faiss' needs the faiss package (pip install faiss-cpu); "
                          "or use backend='torch'") from None
    import numpy as np

    G, N, c = x.shape
    gpu = faiss.get_num_gpus() > 0
    xs = x.detach().to("cpu", torch.float32).contiguous().numpy()
    ws = None if weights is None else weights.detach().to("cpu", torch.float32).contiguous().numpy()
    cents = np.empty((G, k, c), dtype=np.float32)
    hist = np.zeros((G, iters))
    ran, refilled = 0, 0
    # max_points_per_centroid=N: no subsampling (faiss keeps 256 K points by default)
    opts = {"niter": iters, "seed": seed, "gpu": gpu, "verbose": False, "max_points_per_centroid": N,
            "min_points_per_centroid": 1}
    cp = faiss.ClusteringParameters()
    if hasattr(cp, "early_stop_threshold"):
        opts["early_stop_threshold"] = tol
    if hasattr(cp, "init_method"):  # k-means++ seeding like ours where faiss has it (random points before)
        opts["init_method"] = faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS
    for j in range(G):
        km = faiss.Kmeans(c, k, **opts)
        km.train(xs[j], weights=None if ws is None else ws[j])
        cents[j] = km.centroids
        stats = km.iteration_stats
        obj = [s["obj"] / N for s in stats]
        hist[j, : len(obj)] = obj
        hist[j, len(obj) :] = obj[-1] if obj else 0.0
        ran = max(ran, len(obj))
        refilled += sum(int(s["nsplit"]) for s in stats)
        if progress is not None:
            progress((j + 1) * iters, G * iters)
    C = torch.from_numpy(cents)
    obj = objective(x.detach().cpu(), C, None if weights is None else weights.detach().cpu())
    # history: faiss's per-iteration objective, taken before that iteration's update, unweighted, / N
    return KMeansResult(C, obj, ran, hist[:, :ran].mean(0).tolist(), refilled, 0.0, "faiss-gpu" if gpu else "faiss-cpu")
