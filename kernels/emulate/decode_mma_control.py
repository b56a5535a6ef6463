"""Block-level model of decode_mma.cu's loop: per tile scores -> (scatter of the previous tile) -> block max/mass ->
rescale/flush -> p; epilogue scatter; output. u32 bins are checked for overflow. Compared with exact softmax . V.

Run: python kernels/emulate/decode_mma_control.py (CPU, seconds)."""
import numpy as np

TILE, FIX, FLUSH = 512, 2.0**22, 500.0

def kernel(scores, vals):  # scores [N] log2 units, vals [N] (one value group, one code per token for brevity)
    n_tok = len(scores)
    ntile = -(-n_tok // TILE)
    bins = {}  # code -> u32
    acc = {}   # code -> float
    m_ref, l, ptile, mass_acc = -np.inf, 0.0, 0.0, 0.0
    prev = None  # (codes, fixed p) of the previous tile
    flushes = rescales = 0
    def scatter(t):
        codes, u = t
        for c, x in zip(codes, u):
            bins[c] = bins.get(c, 0) + int(x)
            assert bins[c] < 2**32, "u32 overflow"
    def flush(scale):
        for c in set(bins) | set(acc):
            acc[c] = (acc.get(c, 0.0) + bins.get(c, 0) / FIX) * scale
        bins.clear()
    for it in range(ntile):
        s = scores[it * TILE:(it + 1) * TILE]
        codes = vals[it * TILE:(it + 1) * TILE]
        if prev is not None:
            scatter(prev)  # during this tile's m-tiles, before the barrier
        tmax, mass = s.max(), ptile
        mass_acc += mass
        if tmax > m_ref:
            if m_ref > -np.inf:  # before the first finite max every p was 0: nothing to flush (kShort blocks)
                scale = 2.0 ** (m_ref - tmax)
                flush(scale); l *= scale; rescales += 1
            m_ref = tmax; mass_acc = 0.0
        elif mass_acc > FLUSH:
            flush(1.0); mass_acc = 0.0; flushes += 1
        p = np.float32(2.0) ** (s - m_ref).astype(np.float32)
        l += float(p.sum()); ptile = float(p.sum())
        prev = (codes, np.rint(p.astype(np.float64) * FIX))
    scatter(prev)
    flush(1.0)
    return acc, l, m_ref, flushes, rescales

rng = np.random.default_rng(0)
K = 256
cent = rng.standard_normal(K)
for name, sc in [("random", rng.standard_normal(40000) * 1.4),
                 ("flat", np.zeros(40000)),
                 ("increasing", np.linspace(0, 60, 40000)),
                 ("one spike + tiny rest", np.concatenate([[30.0], np.full(39999, 0.0)])),
                 ("peaky random", rng.standard_normal(40000) * 12)]:
    codes = rng.integers(0, K, len(sc))
    if name == "flat":
        codes[:] = 7  # every token in one bin: the worst case for the bin bound
    acc, l, m, fl, rs = kernel(sc, codes)
    out = sum(acc.get(c, 0.0) * cent[c] for c in range(K)) / l
    p = 2.0 ** (sc - sc.max())
    exact = (p * cent[codes]).sum() / p.sum()
    print(f"{name:22s} rel err {abs(out - exact) / max(abs(exact), 1e-30):.1e}  flushes {fl}  rescales {rs}")
