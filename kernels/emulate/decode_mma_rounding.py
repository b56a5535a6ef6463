"""Rounding model of decode_mma.cu vs the test's criterion (error vs fp64 <= 2x torch's own error in the dtype).

Run: python kernels/emulate/decode_mma_rounding.py (CPU, a few minutes)."""
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from cqtool import quant  # noqa: E402

def run(dtype, S=3000, qscale=2.0, seed=0, pos0=0):
    g = torch.Generator().manual_seed(seed)
    D, K = 128, 256
    kc = torch.randn(1, 16, K, 8, generator=g).to(dtype)
    vc = torch.randn(1, 16, K, 8, generator=g).to(dtype)
    kcodes = torch.randint(0, K, (1, 1, S, 16), generator=g)
    vcodes = torch.randint(0, K, (1, 1, S, 16), generator=g)
    q = (torch.randn(D, generator=g) * qscale).to(dtype)
    pos = torch.arange(S) + pos0
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    scaling = D ** -0.5
    k = quant.decode(kcodes, kc)[0, 0]  # [S, D] dtype
    v = quant.decode(vcodes, vc)[0, 0]
    def ref(wide, lp):
        fr = pos.to(wide).unsqueeze(-1) * inv.to(wide)
        emb = torch.cat((fr, fr), -1)
        c, s = emb.cos().to(lp), emb.sin().to(lp)
        kk = k.to(lp)
        kr = kk * c + quant.rotate_half(kk) * s
        sc = (kr @ q.to(lp)) * scaling
        p = torch.softmax(sc.to(wide), -1).to(lp)
        return (p @ v.to(lp)).double()
    r64 = ref(torch.float64, torch.float64)
    rlp = ref(torch.float32, dtype)
    # ---- kernel model
    TILE, DELTA = 512, 64
    rd = lambda x: x.to(dtype).double()
    out_h = torch.zeros(D, dtype=torch.float64)
    scores = torch.empty(S, dtype=torch.float64)
    qs = q.double() * scaling * math.log2(math.e)
    for t0 in range(0, S, TILE):
        P = int(pos[t0])
        for t in range(t0, min(S, t0 + TILE)):
            o = t - t0
            n, tau = o // DELTA, o % DELTA
            # column: angle fl32(P f) + fl32(64 n f) (recurrence ignored)
            a1 = (torch.tensor(float(P), dtype=torch.float32) * inv).double()
            a2 = (torch.tensor(float(DELTA * n), dtype=torch.float32) * inv).double()
            c, s_ = torch.cos(a1 + a2).float().double(), torch.sin(a1 + a2).float().double()
            col = rd(torch.cat([qs[:64] * c + qs[64:] * s_, qs[64:] * c - qs[:64] * s_]).float())
            at = (torch.tensor(float(tau), dtype=torch.float32) * inv).double()
            C, Sn = rd(torch.cos(at)), rd(torch.sin(at))
            lo, hi = k[t, :64].double(), k[t, 64:].double()
            lo2 = rd(hi * (-Sn) + rd(lo * C))
            hi2 = rd(lo * Sn + rd(hi * C))
            scores[t] = (torch.cat([lo2, hi2]) * col).sum().float().double()
    m = scores.max()
    p = torch.exp2(scores - m).float().double()
    pf = torch.round(p * 2**22) / 2**22
    out = (pf @ v.double()) / p.sum()
    out = rd(out)
    e = lambda x: float((x - r64).norm() / r64.norm())
    return e(out), e(rlp)

for dtype in (torch.bfloat16, torch.float16):
    for qs, S, p0 in ((2.0, 1500, 0), (2.0, 1500, 30000), (8.0, 1500, 0), (0.05, 1500, 0)):
        ek, et = run(dtype, S=S, qscale=qs, pos0=p0)
        print(f"{str(dtype):15s} qscale={qs:5} pos0={p0:6d}: kernel {ek:.2e}  torch {et:.2e}  ratio {ek/et:.2f}")
