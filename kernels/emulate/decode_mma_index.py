"""numpy emulation of kernels/decode_mma.cu's index math (one block, one tile): table copies + PRMT addressing,
mma fragment layouts (PTX m16n8k16), key/column pairing, score selection, value scatter. Checks against float64.

Run: python kernels/emulate/decode_mma_index.py (CPU, seconds)."""
import numpy as np

rng = np.random.default_rng(0)
D, K, NW = 128, 256, 8
DELTA, TILE = 8 * NW, 64 * NW
inv_freq = 1.0 / (10000 ** (np.arange(0, D, 2) / D))
kcent = rng.standard_normal((16, K, 8))  # [group, code, c]
vcent = rng.standard_normal((16, K, 8))
q = rng.standard_normal(D)
P = 1234  # tile base position
kcodes = rng.integers(0, K, (TILE, 16))
vcodes = rng.integers(0, K, (TILE, 16))

def rope(x, pos):
    ang = pos * inv_freq
    c, s = np.cos(ang), np.sin(ang)
    x1, x2 = x[:64], x[64:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s])

def key(t):
    return np.concatenate([kcent[gr, kcodes[t, gr]] for gr in range(16)])

ref = np.array([q @ rope(key(t), P + t) for t in range(TILE)])

# shared-memory key table: copy c, code, slot -> 8 values of chunk slot ^ 4c
tab = np.zeros((2, K, 16, 8))
for c in range(2):
    for slot in range(16):
        tab[c, :, slot] = kcent[slot ^ (4 * c)]
def byte_perm(x, y, s):
    b = [(x >> (8 * i)) & 255 for i in range(4)] + [(y >> (8 * i)) & 255 for i in range(4)]
    return sum(b[(s >> (4 * i)) & 7] << (8 * i) for i in range(4))
def lds_tab(addr):  # addr = copy << 16 | code << 8 | slot << 4
    assert addr % 16 == 0 and addr < 2 * 65536
    return tab[addr >> 16, (addr >> 8) & 255, (addr >> 4) & 15]

# query columns: column n = R(P + 64 n)^T q, stored as channels
def rot_T(x, pos):
    ang = pos * inv_freq
    c, s = np.cos(ang), np.sin(ang)
    x1, x2 = x[:64], x[64:]
    return np.concatenate([x1 * c + x2 * s, x2 * c - x1 * s])
cols = np.stack([rot_T(q, P + DELTA * n) for n in range(8)])  # [8, 128]

def code_words(t):
    row = kcodes[t]
    return [int(sum(int(row[4 * a + i]) << (8 * i) for i in range(4))) for a in range(4)]

scores = np.full(TILE, np.nan)
banks_ok = True
for w in range(NW):
    # per-lane state
    S0 = np.full(32, -np.inf); S1 = np.full(32, -np.inf)
    for v in range(4):
        A = np.zeros((16, 16, 8))  # [row, k, chunk j] over the 8 k-chunks
        Bm = np.zeros((16, 8, 8))  # [k, col, j]
        slots_per_phase = {}
        for lane in range(32):
            g, r = lane >> 2, lane & 3
            sel = 0x7604 | (r << 4)
            odd = g & 1
            loff = [(odd << 16) | (((4 * a + r) ^ (odd << 2)) << 4) for a in range(4)]
            offx = 2 * v * DELTA + 8 * w + g; offy = offx + DELTA
            tau = 8 * w + g
            for tok, off in ((0, offx), (1, offy)):
                cw = code_words(off)
                ch = []
                for a in range(4):
                    addr = byte_perm(cw[a], loff[a], sel)
                    # bank check: slot within 128 B = ((addr >> 4) & 7) must match chunk (4a + r) % 8 ^ 4 odd
                    slots_per_phase.setdefault((tok, a, lane >> 3), []).append((addr >> 4) & 7)
                    ch.append(lds_tab(addr).copy())
                    assert np.allclose(ch[-1], kcent[4 * a + r, kcodes[off, 4 * a + r]])
                # rotate by tau: chunk a (a=0,1) channels 8(4a+r)+m with partner chunk a+2
                for a in range(2):
                    f = inv_freq[8 * (4 * a + r) + np.arange(8)]
                    c, s = np.cos(tau * f), np.sin(tau * f)
                    lo, hi = ch[a].copy(), ch[a + 2].copy()
                    ch[a], ch[a + 2] = lo * c - hi * s, hi * c + lo * s
                # fragments fr[a][hh] = {x w(2hh), y w(2hh), x w(2hh+1), y w(2hh+1)}; word e = channels 2e, 2e+1
                row = g + 8 * tok
                for a in range(4):
                    for hh in range(2):
                        j = 2 * a + hh
                        wlo = ch[a][4 * hh: 4 * hh + 2]      # word 2hh  -> A[row][2r, 2r+1]
                        whi = ch[a][4 * hh + 2: 4 * hh + 4]  # word 2hh+1 -> A[row][2r+8, 2r+9]
                        A[row, 2 * r: 2 * r + 2, j] = wlo
                        A[row, 2 * r + 8: 2 * r + 10, j] = whi
            # B fragment: column g, chunk 4a + r: b0 = word 2hh, b1 = word 2hh+1
            for a in range(4):
                chunk = cols[g, 8 * (4 * a + r): 8 * (4 * a + r) + 8]
                for hh in range(2):
                    j = 2 * a + hh
                    Bm[2 * r: 2 * r + 2, g, j] = chunk[4 * hh: 4 * hh + 2]
                    Bm[2 * r + 8: 2 * r + 10, g, j] = chunk[4 * hh + 2: 4 * hh + 4]
        for key_, sl in slots_per_phase.items():
            if len(set(sl)) != len(sl): banks_ok = False
        Dm = sum(A[:, :, j] @ Bm[:, :, j] for j in range(8))  # [16, 8]
        for lane in range(32):
            g, r = lane >> 2, lane & 3
            sx, sy = Dm[g, 2 * r], Dm[g + 8, 2 * r + 1]  # d0, d3
            if r == v:
                S0[lane], S1[lane] = sx, sy
    for lane in range(32):
        g, r = lane >> 2, lane & 3
        o0 = 2 * r * DELTA + 8 * w + g
        scores[o0], scores[o0 + DELTA] = S0[lane], S1[lane]
print("scores max abs err", np.nanmax(np.abs(scores - ref)), "all written", not np.isnan(scores).any())
print("key gathers conflict-free within quarter-warps:", banks_ok)

# value scatter: p per token, hist[code][slot = lane] with lane = group + 16 * half
p = rng.random(TILE)
hist = np.zeros((K, 32))
for w in range(NW):
    pbuf = np.zeros(72)
    for lane in range(32):
        g, r = lane >> 2, lane & 3
        o0 = 2 * r * DELTA + 8 * w + g
        pbuf[lane], pbuf[36 + lane] = p[o0], p[o0 + DELTA]
    for k in range(32):
        gk, rk = k >> 2, k & 3
        for lane in range(32):
            half = lane >> 4
            o = 2 * rk * DELTA + gk + 8 * w + half * DELTA  # token
            # the kernel's V-row byte address: vlane + (2 rk 64 + gk) * 16 + 2 rk * 16
            vl = (8 * w + half * DELTA) * 16 + half * 16 + (lane & 15)
            addr = vl + (2 * rk * DELTA + gk) * 16 + 2 * rk * 16
            assert addr == o * 16 + (o // DELTA) * 16 + (lane & 15), (k, lane)
            code = vcodes[o, lane & 15]
            hist[code, lane] += pbuf[k + 36 * half]
out_h = np.zeros(D)
for d in range(D):
    gv = d >> 3
    out_h[d] = sum((hist[c, gv] + hist[c, 16 + gv]) * vcent[gv, c, d & 7] for c in range(K))
val = lambda t: np.concatenate([vcent[gr, vcodes[t, gr]] for gr in range(16)])
out_ref = sum(p[t] * val(t) for t in range(TILE))
print("P.V via histogram max abs err", np.abs(out_h - out_ref).max())

# direct P.V of a short item (direct_pv, the c = 8 GQA blocks: R heads, 8 warps, 4 m-tiles each): the p buffer as the
# kernel writes it for R > 1 (head r's p of m-tile v at pbw[r NW 68 + 4 g + v], token + 64 at + 36), read back in
# direct_pv's rounds (v, th; a half-warp per token g = 2 u + half, a lane per value group), for items of n tokens
R, STRIDE = 3, 68
for n in (1, 63, 64, 65, 300, 511, TILE):
    ph = rng.random((R, TILE)) * (np.arange(TILE) < n)  # p of tokens past the item's end is 0 (masked scores)
    out_d = np.zeros((R, D))
    seen = np.zeros(TILE, int)
    for w in range(NW):
        pbw = np.full(R * NW * STRIDE, np.nan)
        for lane in range(32):
            g, r = lane >> 2, lane & 3
            if r >= R:
                continue
            for vv in range(4):
                ox = 2 * vv * DELTA + 8 * w + g
                pbw[r * NW * STRIDE + 4 * g + vv] = ph[r, ox]
                pbw[r * NW * STRIDE + 36 + 4 * g + vv] = ph[r, ox + DELTA]
        for k0 in range(0, 64, 8):
            v, th = k0 >> 4, (k0 >> 3) & 1
            t0 = (2 * v + th) * DELTA + 8 * w
            if t0 >= n:
                continue
            for lane in range(32):
                gam, half = lane & 15, lane >> 4
                for u in range(4):
                    t, g = t0 + 2 * u + half, 2 * u + half
                    if t >= n:
                        continue
                    addr = t * 16 + (t // DELTA) * 16 + gam  # value code row in the stage (16 B skew per 64 tokens)
                    assert addr - (t // DELTA) * 16 == t * 16 + gam
                    code = vcodes[t, gam]
                    if gam == 0:
                        seen[t] += 1
                    for j in range(R):
                        pj = pbw[j * NW * STRIDE + 36 * th + 4 * g + v]
                        assert pj == ph[j, t], (n, w, t, j)
                        out_d[j, 8 * gam: 8 * gam + 8] += pj * vcent[gam, code]
    assert (seen[:n] == 1).all() and (seen[n:] == 0).all(), n
    ref_d = np.stack([sum(ph[j, t] * val(t) for t in range(n)) for j in range(R)])
    print(f"direct P.V, item of {n} tokens, {R} heads: max abs err", np.abs(out_d - ref_d).max())
