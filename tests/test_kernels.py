"""CUDA kernels (kernels/, dispatched by cqtool.ops) against the PyTorch reference.

The reference at the top is the spec (quant.py + attention.attend_codes_reference) computed in a chosen dtype.
A kernel passes when its error against the float64 reference is at most twice the error of the same reference
computed natively in the test dtype (PyTorch's own error at that dtype). Inputs are random, of awkward sizes,
and outputs are poisoned before every run. GPU tests are marked `cuda` and skipped without a GPU; the CPU
tests at the bottom check that the fallback is announced.
"""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from cqtool.models import cache_kwarg
from cqtool import ops, quant
from cqtool.attention import _dense_mask, fp_region

# ---------------------------------------------------------------- reference


def reference_attention(query, view, mask, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """attention.attend_codes_reference computed in `dtype` -> [B, Q, H_q, D] in `dtype`.

    Low precision follows what a PyTorch implementation does: RoPE angles in fp32, cos/sin cast to the dtype, keys
    rotated, matmuls and P in the dtype, softmax in fp32. float64 uses exact angles and float64 throughout.
    """
    layer = view.layer
    cache, cfg = layer.parent, layer.config
    B, Hq, Q, D = query.shape
    S = view.length
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    kc, vc = layer.valid_codes()
    k = quant.decode(quant.unpack(kc, layer.k_bits, layer.k_groups), layer.k_centroids.to(dtype))
    v = quant.decode(quant.unpack(vc, layer.v_bits, layer.v_groups), layer.v_centroids.to(dtype))
    freqs = cache.positions[:, :S].to(wide).unsqueeze(-1) * cache.inv_freq.to(query.device, wide)
    emb = torch.cat((freqs, freqs), -1)
    k = quant.apply_rope(k, (emb.cos() * cache.rope_scale).to(dtype), (emb.sin() * cache.rope_scale).to(dtype))
    rep = Hq // k.shape[1]
    q = query.to(dtype)
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
    use_fp = None
    if cfg.window or cfg.sinks:
        lo, fk, fv = fp_region(view, S)
        kf, vf = k.clone(), v.clone()
        kf[:, :, lo:S] = fk.to(dtype).repeat_interleave(rep, 1)
        vf[:, :, lo:S] = fv.to(dtype).repeat_interleave(rep, 1)
        if cfg.sinks and layer.sink_k is not None:
            n = layer.sink_k.shape[2]
            kf[:, :, :n] = layer.sink_k.to(dtype).repeat_interleave(rep, 1)
            vf[:, :, :n] = layer.sink_v.to(dtype).repeat_interleave(rep, 1)
        qi = torch.arange(view.start, view.start + Q, device=q.device).view(Q, 1)
        kj = torch.arange(S, device=q.device).view(1, S)
        use_fp = ((qi - kj) < cfg.window) | (kj < min(cfg.sinks, S))
        scores = torch.where(use_fp, torch.matmul(q, kf.transpose(-1, -2)) * scaling, scores)
    allowed = _dense_mask(mask, B, Q, S, view.start, q.device)
    scores = scores.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(scores.to(wide), dim=-1).nan_to_num(0.0).to(dtype)
    if use_fp is None:
        out = torch.matmul(p, v)
    else:
        out = torch.matmul(p * use_fp, vf) + torch.matmul(p * ~use_fp, v)
    return out.transpose(1, 2).contiguous()


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def assert_within_2x(out, query, view, mask, scaling):
    assert torch.isfinite(out).all(), "kernel output has NaN/Inf (unwritten or broken)"
    ref64 = reference_attention(query, view, mask, scaling, torch.float64)
    ref_lp = reference_attention(query, view, mask, scaling, query.dtype)
    e_k, e_t = rel_err(out, ref64), rel_err(ref_lp, ref64)
    assert e_k <= 2 * e_t + 1e-6, f"kernel error {e_k:.3e} > 2 x torch {query.dtype} error {e_t:.3e}"
    return e_k, e_t


# ---------------------------------------------------------------- random cases

gpu = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def cuda_test(fn):
    for m in gpu:
        fn = m(fn)
    return fn


def poison_allocator(nbytes: int = 1 << 28, device: str = "cuda") -> None:
    """Fill the caching allocator's free blocks with NaN so that an output element the kernel never writes shows."""
    t = torch.empty(nbytes // 2, dtype=torch.float16, device=device)
    t.fill_(float("nan"))
    del t


def make_case(B=2, Hq=4, Hkv=2, D=128, S=17, Q=1, dtype=torch.float16, kspec=(8, 8), vspec=(8, 8), window=0, sinks=0,
              pads=None, mask_none=False, gaps=False, seed=0, rope_scale=1.0, qscale=2.0, dev="cuda"):
    """A CQ layer view as CQLayer.update would hand it over: S tokens cached (the last Q are new)."""
    g = torch.Generator(device=dev).manual_seed(seed)
    start = S - Q

    def rn(*shape):
        return torch.randn(*shape, generator=g, device=dev)

    def codebook(c, b):
        return rn(Hkv, D // c, 2**b, c).to(dtype)

    kc_, kb_ = kspec
    vc_, vb_ = vspec
    k_cent, v_cent = codebook(kc_, kb_), codebook(vc_, vb_)
    cap = S + 37  # rows past S hold garbage the kernels must not use

    def code_buf(c, b):
        codes = torch.randint(0, 2**b, (B, Hkv, S, D // c), generator=g, device=dev)
        buf = torch.randint(0, 256, (B, Hkv, cap, quant.row_bytes(D // c, b)), generator=g, device=dev).to(torch.uint8)
        buf[:, :, :S] = quant.pack(codes, b)
        return buf

    pads = pads or [0] * B
    positions = torch.stack([torch.cat([torch.ones(p, dtype=torch.long), torch.arange(S - p)]) for p in pads]).to(dev)
    if gaps:  # irregular positions: exercise the exact-RoPE path of the decode kernel
        positions = positions + torch.randint(0, 3, (B, S), generator=g, device=dev).cumsum(1) * 7 + 1000
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    cache = SimpleNamespace(positions=positions, inv_freq=inv_freq, rope_scale=rope_scale)
    cache.cos_sin = lambda n, device: quant.rope_cos_sin(positions[:, :n].to(device), inv_freq.to(device), rope_scale)
    cfg = SimpleNamespace(window=window, sinks=sinks)
    layer = SimpleNamespace(k_codes=code_buf(kc_, kb_), v_codes=code_buf(vc_, vb_), k_centroids=k_cent, v_centroids=v_cent,
                            k_bits=kb_, v_bits=vb_, k_groups=D // kc_, v_groups=D // vc_, config=cfg, parent=cache,
                            sink_k=None, sink_v=None, length=S)
    layer.valid_codes = lambda: (layer.k_codes[:, :, :S], layer.v_codes[:, :, :S])
    # new tokens' post-RoPE K/V in full precision, as transformers hands them (strided [B, H, Q, D])
    new_k = rn(B, Q, Hkv, D).to(dtype).transpose(1, 2)
    new_v = rn(B, Q, Hkv, D).to(dtype).transpose(1, 2)
    win_k = win_v = None
    w = min(window, start)
    if window and w:
        win_k, win_v = rn(B, Hkv, w, D).to(dtype), rn(B, Hkv, w, D).to(dtype)
    if sinks:
        n = min(sinks, S)
        layer.sink_k, layer.sink_v = rn(B, Hkv, n, D).to(dtype), rn(B, Hkv, n, D).to(dtype)
    view = SimpleNamespace(layer=layer, new_k=new_k, new_v=new_v, start=start, win_k=win_k, win_v=win_v, length=S,
                           rows=None)
    query = (rn(B, Q, Hq, D) * qscale).to(dtype).transpose(1, 2)  # [B, Hq, Q, D], strided like transformers'
    if mask_none:
        mask = None
    else:
        qi = torch.arange(start, S, device=dev).view(Q, 1)
        kj = torch.arange(S, device=dev).view(1, S)
        pad = torch.tensor(pads, device=dev).view(B, 1, 1)
        mask = ((kj <= qi).unsqueeze(0) & (kj.unsqueeze(0) >= pad)).unsqueeze(1)  # [B, 1, Q, S]
    return query, view, mask, D**-0.5


def run_attention(query, view, mask, scaling):
    poison_allocator()
    out = ops.cq_attention(query, view, mask, scaling)
    torch.cuda.synchronize()
    assert ops.BACKEND_USED["attention"] == "cuda", ops.kernel_status()
    return out


# ---------------------------------------------------------------- encode


ENCODE_CASES = [  # (B, H, Q, D, c, b, start, dtype)
    (1, 1, 1, 128, 8, 8, 0, torch.float16),
    (2, 3, 17, 64, 4, 6, 5, torch.bfloat16),
    (3, 2, 1, 128, 1, 4, 40, torch.float16),
    (1, 4, 33, 128, 2, 9, 0, torch.bfloat16),
    (2, 2, 5, 64, 16, 12, 7, torch.float16),
    (1, 8, 4097, 128, 8, 8, 3, torch.bfloat16),
    (2, 2, 7, 128, 16, 10, 1, torch.bfloat16),
    (1, 2, 9, 64, 8, 5, 2, torch.float16),
    (2, 1, 3, 128, 4, 11, 0, torch.float16),
    (1, 2, 2, 64, 1, 7, 0, torch.bfloat16),
]


@cuda_test
@pytest.mark.parametrize("B,H,Q,D,c,b,start,dtype", ENCODE_CASES)
def test_encode_matches_reference(B, H, Q, D, c, b, start, dtype):
    torch.manual_seed(0)
    x = torch.randn(B, Q, H, D, device="cuda").to(dtype).transpose(1, 2)  # strided, as the k_proj tap gives
    cent = torch.randn(H, D // c, 2**b, c, device="cuda").to(dtype)
    R = quant.row_bytes(D // c, b)
    cap = start + Q + 11
    codes = torch.randint(0, 256, (B, H, cap, R), device="cuda", dtype=torch.uint8)
    before = codes.clone()
    ops.encode_into(x, cent, b, codes, start)
    torch.cuda.synchronize()
    assert ops.BACKEND_USED["encode"] == "cuda", ops.kernel_status()
    # rows outside [start, start+Q) untouched
    assert torch.equal(codes[:, :, :start], before[:, :, :start])
    assert torch.equal(codes[:, :, start + Q :], before[:, :, start + Q :])
    got = codes[:, :, start : start + Q]
    got_codes = quant.unpack(got, b, D // c)
    assert torch.equal(quant.pack(got_codes, b), got), "packing differs from quant.pack (padding bits must be 0)"
    ref_codes = quant.encode(x, cent)
    # ties and last-ulp differences may pick another centroid, but never a farther one
    xs = x.double().reshape(B, H, Q, D // c, c)
    cg = cent.double()

    def dist(codes_):
        sel = torch.stack([cg[h][torch.arange(D // c, device="cuda"), codes_[:, h]] for h in range(H)], 1)  # [B,H,Q,G,c]
        return ((xs - sel) ** 2).sum(-1)

    d_got, d_ref = dist(got_codes), dist(ref_codes)
    assert (d_got <= d_ref + 1e-3 * (1 + d_ref)).all()
    assert (got_codes == ref_codes).float().mean() > 0.99


# ---------------------------------------------------------------- decode attention

DECODE_CASES = [  # dict(...) for make_case
    dict(S=1, Q=1, B=1, Hq=1, Hkv=1),
    dict(S=17, Q=1, B=3, Hq=3, Hkv=1, pads=[0, 5, 16]),
    dict(S=4097, Q=1, B=2, Hq=32, Hkv=4, pads=[0, 1000], dtype=torch.bfloat16),
    dict(S=4097, Q=1, B=1, Hq=4, Hkv=4, D=64, kspec=(4, 8), vspec=(4, 8)),
    dict(S=300, Q=2, B=2, Hq=8, Hkv=2, kspec=(8, 10), vspec=(16, 12), pads=[3, 0], dtype=torch.bfloat16),
    dict(S=129, Q=3, B=2, Hq=6, Hkv=2, D=64, kspec=(1, 4), vspec=(2, 5), mask_none=True),
    dict(S=1000, Q=1, B=2, Hq=8, Hkv=1, kspec=(16, 12), vspec=(8, 9), gaps=True),
    dict(S=65, Q=1, B=2, Hq=4, Hkv=4, window=8, dtype=torch.bfloat16, pads=[0, 9]),
    dict(S=65, Q=1, B=2, Hq=4, Hkv=2, sinks=4, D=64),
    dict(S=200, Q=2, B=2, Hq=8, Hkv=2, window=16, sinks=3, pads=[7, 0], kspec=(2, 8), vspec=(8, 8)),
    dict(S=6, Q=2, B=1, Hq=3, Hkv=3, window=32, sinks=2),
    dict(S=2048, Q=1, B=4, Hq=4, Hkv=4, rope_scale=0.7, gaps=True, dtype=torch.bfloat16),
    dict(S=33, Q=4, B=1, Hq=8, Hkv=2, D=64, kspec=(8, 7), vspec=(4, 4), dtype=torch.bfloat16),
    # the fast paths (tables in shared memory, compile-time gather width), with irregular positions and padding
    dict(S=700, Q=1, B=2, Hq=4, Hkv=4, kspec=(8, 8), vspec=(16, 6), dtype=torch.bfloat16, pads=[0, 100]),
    dict(S=3000, Q=1, B=1, Hq=8, Hkv=8, kspec=(4, 8), vspec=(4, 8), dtype=torch.bfloat16),
    dict(S=5000, Q=1, B=2, Hq=2, Hkv=2, kspec=(8, 8), vspec=(8, 8), gaps=True, pads=[0, 3001]),
    dict(S=1500, Q=1, B=2, Hq=8, Hkv=2, D=64, kspec=(4, 6), vspec=(4, 8), pads=[700, 0]),
]


@cuda_test
@pytest.mark.parametrize("case", DECODE_CASES, ids=[f"case{i}" for i in range(len(DECODE_CASES))])
def test_decode_attention(case):
    query, view, mask, scaling = make_case(**case)
    out = run_attention(query, view, mask, scaling)
    assert out.shape == (query.shape[0], query.shape[2], query.shape[1], query.shape[3])
    assert_within_2x(out, query, view, mask, scaling)


@cuda_test
@pytest.mark.parametrize("c", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("b", [4, 6, 8, 10, 12])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_all_codebooks(c, b, dtype):
    D = 128 if (c + b) % 2 else 64
    query, view, mask, scaling = make_case(S=257, Q=1, B=2, Hq=4, Hkv=1 if b % 4 else 4, D=D, kspec=(c, b),
                                           vspec=(16 // c if c < 16 else 1, 12 - b + 4), dtype=dtype, pads=[0, 30])
    assert_within_2x(run_attention(query, view, mask, scaling), query, view, mask, scaling)


@cuda_test
@pytest.mark.parametrize("ratio", [1, 3, 4, 8])
@pytest.mark.parametrize("S", [1, 17, 4097])
def test_decode_gqa_and_lengths(ratio, S):
    query, view, mask, scaling = make_case(S=S, Q=1, B=2, Hq=2 * ratio, Hkv=2, pads=[0, S // 2],
                                           dtype=torch.bfloat16 if ratio % 2 else torch.float16)
    assert_within_2x(run_attention(query, view, mask, scaling), query, view, mask, scaling)


@cuda_test
@pytest.mark.parametrize("case", DECODE_CASES, ids=[f"case{i}" for i in range(len(DECODE_CASES))])
def test_decode_by_dequant_sdpa(case, monkeypatch):
    """DECODE_KERNEL = "dequant-sdpa": decode queries through the dequant kernel and torch SDPA (with padding, gaps,
    windows and sinks, every codebook of DECODE_CASES), within the bound."""
    monkeypatch.setattr(ops, "DECODE_KERNEL", "dequant-sdpa")
    query, view, mask, scaling = make_case(**case)
    out = run_attention(query, view, mask, scaling)
    assert ops.KERNEL_USED["attention"] == "dequant+sdpa", ops.kernel_status()
    assert_within_2x(out, query, view, mask, scaling)


# ---------------------------------------------------------------- tensor-core decode kernel (kernels/decode_mma.cu)

C4 = dict(kspec=(4, 8), vspec=(4, 8))
MMA_CASES = [  # one query, head_dim 128, 8-bit codes with c = 8 (and below, c = 4) for K and V; MHA and GQA
    dict(S=3000, B=2, Hq=4, Hkv=4, dtype=torch.bfloat16, pads=[0, 1234]),  # left padding, split over blocks
    dict(S=4097, B=1, Hq=2, Hkv=2, qscale=0.05),  # nearly flat attention: the histogram is flushed every tile
    dict(S=2500, B=1, Hq=2, Hkv=2, qscale=8.0, dtype=torch.bfloat16),  # peaky: the running max moves (rescales)
    dict(S=1100, B=3, Hq=48, Hkv=48, pads=[0, 5, 600]),  # 144 rows: one block per row, no split-K
    dict(S=700, B=2, Hq=2, Hkv=2, gaps=True, dtype=torch.bfloat16, pads=[0, 100]),  # irregular positions
    dict(S=513, B=1, Hq=1, Hkv=1, rope_scale=0.7),  # one tile and one token
    dict(S=2049, B=2, Hq=1, Hkv=1, pads=[2045, 0]),  # 4 keys over 3 splits: one split has none
    # GQA groups of 2-4 query heads: one block per group (8 warps); larger groups: ceil(group / 4) blocks of R heads per
    # kv head, the last overlapping the one before when R does not divide the group (5 -> 3 + 3, 7 -> 4 + 4)
    dict(S=3000, B=2, Hq=8, Hkv=2, dtype=torch.bfloat16, pads=[0, 1234]),  # group 4, split over blocks
    dict(S=1500, B=1, Hq=6, Hkv=2, gaps=True),  # group 3, irregular positions
    dict(S=4097, B=1, Hq=4, Hkv=2, qscale=0.05),  # group 2, flat: histograms flushed every tile
    dict(S=2500, B=2, Hq=8, Hkv=2, qscale=8.0, dtype=torch.bfloat16, pads=[700, 0]),  # group 4, peaky: rescales
    dict(S=1100, B=3, Hq=96, Hkv=24, pads=[0, 5, 600]),  # group 4, 72 groups: no split-K
    dict(S=2049, B=1, Hq=16, Hkv=2),  # group 8: two blocks of 4 query heads per kv head
    dict(S=1800, B=2, Hq=12, Hkv=2, dtype=torch.bfloat16, pads=[0, 900]),  # group 6: two blocks of 3
    dict(S=1300, B=1, Hq=10, Hkv=2),  # group 5: heads 0-2 and 2-4
    dict(S=2200, B=2, Hq=14, Hkv=2, dtype=torch.bfloat16, pads=[0, 1500]),  # group 7: 0-3 and 3-6, split over blocks
    dict(S=1700, B=3, Hq=20, Hkv=2, gaps=True, pads=[9, 0, 1000]),  # group 10: 0-3, 4-7, 6-9; irregular positions
    dict(S=1200, B=2, Hq=28, Hkv=4, window=64, sinks=3, pads=[0, 300]),  # group 7 (Qwen2.5-7B): window and sinks
    # a full-precision window / sinks: the codes on tensor cores, the rest as the CUDA-core kernel's last split
    dict(S=3000, B=2, Hq=4, Hkv=4, window=128, pads=[0, 1234]),  # split-K over the codes, then the window
    dict(S=2100, B=2, Hq=8, Hkv=2, window=128, sinks=4, dtype=torch.bfloat16, pads=[0, 2050]),  # group 4; row 1:
    # no key before the window (its code items are empty)
    dict(S=700, B=1, Hq=6, Hkv=2, sinks=16, gaps=True),  # group 3, sinks only, irregular positions
    dict(S=100, B=2, Hq=2, Hkv=2, window=128, pads=[0, 40]),  # the window covers every key
    # CQ-4c8b (c = 4 for K and V) on tensor cores with 8 warps: MHA, and GQA in blocks of 2 query heads (3 -> 2 + 2,
    # overlapping); with 16 warps the CUDA-core kernel
    dict(S=3000, B=2, Hq=4, Hkv=4, dtype=torch.bfloat16, pads=[0, 1234], **C4),  # left padding, split over blocks
    dict(S=4097, B=1, Hq=2, Hkv=2, qscale=0.05, **C4),  # flat: flushed every tile
    dict(S=2500, B=1, Hq=2, Hkv=2, qscale=8.0, dtype=torch.bfloat16, **C4),  # peaky: rescales
    dict(S=1100, B=3, Hq=48, Hkv=48, pads=[0, 5, 600], **C4),  # no split-K
    dict(S=700, B=2, Hq=2, Hkv=2, gaps=True, dtype=torch.bfloat16, pads=[0, 100], **C4),  # irregular positions
    dict(S=513, B=1, Hq=1, Hkv=1, rope_scale=0.7, **C4),  # one tile and one token
    dict(S=2049, B=2, Hq=1, Hkv=1, pads=[2045, 0], **C4),  # a split with no key
    dict(S=3000, B=2, Hq=4, Hkv=4, window=128, sinks=2, pads=[0, 1234], **C4),  # codes, then window and sinks
    dict(S=1500, B=2, Hq=8, Hkv=2, dtype=torch.bfloat16, pads=[0, 700], **C4),  # group 4: two blocks of 2
    dict(S=1300, B=1, Hq=6, Hkv=2, gaps=True, **C4),  # group 3: heads 0-1 and 1-2, irregular positions
    dict(S=4097, B=1, Hq=4, Hkv=2, qscale=0.05, **C4),  # group 2, flat: flushed every tile
    dict(S=2500, B=2, Hq=4, Hkv=2, qscale=8.0, dtype=torch.bfloat16, pads=[700, 0], **C4),  # peaky: rescales
    dict(S=1200, B=2, Hq=28, Hkv=4, window=64, sinks=3, pads=[0, 300], **C4),  # group 7: 4 blocks; window, sinks
    dict(S=1100, B=3, Hq=96, Hkv=24, pads=[0, 5, 600], **C4),  # group 4, 96 blocks: no split-K
]


def mma_name(kernel: str, case: dict) -> str:
    Hq, Hkv = case["Hq"], case["Hkv"]
    if case.get("kspec") == (4, 8) and kernel == "tensor-core-16w":  # c = 4: tensor cores with 8 warps only
        return "decode"
    if kernel == "tensor-core-16w":
        return "decode-mma16"
    if kernel == "tensor-core-per-head":  # a block per query head, GQA too
        return "decode-mma"
    return "decode-mma-gqa" if Hq > Hkv else "decode-mma"  # every GQA group runs blocks of 2-4 of its heads


def check_decode(monkeypatch, case: dict, ran: str, **settings):
    """One decode query per sequence of `case` with the ops settings given (DECODE_KERNEL=..., ...): the kernel that
    ran is `ran`, its output within the 2x bound. Returns the case's (query, view, mask, scaling)."""
    for name, value in settings.items():
        monkeypatch.setattr(ops, name, value)
    query, view, mask, scaling = make_case(Q=1, **case)
    out = run_attention(query, view, mask, scaling)
    assert ops.KERNEL_USED["attention"] == ran
    assert_within_2x(out, query, view, mask, scaling)
    return query, view, mask, scaling


@cuda_test
@pytest.mark.parametrize("kernel", ["tensor-core", "tensor-core-16w", "tensor-core-per-head"])
@pytest.mark.parametrize("case", MMA_CASES, ids=[f"mma{i}" for i in range(len(MMA_CASES))])
def test_decode_mma_kernel(case, kernel, monkeypatch):
    # MMA_LONG_MIN: the CQ-8c8b MHA block's short-item build (LONG: below)
    check_decode(monkeypatch, case, mma_name(kernel, case), DECODE_KERNEL=kernel, MMA_LONG_MIN=1 << 30)


@cuda_test
@pytest.mark.parametrize("case", [dict(B=2, Hq=4, Hkv=4, S=1500, pads=[0, 333], dtype=torch.bfloat16),
                                  dict(B=1, Hq=6, Hkv=2, S=700, kspec=(4, 6), vspec=(2, 8), D=64)])
def test_decode_without_code_major_rows(case, monkeypatch):
    """Without the code-major rows (CODE_MAJOR_MAX_BITS = 0) the CUDA-core kernel gathers its tables from the
    centroids, as it does for more than 8 bits, and the tensor-core kernel, which needs the rows, leaves the call to it
    (and says so); rows of another dtype or shape are refused with the rule."""
    query, view, mask, scaling = check_decode(monkeypatch, case, "decode", DECODE_KERNEL="tensor-core",
                                              CODE_MAJOR_MAX_BITS=0)
    monkeypatch.setattr(ops, "CODE_MAJOR_MAX_BITS", 8)
    layer = view.layer
    k, v = layer.k_centroids, layer.v_centroids
    rows = k.transpose(1, 2).reshape(k.shape[0], k.shape[2], -1)
    for bad in (rows.float(), rows.transpose(1, 2).contiguous() if rows.shape[1] != rows.shape[2] else rows[:1]):
        layer._code_major = (k, v, (k._version, v._version), bad.contiguous(), None)  # fp32; or [H, D, K] / 1 head
        with pytest.raises(RuntimeError, match="k_rows must be the centroids code-major"):
            ops.cq_attention(query, view, mask, scaling)


MHA_C8_CASES = [c for c in MMA_CASES if c["Hq"] == c["Hkv"] and "kspec" not in c]


@cuda_test
@pytest.mark.parametrize("case", MHA_C8_CASES, ids=[f"long{i}" for i in range(len(MHA_C8_CASES))])
def test_decode_mma_long_build(case, monkeypatch):
    """The CQ-8c8b MHA block's LONG build (ops.MMA_LONG_MIN = 0: every item) on the same cases."""
    check_decode(monkeypatch, case, "decode-mma-long", DECODE_KERNEL="tensor-core", MMA_LONG_MIN=0)


@cuda_test
def test_decode_mma_long_threshold(monkeypatch):
    """Items of at least ops.MMA_LONG_MIN tokens take the LONG build: 144 rows of 1100 tokens (no split-K)."""
    monkeypatch.setattr(ops, "DECODE_KERNEL", "tensor-core")
    query, view, mask, scaling = make_case(S=1100, Q=1, B=3, Hq=48, Hkv=48, dtype=torch.bfloat16, pads=[0, 5, 600])
    outs = {}
    for long_min, name in ((1100, "decode-mma-long"), (1101, "decode-mma")):
        monkeypatch.setattr(ops, "MMA_LONG_MIN", long_min)
        outs[name] = run_attention(query, view, mask, scaling)
        assert ops.KERNEL_USED["attention"] == name
        assert_within_2x(outs[name], query, view, mask, scaling)
    assert rel_err(outs["decode-mma"], outs["decode-mma-long"]) < 1e-2


# Short items (one tile) of the c = 8 GQA blocks: P.V straight from the value codes (ops.MMA_DIRECT_MAX tokens or
# fewer; 256: sequences also split into direct items of 256 tokens) or through the histogram (0)
MMA_SHORT_CASES = [
    dict(S=200, B=3, Hq=8, Hkv=2, dtype=torch.bfloat16, pads=[0, 150, 7]),  # group 4; rows of 200, 50, 193 keys
    dict(S=256, B=2, Hq=6, Hkv=2, gaps=True),  # group 3, irregular positions
    dict(S=300, B=2, Hq=10, Hkv=2, pads=[0, 45]),  # group 5: heads 0-2 and 2-4
    dict(S=512, B=2, Hq=4, Hkv=2, qscale=8.0, dtype=torch.bfloat16, pads=[0, 1]),  # group 2: a whole tile, peaky
    dict(S=64, B=5, Hq=16, Hkv=2, pads=[0, 1, 30, 63, 10]),  # group 8: two blocks of 4; 64, 63, 34, 1, 54 keys
    dict(S=1200, B=2, Hq=8, Hkv=2, pads=[0, 1000]),  # 2 splits: row 0's items of 2 tiles, row 1's of 100 keys
    dict(S=300, B=2, Hq=28, Hkv=4, window=128, sinks=2, dtype=torch.bfloat16, pads=[0, 100]),  # group 7; window
]


@cuda_test
@pytest.mark.parametrize("direct", [0, 256, 512])
@pytest.mark.parametrize("case", MMA_SHORT_CASES, ids=[f"short{i}" for i in range(len(MMA_SHORT_CASES))])
def test_decode_mma_short_items(case, direct, monkeypatch):
    monkeypatch.setattr(ops, "DECODE_KERNEL", "tensor-core")
    monkeypatch.setattr(ops, "MMA_DIRECT_MAX", direct)
    query, view, mask, scaling = make_case(Q=1, **case)
    out = run_attention(query, view, mask, scaling)
    assert ops.KERNEL_USED["attention"] == "decode-mma-gqa"
    assert_within_2x(out, query, view, mask, scaling)


# Few blocks, many items each (ops.MMA_MAX_BLOCKS): the kv head changes inside a block (key tables reloaded), the
# next item's loads overlap the current epilogue, GQA blocks reuse their fp32 scratch, splits of one row land in
# different blocks.
MMA_MULTI_ITEM_CASES = [
    (3, dict(S=1100, B=5, Hq=4, Hkv=4, pads=[0, 5, 600, 1098, 300])),  # 2 splits: 40 items, one row with 2 keys
    (3, dict(S=900, B=4, Hq=3, Hkv=3, dtype=torch.bfloat16, pads=[0, 899, 0, 450])),  # no split: 12 items
    (4, dict(S=1500, B=3, Hq=8, Hkv=2, dtype=torch.bfloat16, pads=[0, 700, 1])),  # group 4: 2 heads per kv head
    (5, dict(S=900, B=4, Hq=12, Hkv=4, gaps=True)),  # group 3, irregular positions
    (2, dict(S=2100, B=2, Hq=4, Hkv=2, qscale=8.0, pads=[1000, 0])),  # group 2, peaky: rescales; 3 splits
    (7, dict(S=600, B=3, Hq=10, Hkv=2, pads=[0, 13, 300])),  # group 5: 3 + 3 heads, one of them in both
    (3, dict(S=1300, B=3, Hq=14, Hkv=2, dtype=torch.bfloat16, pads=[0, 1290, 40])),  # group 7: 4 + 4
    (3, dict(S=1500, B=3, Hq=8, Hkv=2, window=128, sinks=2, pads=[0, 1400, 7])),  # window and sinks
    (3, dict(S=1100, B=5, Hq=4, Hkv=4, pads=[0, 5, 600, 1098, 300], **C4)),  # c = 4: tables reloaded per kv head
    (4, dict(S=900, B=3, Hq=3, Hkv=3, gaps=True, dtype=torch.bfloat16, pads=[0, 899, 0], **C4)),  # irregular
    (3, dict(S=1300, B=3, Hq=6, Hkv=2, pads=[0, 1290, 40], **C4)),  # c = 4, group 3: overlapping blocks of 2
    # GQA: short items (P.V straight from the codes, ops.MMA_DIRECT_MAX) and histogram items in the same blocks
    (3, dict(S=700, B=5, Hq=8, Hkv=2, pads=[0, 600, 650, 699, 300])),  # group 4: 700, 100, 50, 1 and 400 keys
    (3, dict(S=900, B=4, Hq=6, Hkv=2, dtype=torch.bfloat16, pads=[0, 800, 899, 500], gaps=True)),  # group 3
    # only short items: a block's items change kv head (its value table copied again for the next item)
    (3, dict(S=400, B=3, Hq=8, Hkv=4, dtype=torch.bfloat16, pads=[0, 100, 399])),  # group 2: 4 items per block
]


def check_multi_item(blocks, case, kernel, name, monkeypatch):
    monkeypatch.setattr(ops, "DECODE_KERNEL", kernel)
    query, view, mask, scaling = make_case(Q=1, **case)
    monkeypatch.setattr(ops, "MMA_MAX_BLOCKS", 0)
    out_one = run_attention(query, view, mask, scaling)
    monkeypatch.setattr(ops, "MMA_MAX_BLOCKS", blocks)
    out = run_attention(query, view, mask, scaling)
    assert ops.KERNEL_USED["attention"] == name
    assert_within_2x(out, query, view, mask, scaling)
    # the same items in fewer blocks: the same sums in the same order
    assert torch.equal(out, out_one)


@cuda_test
@pytest.mark.parametrize("kernel", ["tensor-core", "tensor-core-16w", "tensor-core-per-head"])
@pytest.mark.parametrize("blocks,case", MMA_MULTI_ITEM_CASES, ids=[f"multi{i}" for i in range(len(MMA_MULTI_ITEM_CASES))])
def test_decode_mma_multi_item_blocks(blocks, case, kernel, monkeypatch):
    monkeypatch.setattr(ops, "MMA_LONG_MIN", 1 << 30)
    check_multi_item(blocks, case, kernel, mma_name(kernel, case), monkeypatch)


MHA_C8_MULTI = [bc for bc in MMA_MULTI_ITEM_CASES if bc[1]["Hq"] == bc[1]["Hkv"] and "kspec" not in bc[1]]


@cuda_test
@pytest.mark.parametrize("blocks,case", MHA_C8_MULTI, ids=[f"long-multi{i}" for i in range(len(MHA_C8_MULTI))])
def test_decode_mma_long_multi_item_blocks(blocks, case, monkeypatch):
    monkeypatch.setattr(ops, "MMA_LONG_MIN", 0)  # the CQ-8c8b MHA block's LONG build
    check_multi_item(blocks, case, "tensor-core", "decode-mma-long", monkeypatch)


@cuda_test
def test_decode_kernel_choice(monkeypatch):
    """Both decode kernels agree; cases the tensor-core kernel does not cover fall back to the CUDA-core one."""
    query, view, mask, scaling = make_case(S=2000, Q=1, B=2, Hq=2, Hkv=2, dtype=torch.bfloat16, pads=[0, 77])
    monkeypatch.setattr(ops, "DECODE_KERNEL", "cuda-core")
    out_cc = run_attention(query, view, mask, scaling)
    assert ops.KERNEL_USED["attention"] == "decode"
    monkeypatch.setattr(ops, "DECODE_KERNEL", "tensor-core")
    out_mma = run_attention(query, view, mask, scaling)
    assert ops.KERNEL_USED["attention"] == "decode-mma"
    assert rel_err(out_mma, out_cc) < 2e-2
    monkeypatch.setattr(ops, "DECODE_KERNEL", "tensor-core-16w")
    out_16 = run_attention(query, view, mask, scaling)
    assert ops.KERNEL_USED["attention"] == "decode-mma16"
    assert rel_err(out_16, out_cc) < 2e-2
    query, view, mask, scaling = make_case(S=300, Q=1, B=1, Hq=4, Hkv=2, D=64)  # head_dim 64: not covered
    assert_within_2x(run_attention(query, view, mask, scaling), query, view, mask, scaling)
    assert ops.KERNEL_USED["attention"] == "decode"
    monkeypatch.setattr(ops, "DECODE_KERNEL", "fast")
    with pytest.raises(ValueError, match="tensor-core"):
        ops.cq_attention(query, view, mask, scaling)


# ---------------------------------------------------------------- prefill attention

PREFILL_CASES = [
    dict(S=100, Q=100, B=2, Hq=4, Hkv=4, pads=[0, 37]),
    dict(S=300, Q=83, B=1, Hq=8, Hkv=2, dtype=torch.bfloat16, mask_none=True),
    dict(S=257, Q=257, B=2, Hq=6, Hkv=2, D=64, kspec=(4, 8), vspec=(2, 6), pads=[11, 0]),
    dict(S=70, Q=17, B=1, Hq=24, Hkv=3, kspec=(16, 12), vspec=(1, 4), dtype=torch.bfloat16),
    dict(S=130, Q=130, B=1, Hq=2, Hkv=2, kspec=(8, 10), vspec=(8, 8), rope_scale=1.3, gaps=True),
    dict(S=2048, Q=1024, B=1, Hq=4, Hkv=1, dtype=torch.bfloat16),
    # window/sinks with many queries: "sdpa" appends the full-precision keys and masks per source; the fused prefill
    # kernel takes neither, so "tensor-core" runs the decode kernel in query chunks
    dict(S=120, Q=120, B=2, Hq=4, Hkv=2, window=16, sinks=4, pads=[0, 13]),
    dict(S=90, Q=40, B=1, Hq=8, Hkv=2, window=7, dtype=torch.bfloat16),
    dict(S=300, Q=100, B=2, Hq=8, Hkv=2, window=64, sinks=3, pads=[0, 150], dtype=torch.bfloat16),  # a kept window
    dict(S=200, Q=200, B=1, Hq=4, Hkv=4, sinks=5),  # sinks only
    dict(S=64, Q=40, B=2, Hq=4, Hkv=2, window=128, sinks=2, pads=[0, 10]),  # a window longer than the context
]


@cuda_test
@pytest.mark.parametrize("kernel", ops.PREFILL_KERNELS)
@pytest.mark.parametrize("case", PREFILL_CASES, ids=[f"case{i}" for i in range(len(PREFILL_CASES))])
def test_prefill_attention(case, kernel, monkeypatch):
    monkeypatch.setattr(ops, "PREFILL_KERNEL", kernel)
    query, view, mask, scaling = make_case(**case)
    out = run_attention(query, view, mask, scaling)
    fp = case.get("window") or case.get("sinks")
    assert ops.KERNEL_USED["attention"] == {"sdpa": "dequant+sdpa", "tensor-core": "decode" if fp else "prefill"}[kernel]
    assert_within_2x(out, query, view, mask, scaling)


class _TorchDequant:
    """Stands in for the extension's dequant on CPU: the reference dequantization and RoPE, in the centroids' dtype."""

    def dequant(self, k_codes, v_codes, k_cent, v_cent, k_bits, v_bits, cos, sin, S):
        D = k_cent.shape[1] * k_cent.shape[3]
        k = quant.decode(quant.unpack(k_codes[:, :, :S], k_bits, k_cent.shape[1]), k_cent, torch.float32)
        v = quant.decode(quant.unpack(v_codes[:, :, :S], v_bits, v_cent.shape[1]), v_cent, torch.float32)
        assert k.shape[-1] == D
        return quant.apply_rope(k, cos, sin).to(k_cent.dtype), v.to(v_cent.dtype)


@pytest.mark.parametrize("case", [c for c in PREFILL_CASES if c.get("window") or c.get("sinks")],
                         ids=lambda c: f"S{c['S']}Q{c['Q']}w{c.get('window', 0)}s{c.get('sinks', 0)}")
def test_prefill_sdpa_full_precision_mask_cpu(case):
    """The SDPA prefill with a window / sinks (full-precision keys appended, one mask choosing each key's source)
    equals the reference path; on CPU in fp32, the kernel's dequantization replaced by PyTorch's."""
    from cqtool.attention import attend_codes_reference

    query, view, mask, scaling = make_case(**dict(case, dtype=torch.float32), dev="cpu")
    cos, sin = view.layer.parent.cos_sin(view.length, "cpu")
    out = ops._prefill_sdpa(_TorchDequant(), query, view, mask, scaling, cos, sin)
    ref = attend_codes_reference(query, view, mask, scaling)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, atol=2e-5, rtol=1e-4), (out - ref).abs().max()


@cuda_test
@pytest.mark.parametrize("D,kspec,vspec,dtype", [(128, (8, 8), (8, 8), torch.bfloat16), (64, (1, 4), (16, 12), torch.float16),
                                                 (128, (2, 5), (4, 7), torch.float16)])
def test_dequant_kernel(D, kspec, vspec, dtype):
    """Dense keys/values from the kernel equal the reference dequantization + RoPE (fp32), rounded once."""
    query, view, mask, scaling = make_case(S=333, Q=1, B=2, Hq=2, Hkv=2, D=D, kspec=kspec, vspec=vspec, dtype=dtype,
                                           pads=[0, 50])
    layer, cache = view.layer, view.layer.parent
    S = view.length
    cos, sin = cache.cos_sin(S, "cuda")
    k, v = ops.get_module().dequant(layer.k_codes, layer.v_codes, layer.k_centroids, layer.v_centroids,
                                    int(layer.k_bits), int(layer.v_bits), cos, sin, S)
    k_codes, v_codes = layer.valid_codes()
    kr = quant.apply_rope(quant.decode(quant.unpack(k_codes, layer.k_bits, layer.k_groups), layer.k_centroids,
                                       torch.float32), cos, sin)
    vr = quant.decode(quant.unpack(v_codes, layer.v_bits, layer.v_groups), layer.v_centroids, torch.float32)
    assert k.dtype == dtype and k.shape == kr.shape and v.shape == vr.shape
    assert torch.equal(v, vr.to(dtype))
    assert rel_err(k, kr) <= 2 * rel_err(kr.to(dtype), kr) + 1e-7


# ---------------------------------------------------------------- end to end


@cuda_test
@pytest.mark.parametrize("window,sinks", [(0, 0), (6, 2)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_model_logits_kernels_vs_reference(monkeypatch, window, sinks, dtype):
    """A tiny Llama (head_dim 64, GQA 2) through CQCache: prefill then decode steps, kernels vs reference.

    A wiring check (positions, masks, cache updates): a wiring error gives O(1) differences. The weights are scaled
    up (peaky attention), so rounding keys to the dtype in the tensor-core prefill moves logits by a few percent.
    """
    from conftest import tiny_model
    from test_codebook import make_codebook

    from cqtool.cache import CQCache
    from cqtool.config import QuantSpec
    from cqtool.models import ModelInfo

    model = tiny_model("llama", heads=4, kv_heads=2, head_dim=64).to("cuda", dtype)
    cb = make_codebook(ModelInfo.from_config(model.config, "tiny"), QuantSpec(8, 8))
    ids = torch.randint(0, 512, (2, 40), device="cuda")

    def run():
        cache = CQCache(model, cb, window=window, sinks=sinks)
        with torch.no_grad():
            out = [model(ids[:, :30], **{cache_kwarg(model): cache}, use_cache=True).logits]
            for t in range(30, 40):
                out.append(model(ids[:, t : t + 1], **{cache_kwarg(model): cache}, use_cache=True).logits)
        return torch.cat(out, 1).float()

    got = run()
    assert ops.BACKEND_USED["attention"] == "cuda" and ops.BACKEND_USED["encode"] == "cuda"
    monkeypatch.setattr(ops, "get_module", lambda: None)
    ref = run()
    assert ops.BACKEND_USED["attention"] == "reference"
    assert rel_err(got, ref) < (0.1 if dtype == torch.bfloat16 else 0.05)


@cuda_test
@pytest.mark.parametrize("family,heads,kv_heads,window,sinks,c", [
    ("llama", 4, 4, 0, 0, 8), ("llama", 8, 2, 0, 0, 8), ("llama", 4, 4, 64, 4, 8), ("llama", 8, 2, 128, 0, 8),
    ("qwen2", 14, 2, 0, 0, 8), ("qwen2", 10, 2, 32, 2, 8),
    ("llama", 4, 4, 0, 0, 4), ("llama", 8, 2, 64, 4, 4), ("qwen2", 14, 2, 0, 0, 4)])  # CQ-4c8b
def test_model_tensor_core_decode_vs_reference(monkeypatch, family, heads, kv_heads, window, sinks, c):
    """A tiny Llama (or Qwen2) with head_dim 128 and CQ-8c8b (MHA; GQA groups of 4, and of 7 and 5, whose blocks of
    4 and 3 heads overlap; with a full-precision window and sinks) or CQ-4c8b (MHA; GQA in blocks of 2 heads, 7 =
    2 + 2 + 2 + 2 overlapping): decode steps through the tensor-core kernel (forced: the context is short) against the
    reference path."""
    from conftest import tiny_model
    from test_codebook import make_codebook

    from cqtool.cache import CQCache
    from cqtool.config import QuantSpec
    from cqtool.models import ModelInfo

    monkeypatch.setattr(ops, "DECODE_KERNEL", "tensor-core")
    model = tiny_model(family, heads=heads, kv_heads=kv_heads, head_dim=128).to("cuda", torch.bfloat16)
    cb = make_codebook(ModelInfo.from_config(model.config, "tiny"), QuantSpec(c, 8))
    ids = torch.randint(0, 512, (2, 600), device="cuda")

    def run():
        cache = CQCache(model, cb, window=window, sinks=sinks)
        seen = set()
        with torch.no_grad():
            out = [model(ids[:, :590], **{cache_kwarg(model): cache}, use_cache=True).logits[:, -1:]]
            for t in range(590, 600):
                out.append(model(ids[:, t : t + 1], **{cache_kwarg(model): cache}, use_cache=True).logits)
                seen.add(ops.KERNEL_USED.get("attention"))
        return torch.cat(out, 1).float(), seen

    got, seen = run()
    assert seen == {"decode-mma" if heads == kv_heads else "decode-mma-gqa"}
    monkeypatch.setattr(ops, "get_module", lambda: None)
    ref, _ = run()
    assert ops.BACKEND_USED["attention"] == "reference"
    assert rel_err(got, ref) < 0.1


# ---------------------------------------------------------------- CPU: fallback is announced


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_kernel_status_on_cpu_says_why():
    st = ops.kernel_status()
    assert st["available"] is False
    assert "CUDA" in st["reason"]
    assert ops.get_module() is None


def test_cpu_fallback_is_announced(monkeypatch, caplog):
    from conftest import tiny_model
    from test_codebook import make_codebook

    from cqtool.cache import CQCache
    from cqtool.models import ModelInfo

    monkeypatch.setattr(ops, "_ANNOUNCED", set())
    model = tiny_model("llama")
    cb = make_codebook(ModelInfo.from_config(model.config, "tiny"))
    with caplog.at_level(logging.WARNING, logger="cqtool"), torch.no_grad():
        model(torch.randint(0, 512, (1, 9)), **{cache_kwarg(model): CQCache(model, cb)}, use_cache=True)
    text = caplog.text
    assert "attention runs on the reference path (tensors on CPU)" in text
    assert "encode runs on the reference path (tensors on CPU)" in text
    assert ops.BACKEND_USED["attention"] == "reference"
    # announced once per reason, not once per layer or step
    assert text.count("attention runs on the reference path") == 1


@cuda_test
@pytest.mark.parametrize("B,H,Q,D,c,b,start,dtype", ENCODE_CASES + [
    (600, 4, 1, 128, 8, 8, 2, torch.bfloat16),   # a decode step at a large batch: 600 rows of one token
    (3, 2, 700, 128, 8, 10, 0, torch.float16),   # CQ-8c10b, rows of several sequences in one block
    (2, 3, 300, 64, 2, 8, 1, torch.bfloat16),    # CQ-2c8b, head_dim 64
])
def test_encode_tiled_equals_row_kernel(B, H, Q, D, c, b, start, dtype, monkeypatch):
    """The tiled encode kernel (many rows) writes exactly the row kernel's codes, and nothing outside the new rows;
    where it does not apply (K (c + 1) above 12288 floats: c = 16 with 12 bits) both runs take the row kernel. The
    tensor-core kernel (ENCODE_MMA): codes a near-tie may flip, never to a centroid farther beyond fp32 rounding."""
    torch.manual_seed(5)
    x = torch.randn(B, Q, H, D, device="cuda").to(dtype).transpose(1, 2)
    cent = torch.randn(H, D // c, 2**b, c, device="cuda").to(dtype)
    x[0, 0, 0, :c] = cent[0, 0, 3]  # exact ties: a token equal to a centroid, and that centroid twice
    cent[0, 0, 7] = cent[0, 0, 3]
    R = quant.row_bytes(D // c, b)
    cap = start + Q + 3
    base = torch.randint(0, 256, (B, H, cap, R), device="cuda", dtype=torch.uint8)
    out = {}
    for name, tmin, mma in (("row", 0, False), ("tiled", 1, False), ("mma", 1, True)):
        monkeypatch.setattr(ops, "ENCODE_TILED_MIN", tmin)
        monkeypatch.setattr(ops, "ENCODE_MMA", mma)
        codes = base.clone()
        ops.encode_into(x, cent, b, codes, start)
        out[name] = codes
    torch.cuda.synchronize()
    assert ops.BACKEND_USED["encode"] == "cuda"
    assert torch.equal(out["tiled"], out["row"])
    for name in ("tiled", "mma"):
        assert torch.equal(out[name][:, :, :start], base[:, :, :start])
        assert torch.equal(out[name][:, :, start + Q :], base[:, :, start + Q :])
        assert quant.unpack(out[name][:1, :1, start : start + 1], b, D // c)[0, 0, 0, 0] == 3  # the tie: lowest index
    # tensor cores: where the codes differ from the row kernel's, the chosen centroid is as near (fp64) up to rounding
    G = D // c
    row_c = quant.unpack(out["row"][:, :, start : start + Q], b, G)
    mma_c = quant.unpack(out["mma"][:, :, start : start + Q], b, G)
    assert torch.equal(quant.pack(mma_c, b), out["mma"][:, :, start : start + Q])
    xs, cg = x.double().reshape(B, H, Q, G, c), cent.double()

    def dist(codes_):
        sel = torch.stack([cg[h][torch.arange(G, device="cuda"), codes_[:, h]] for h in range(H)], 1)
        return ((xs - sel) ** 2).sum(-1)

    d_row, d_mma = dist(row_c), dist(mma_c)
    assert (d_mma <= d_row + 1e-3 * (1 + d_row)).all()
    assert (row_c == mma_c).float().mean() > 0.99


@cuda_test
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("c,b", [(8, 8), (4, 8), (16, 12), (1, 4)])
def test_encode_into_device_rows(c, b, dtype):
    """Static decoding: each new token's codes go to the row a device array names (here out of order, the last row of
    the buffer among them); every other row stays as it was, and the codes equal the contiguous kernel's."""
    torch.manual_seed(1)
    B, H, Q, D, cap = 3, 5, 4, 128, 37
    x = torch.randn(B, Q, H, D, device="cuda").to(dtype).transpose(1, 2)
    cent = torch.randn(H, D // c, 2**b, c, device="cuda").to(dtype)
    R = quant.row_bytes(D // c, b)
    codes = torch.randint(0, 256, (B, H, cap, R), device="cuda", dtype=torch.uint8)
    before = codes.clone()
    rows = torch.tensor([36, 3, 17, 4], device="cuda")
    ops.encode_into(x, cent, b, codes, 0, rows=rows)
    want = torch.zeros(B, H, Q, R, device="cuda", dtype=torch.uint8)
    ops.encode_into(x, cent, b, want, 0)
    torch.cuda.synchronize()
    assert ops.BACKEND_USED["encode"] == "cuda"
    assert torch.equal(codes[:, :, rows], want)
    others = torch.ones(cap, dtype=torch.bool, device="cuda")
    others[rows] = False
    assert torch.equal(codes[:, :, others], before[:, :, others])


@cuda_test
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,H,Q,D,kc,kb,vc,vb,start,static", [
    (1, 32, 1, 128, 8, 8, 8, 8, 5, False),     # a decode step of CQ-8c8b, Llama-2-7b's heads
    (3, 5, 17, 128, 4, 8, 4, 6, 2, False),     # values with fewer bits than keys
    (2, 3, 1, 64, 16, 12, 16, 10, 0, True),    # fewer groups than one chunk, device rows
    (1, 2, 4097, 128, 1, 4, 1, 7, 1, False),   # 16 chunks per row, bytes not aligned to groups
    (2, 4, 3, 128, 8, 8, 4, 8, 9, True),       # different c: two launches, device rows
])
def test_encode_kv_into_equals_two_encodes(B, H, Q, D, kc, kb, vc, vb, start, static, dtype, monkeypatch):
    """A layer's keys and values in one launch (same c) write exactly the codes two encode_into calls write, and
    nothing else; with a different c for the values it is the two calls."""
    torch.manual_seed(3)
    k = torch.randn(B, Q, H, D, device="cuda").to(dtype).transpose(1, 2)
    v = torch.randn(B, H, Q, D, device="cuda").to(dtype)
    kcent = torch.randn(H, D // kc, 2**kb, kc, device="cuda").to(dtype)
    vcent = torch.randn(H, D // vc, 2**vb, vc, device="cuda").to(dtype)
    cap = start + Q + 6
    kcodes = torch.randint(0, 256, (B, H, cap, quant.row_bytes(D // kc, kb)), device="cuda", dtype=torch.uint8)
    vcodes = torch.randint(0, 256, (B, H, cap, quant.row_bytes(D // vc, vb)), device="cuda", dtype=torch.uint8)
    rows = torch.arange(start + Q - 1, start - 1, -1, device="cuda") if static else None  # reversed order
    k0, v0 = kcodes.clone(), vcodes.clone()
    # the row kernel, the tiled one, the tensor-core one (where they apply), the default rule
    for tmin, mma in ((0, False), (1, False), (1, True), (ops.ENCODE_TILED_MIN, ops.ENCODE_MMA)):
        monkeypatch.setattr(ops, "ENCODE_TILED_MIN", tmin)
        monkeypatch.setattr(ops, "ENCODE_MMA", mma)
        kwant, vwant = k0.clone(), v0.clone()
        ops.encode_into(k, kcent, kb, kwant, 0 if static else start, rows=rows)
        ops.encode_into(v, vcent, vb, vwant, 0 if static else start, rows=rows)
        kcodes, vcodes = k0.clone(), v0.clone()
        ops.encode_kv_into(k, kcent, kb, kcodes, v, vcent, vb, vcodes, 0 if static else start, rows=rows)
        torch.cuda.synchronize()
        assert ops.BACKEND_USED["encode"] == "cuda", ops.kernel_status()
        assert torch.equal(kcodes, kwant) and torch.equal(vcodes, vwant), (tmin, mma)


@cuda_test
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,H,Q,D,c,bits,W,aligned", [
    (1, 32, 1, 128, 8, 8, 128, True),     # a batch-1 decode step of CQ-8c8b, Llama-2-7b's heads, window 128
    (3, 5, 1, 64, 4, 8, 7, True),         # head_dim 64, an odd window
    (2, 3, 2, 128, 16, 12, 3, True),      # two tokens a step
    (70, 4, 1, 128, 8, 8, 16, True),      # 70 rows: the tiled and tensor-core kernels' grids carry the copies
    (2, 3, 3, 24, 8, 6, 5, False),        # 24 channels, rows not 16-byte aligned: 2-byte copies
])
def test_encode_kv_ring_in_the_launch(B, H, Q, D, c, bits, W, aligned, dtype, monkeypatch):
    """Static decoding's window ring written by the encode launch (kernels/encode.cu ring_copy): the codes are those of
    the launch without the ring, the ring rows what index_copy_ writes, every other row untouched; under each encode
    kernel."""
    torch.manual_seed(5)
    k = torch.randn(B, H, Q, D, device="cuda").to(dtype)
    v = torch.randn(B, Q, H, D, device="cuda").to(dtype).transpose(1, 2)
    kf = torch.randn(B, H, Q, D, device="cuda").to(dtype)  # the keys after RoPE
    if aligned:
        wk0 = torch.randn(B, H, W, D, device="cuda").to(dtype)
        wv0 = torch.randn(B, H, W, D, device="cuda").to(dtype)
    else:  # windows whose rows start 2 bytes into 16-byte words
        wk0 = torch.randn(B, H, W, D + 1, device="cuda").to(dtype)[..., 1:]
        wv0 = torch.randn(B, H, W, D + 1, device="cuda").to(dtype)[..., 1:]
    kcent = torch.randn(H, D // c, 2**bits, c, device="cuda").to(dtype)
    vcent = torch.randn(H, D // c, 2**bits, c, device="cuda").to(dtype)
    cap = Q + 9
    k0 = torch.randint(0, 256, (B, H, cap, quant.row_bytes(D // c, bits)), device="cuda", dtype=torch.uint8)
    v0 = k0.clone()
    rows = torch.arange(4, 4 + Q, device="cuda")
    slots = (W - 1 - torch.arange(Q, device="cuda")) % W  # distinct rows, the last one first
    kinds = set()
    for tmin, mma in ((0, False), (1, False), (1, True), (ops.ENCODE_TILED_MIN, ops.ENCODE_MMA)):
        monkeypatch.setattr(ops, "ENCODE_TILED_MIN", tmin)
        monkeypatch.setattr(ops, "ENCODE_MMA", mma)
        kwant, vwant = k0.clone(), v0.clone()
        ops.encode_kv_into(k, kcent, bits, kwant, v, vcent, bits, vwant, 0, rows=rows)
        wkwant, wvwant = wk0.clone(), wv0.clone()
        wkwant.index_copy_(2, slots, kf)
        wvwant.index_copy_(2, slots, v)
        for in_launch in (True, False):  # CQTOOL_RING_IN_ENCODE=0: the same result by index_copy_
            monkeypatch.setattr(ops, "RING_IN_ENCODE", in_launch)
            kc, vc, wk, wv = k0.clone(), v0.clone(), wk0.clone(), wv0.clone()
            ops.encode_kv_into(k, kcent, bits, kc, v, vcent, bits, vc, 0, rows=rows, ring=(kf, v, wk, wv, slots))
            torch.cuda.synchronize()
            assert ops.KERNEL_USED["ring"] == ("encode launch" if in_launch else "index_copy_"), ops.kernel_status()
            kinds.add(ops.KERNEL_USED["encode"])
            assert torch.equal(kc, kwant) and torch.equal(vc, vwant), (tmin, mma, in_launch)
            assert torch.equal(wk, wkwant) and torch.equal(wv, wvwant), (tmin, mma, in_launch)
    assert "encode-row" in kinds, kinds
    if (1 << bits) * (c + 1) <= ops.ENCODE_TILED_MAX_FLOATS:  # the tiled kernel's table fits: it (or mma) ran too
        assert kinds & {"encode-tiled", "encode-mma"}, kinds


def test_encode_kv_ring_reference_and_errors():
    """On the CPU (reference path) the ring rows are written by index_copy_ and said so; a ring without device-side
    rows is refused."""
    torch.manual_seed(6)
    B, H, Q, D, W = 2, 3, 1, 16, 4
    k, v, kf = (torch.randn(B, H, Q, D) for _ in range(3))
    cent = torch.randn(H, D // 4, 16, 4)
    kc = torch.zeros(B, H, 5, quant.row_bytes(D // 4, 4), dtype=torch.uint8)
    vc = kc.clone()
    wk, wv = torch.zeros(B, H, W, D), torch.zeros(B, H, W, D)
    slots = torch.tensor([2])
    ops.encode_kv_into(k, cent, 4, kc, v, cent, 4, vc, 0, rows=torch.tensor([3]), ring=(kf, v, wk, wv, slots))
    assert ops.KERNEL_USED["ring"] == "index_copy_"
    assert torch.equal(wk[:, :, 2], kf[:, :, 0]) and torch.equal(wv[:, :, 2], v[:, :, 0])
    assert not wk[:, :, [0, 1, 3]].any() and not wv[:, :, [0, 1, 3]].any()
    assert torch.equal(kc[:, :, 3], quant.pack(quant.encode(k, cent), 4)[:, :, 0])
    with pytest.raises(ValueError, match="device-side rows"):
        ops.encode_kv_into(k, cent, 4, kc, v, cent, 4, vc, 0, ring=(kf, v, wk, wv, slots))


@cuda_test
@pytest.mark.parametrize("rows,c,bits,tmin,mma", [(1, 8, 8, 64, True), (63, 8, 8, 64, True), (64, 8, 8, 64, True),
                                                 (64, 8, 8, 64, False), (600, 4, 8, 64, True), (600, 16, 10, 64, True),
                                                 (600, 16, 12, 64, True),
                                                 (600, 16, 11, 64, False), (600, 8, 8, 0, True), (5, 8, 10, 1, True),
                                                 (70, 2, 2, 1, True)])
def test_encode_kernel_name_is_the_kernel_that_ran(rows, c, bits, tmin, mma, monkeypatch):
    """ops.KERNEL_USED["encode"] (the Python copy of launch_t's rule) names the kernel the profiler saw run."""
    monkeypatch.setattr(ops, "ENCODE_TILED_MIN", tmin)
    monkeypatch.setattr(ops, "ENCODE_MMA", mma)
    H, D = 2, 128
    x = torch.randn(rows, H, 1, D, device="cuda", dtype=torch.bfloat16)
    cent = torch.randn(H, D // c, 2**bits, c, device="cuda", dtype=torch.bfloat16)
    codes = torch.zeros(rows, H, 2, quant.row_bytes(D // c, bits), dtype=torch.uint8, device="cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ops.encode_kv_into(x, cent, bits, codes, x.clone(), cent, bits, codes.clone(), 1)
        torch.cuda.synchronize()
    names = [e.key for e in prof.key_averages() if "encode" in e.key]
    seen = {"encode-mma" if "encode_mma_kernel" in n else "encode-tiled" if "encode_tiled_kernel" in n else "encode-row"
            for n in names}
    assert seen == {ops.KERNEL_USED["encode"]}, (names, ops.KERNEL_USED)
    many = tmin and rows >= tmin
    want = ("encode-mma" if many and mma and c >= 8 and 3 <= bits <= 10 else
            "encode-tiled" if many and (1 << bits) * (c + 1) <= 12288 else "encode-row")
    assert ops.KERNEL_USED["encode"] == want


@cuda_test
def test_bench_encode_runs():
    from cqtool.bench_kernels import encode_bench

    res = encode_bench(((3, 1), (70, 1), (2, 40)), ("8c8b", "16c12b"), heads=4, head_dim=64, reps=3)
    assert len(res["rows"]) == 6
    for r in res["rows"]:
        assert r["kernels_same_codes"] and r["agree_with_reference"] > 0.99
        assert r["cq_ms"] > 0 and r["reference_ms"] > 0
        assert r["mma_agree_with_row"] > 0.99
        want = "encode-mma" if r["rows"] >= 64 and r["quant"] == "CQ-8c8b" else "encode-row"
        assert r["cq_kernel"] == want, r
    assert (ops.ENCODE_TILED_MIN, ops.ENCODE_MMA) == (res["encode_tiled_min"], res["encode_mma"])  # restored


@pytest.mark.parametrize("rows,c,bits,tmin,mma,want", [
    (63, 8, 8, 64, True, "encode-row"), (64, 8, 8, 64, True, "encode-mma"), (64, 8, 8, 64, False, "encode-tiled"),
    (64, 4, 8, 64, True, "encode-tiled"), (64, 16, 10, 64, True, "encode-mma"), (64, 16, 11, 64, True, "encode-row"),
    (64, 8, 11, 64, True, "encode-row"), (64, 4, 11, 64, True, "encode-tiled"), (64, 8, 2, 64, True, "encode-tiled"),
    (10**6, 8, 8, 0, True, "encode-row"),
    (64, 16, 12, 64, False, "encode-row"),
])
def test_encode_kernel_rule(rows, c, bits, tmin, mma, want, monkeypatch):
    """Which encode kernel a launch takes (the rule ops.encode_kernel_name copies from kernels/encode.cu, checked
    against the profiler's kernel names on the GPU): row below ENCODE_TILED_MIN rows; then tensor cores for c >= 8 and
    3 <= bits <= 10, the tiled kernel where 2**bits (c + 1) fp32 fit in 48 KB, else the row kernel."""
    monkeypatch.setattr(ops, "ENCODE_TILED_MIN", tmin)
    monkeypatch.setattr(ops, "ENCODE_MMA", mma)
    assert ops.encode_kernel_name(rows, c, bits) == want


def test_encode_kernel_rule_for_keys_and_values():
    """One launch for K and V takes a kernel only where it applies to both code widths."""
    assert ops.encode_kernel_name(100, 8, 8, 10) == "encode-mma"
    assert ops.encode_kernel_name(100, 8, 8, 11) == "encode-row"    # 11 bits: no tensor cores, 2048 x 9 fp32 > 48 KB
    assert ops.encode_kernel_name(100, 4, 8, 11) == "encode-tiled"  # c = 4: 2048 x 5 fp32 fit
    assert ops.encode_kernel_name(100, 8, 2, 8) == "encode-tiled"   # 2 bits: no full n-tile of 8 centroids


def test_encode_kv_into_cpu_equals_reference():
    torch.manual_seed(4)
    k, v = torch.randn(2, 3, 5, 32), torch.randn(2, 3, 5, 32)
    kcent, vcent = torch.randn(3, 8, 2**5, 4), torch.randn(3, 4, 2**6, 8)
    kcodes = torch.zeros(2, 3, 9, quant.row_bytes(8, 5), dtype=torch.uint8)
    vcodes = torch.zeros(2, 3, 9, quant.row_bytes(4, 6), dtype=torch.uint8)
    ops.encode_kv_into(k, kcent, 5, kcodes, v, vcent, 6, vcodes, 3)
    assert ops.BACKEND_USED["encode"] == "reference"
    assert torch.equal(kcodes[:, :, 3:8], quant.pack(quant.encode(k, kcent), 5))
    assert torch.equal(vcodes[:, :, 3:8], quant.pack(quant.encode(v, vcent), 6))
    assert not kcodes[:, :, :3].any() and not vcodes[:, :, 8:].any()


def test_encode_into_cpu_equals_reference():
    x = torch.randn(2, 3, 5, 32)
    cent = torch.randn(3, 8, 2**5, 4)
    codes = torch.zeros(2, 3, 9, quant.row_bytes(8, 5), dtype=torch.uint8)
    ops.encode_into(x, cent, 5, codes, 2)
    assert torch.equal(codes[:, :, 2:7], quant.pack(quant.encode(x, cent), 5))
    assert not codes[:, :, :2].any() and not codes[:, :, 7:].any()
    rows = torch.tensor([8, 0, 4, 1, 6])  # device rows (static decoding): token t into row rows[t]
    codes2 = torch.zeros_like(codes)
    ops.encode_into(x, cent, 5, codes2, 0, rows=rows)
    assert torch.equal(codes2[:, :, rows], codes[:, :, 2:7]) and not codes2[:, :, [2, 3, 5, 7]].any()


def test_key_ranges_from_padded_mask():
    B, Q, S, start = 2, 3, 8, 5
    pads = torch.tensor([0, 4]).view(B, 1, 1)
    qi = torch.arange(start, start + Q).view(Q, 1)
    kj = torch.arange(S).view(1, S)
    mask = ((kj <= qi).unsqueeze(0) & (kj.unsqueeze(0) >= pads)).unsqueeze(1)
    r = ops.key_ranges(mask, B, Q, S, start, torch.device("cpu"))
    assert r.tolist() == [[[0, 6], [0, 7], [0, 8]], [[4, 6], [4, 7], [4, 8]]]
    r = ops.key_ranges(None, B, Q, S, start, torch.device("cpu"))
    assert r.tolist() == [[[0, 6], [0, 7], [0, 8]]] * 2
    empty = torch.zeros(1, 1, 1, S, dtype=torch.bool)
    assert ops.key_ranges(empty, 1, 1, S, 7, torch.device("cpu")).tolist() == [[[0, 0]]]


def test_positions_follow_the_layer_device():
    """A model spread over devices: layers away from the first read a copy of the cache's positions on their own
    device, made once per step (a step appends, which gives a new tensor), never the first device's."""
    cache = SimpleNamespace(positions=torch.arange(6).view(1, 6))
    assert ops._device_positions(cache, torch.device("cpu")) is cache.positions
    there = ops._device_positions(cache, torch.device("meta"))
    assert there.device.type == "meta" and there.shape == (1, 6)
    assert ops._device_positions(cache, torch.device("meta")) is there
    cache.positions = torch.cat([cache.positions, torch.tensor([[6]])], 1)
    again = ops._device_positions(cache, torch.device("meta"))
    assert again is not there and again.shape == (1, 7)


def test_code_major_rows():
    """The decode kernels' table rows: centroids [H, G, K, c] code-major [H, K, G c], made once per centroid tensors
    and versions; none for more than 8 bits (those tables stay out of shared memory)."""
    g = torch.Generator().manual_seed(0)
    layer = SimpleNamespace(k_centroids=torch.randn(3, 16, 256, 8, generator=g),
                            v_centroids=torch.randn(3, 32, 64, 4, generator=g), k_bits=8, v_bits=6)
    kr, vr = ops.code_major_rows(layer)
    assert kr.shape == (3, 256, 128) and vr.shape == (3, 64, 128) and kr.is_contiguous()
    for h, code, grp in ((0, 0, 0), (2, 255, 15), (1, 77, 9)):
        assert torch.equal(kr[h, code, 8 * grp : 8 * grp + 8], layer.k_centroids[h, grp, code])
    assert torch.equal(vr[1, 63, 4 * 31 :], layer.v_centroids[1, 31, 63])
    assert ops.code_major_rows(layer)[0] is kr  # memoised
    layer.v_centroids.mul_(2)  # written in place: new rows
    kr2, vr2 = ops.code_major_rows(layer)
    assert kr2 is not kr and torch.equal(vr2, vr * 2)
    layer.k_centroids = torch.randn(3, 8, 1024, 16, generator=g)  # a new tensor of 10 bits: no key rows
    layer.k_bits = 10
    kr3, vr3 = ops.code_major_rows(layer)
    assert kr3 is None and torch.equal(vr3, vr2)


def test_nothing_heavy_at_import():
    import subprocess
    import sys

    code = ("import torch, cqtool.ops as o, cqtool.cache, cqtool.attention; "
            "assert o.get_module.cache_info().currsize == 0; assert not torch.cuda.is_initialized()")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- the kernel benchmarks, tiny


@cuda_test
def test_bench_attention_and_prefill_cli(tmp_path):
    import json

    from typer.testing import CliRunner

    from cqtool.cli import app

    r = CliRunner().invoke(app, ["bench", "attention", "--shape", "2x3000", "--spec", "8c8b", "--reps", "3",
                                 "--json", str(tmp_path / "a.json")])
    assert r.exit_code == 0, r.output
    row = json.loads((tmp_path / "a.json").read_text())["rows"][0]
    assert set(row["kernels"]) == set(ops.DECODE_KERNELS)
    assert row["kernels"]["tensor-core-16w"]["ran"] == "decode-mma16"
    assert row["kernels"]["cuda-core"]["ran"] == "decode" and row["kernels"]["dequant-sdpa"]["ran"] == "dequant+sdpa"
    assert all(k["rel_err_vs_sdpa"] < 2e-2 for k in row["kernels"].values())
    # the same calls replayed from CUDA graphs: both timed, the ratio theirs
    assert "graph_error" not in row and row["sdpa_graph_ms"] > 0 and row["cq_graph_ms"] > 0
    assert row["graph_speedup"] == pytest.approx(row["sdpa_graph_ms"] / row["cq_graph_ms"], rel=1e-3)
    assert "as CUDA graphs" in r.output
    # a 128-token window: the last keys come from the dense tensors SDPA reads, so the error stays as small
    r = CliRunner().invoke(app, ["bench", "attention", "--shape", "2x3000", "--spec", "8c8b", "--window", "128",
                                 "--reps", "3", "--json", str(tmp_path / "w.json")])
    assert r.exit_code == 0, r.output
    row = json.loads((tmp_path / "w.json").read_text())["rows"][0]
    assert row["window"] == 128 and row["kernels"]["tensor-core"]["ran"] == "decode-mma"
    assert "graph_error" not in row and row["cq_graph_ms"] > 0  # the full-precision split's second stream captured too
    assert all(k["rel_err_vs_sdpa"] < 2e-2 for k in row["kernels"].values())
    r = CliRunner().invoke(app, ["bench", "attention", "--shape", "2x2000", "--spec", "4c8b", "--heads", "8",
                                 "--kv-heads", "2", "--reps", "3", "--json", str(tmp_path / "g.json")])
    assert r.exit_code == 0, r.output
    row = json.loads((tmp_path / "g.json").read_text())["rows"][0]
    assert row["kv_heads"] == 2 and all(k["rel_err_vs_sdpa"] < 2e-2 for k in row["kernels"].values())
    r = CliRunner().invoke(app, ["bench", "prefill", "--shape", "1x700", "--reps", "3", "--json", str(tmp_path / "p.json")])
    assert r.exit_code == 0, r.output
    row = json.loads((tmp_path / "p.json").read_text())["rows"][0]
    assert row["cq_kernel"] == "dequant+sdpa" and row["kernels"]["tensor-core"]["ran"] == "prefill"
    assert all(k["rel_err_vs_sdpa"] < 2e-2 for k in row["kernels"].values()) and row["dequant_ms"] > 0
    r = CliRunner().invoke(app, ["bench", "encode", "--shape", "2x1", "--shape", "100x1", "--spec", "4c8b", "--heads",
                                 "4", "--reps", "3", "--json", str(tmp_path / "e.json")])
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "e.json").read_text())["rows"]
    assert [x["cq_kernel"] for x in rows] == ["encode-row", "encode-tiled"]  # c = 4: the tiled kernel
    assert all(x["kernels_same_codes"] and x["agree_with_reference"] > 0.99 for x in rows)


@cuda_test
def test_bench_generate_cli_repeats(tmp_path):
    """Paired same-batch runs: the speedup printed and saved is the median of the per-run ratios."""
    import json
    import statistics

    from typer.testing import CliRunner

    from cqtool.cli import app

    r = CliRunner().invoke(app, ["bench", "generate", "--layers", "2", "--batch", "2", "--prompt", "64", "--new-tokens",
                                 "4", "--no-search", "--repeats", "2", "--json", str(tmp_path / "g.json")])
    assert r.exit_code == 0, r.output
    sb = json.loads((tmp_path / "g.json").read_text())["same_batch"]
    assert sb["repeats"] == 2 and len(sb["runs"]) == 2 and len(sb["decode_speedup_runs"]) == 2
    ratios = [x["cq"]["decode_tok_s"] / x["dynamic"]["decode_tok_s"] for x in sb["runs"]]
    assert sb["decode_speedup"] == pytest.approx(statistics.median(ratios), rel=1e-3)
    assert "median of 2 paired runs" in r.output
    # each cache's GPU time per decode step (profiled kernels), beside the wall time
    g = sb["gpu_ms_per_step"]
    assert g["dynamic"] > 0 and g["cq"] > 0 and sb["gpu_time_ratio"] == pytest.approx(g["dynamic"] / g["cq"], rel=1e-3)
    wall_cq = 1e3 * sb["cq"]["batch"] / sb["cq"]["decode_tok_s"]
    assert g["cq"] < wall_cq and "GPU time" in r.output
    # a full-precision window: the CQ cache holds it, so its per-run cache size grows by the window's bytes
    r = CliRunner().invoke(app, ["bench", "generate", "--layers", "2", "--batch", "2", "--prompt", "64", "--new-tokens",
                                 "4", "--no-search", "--repeats", "1", "--window", "16", "--json", str(tmp_path / "w.json")])
    assert r.exit_code == 0, r.output
    w = json.loads((tmp_path / "w.json").read_text())
    assert w["window"] == 16 and "CQ window 16" in r.output
    assert w["same_batch"]["cq"]["cache_gib"] > sb["cq"]["cache_gib"]


def test_decode_kernel_request(monkeypatch):
    """What each DECODE_KERNEL choice asks the extension for (0: CUDA cores, 1/2: tensor cores, 8/16 warps)."""
    monkeypatch.setattr(ops, "DECODE_KERNEL", "auto")
    assert ops._decode_variant(8, 32768) == 1 and ops._decode_variant(1, 4096) == 1  # MHA: every shape
    assert ops._decode_variant(1, 1) == 1 and ops._decode_variant(128, 64) == 1 and ops._decode_variant(1, 64, c=4) == 1
    # MHA with a full-precision window or sinks (one more kernel): from AUTO_MMA_FP_TOKENS cached tokens per batch
    assert ops._decode_variant(1, 512, fp=True) == 0 and ops._decode_variant(1, 4096, fp=True) == 1
    assert ops._decode_variant(8, 512, fp=True) == 1
    # GQA, small batches of short sequences: a block per query head (3); c = 8 up to 8 sequences and 16384 tokens per
    # batch, with a window or without; c = 4 one sequence of up to 4096 tokens
    assert ops._decode_variant(1, 512, group=4) == 3 and ops._decode_variant(1, 16384, group=4) == 3
    assert ops._decode_variant(8, 2048, group=4, fp=True) == 3 and ops._decode_variant(4, 1024, group=7) == 3
    assert ops._decode_variant(1, 16385, group=4) == 1 and ops._decode_variant(9, 512, group=4) == 0
    assert ops._decode_variant(16, 512, group=4) == 1 and ops._decode_variant(2, 16384, group=4) == 1
    assert ops._decode_variant(1, 4096, group=4, c=4) == 3 and ops._decode_variant(1, 4097, group=4, c=4) == 0
    assert ops._decode_variant(2, 512, group=4, c=4) == 0
    # the rules below them, as for larger batches
    monkeypatch.setattr(ops, "AUTO_PER_HEAD_MAX_BATCH", 0)
    monkeypatch.setattr(ops, "AUTO_PER_HEAD_MAX_BATCH_C4", 0)
    assert ops._decode_variant(1, 4096, group=4, fp=True) == 0 and ops._decode_variant(2, 4096, group=4, fp=True) == 1
    assert ops._decode_variant(512, 1000, group=4) == 1 and ops._decode_variant(2, 1000, group=4) == 0  # GQA blocks:
    assert ops._decode_variant(64, 600, group=2) == 1 and ops._decode_variant(32, 600, group=3) == 1  # B * S tokens
    # c = 8 GQA, sequences of one tile (P.V straight from the codes): from batch 16; with a window from 8192 tokens
    # per batch; not c = 4
    assert ops._decode_variant(16, 512, group=4) == 1 and ops._decode_variant(128, 64, group=7) == 1
    assert ops._decode_variant(1, 512, group=4) == 0 and ops._decode_variant(8, 512, group=4) == 0
    assert ops._decode_variant(15, 513, group=4) == 0 and ops._decode_variant(16, 256, group=4, fp=True) == 0
    assert ops._decode_variant(16, 512, group=4, fp=True) == 1 and ops._decode_variant(8, 512, group=4, fp=True) == 0
    assert ops._decode_variant(64, 256, group=4, c=4) == 0
    monkeypatch.setattr(ops, "MMA_DIRECT_MAX", 0)  # without it: AUTO_MMA_MIN_SEQ tokens per sequence too
    assert ops._decode_variant(1, 512, group=4) == 0 and ops._decode_variant(512, 512, group=4) == 1
    assert ops._decode_variant(512, 256, group=4) == 0 and ops._decode_variant(64, 256, group=7) == 0
    assert ops._decode_variant(1, 4096, group=4) == 0 and ops._decode_variant(5, 1000, group=4) == 0
    monkeypatch.setattr(ops, "MMA_DIRECT_MAX", 512)
    assert ops._decode_variant(32, 8192, group=4) == 1 and ops._decode_variant(1, 2048, group=4) == 0  # a group per block
    assert ops._decode_variant(1, 8192, group=4) == 1 and ops._decode_variant(9, 1000, group=4) == 1  # splits of 512
    assert ops._decode_variant(1, 4096, group=4) == 0 and ops._decode_variant(4, 1024, group=4) == 0
    assert ops._decode_variant(32, 8192, group=8) == 1  # two blocks of 4 per kv head
    # CQ-4c8b GQA (blocks of 2 heads): from 65536 tokens per batch of sequences of 8192 and more; MHA as with c = 8
    assert ops._decode_variant(32, 4096, group=4, c=4) == 0 and ops._decode_variant(8, 32768, group=4, c=4) == 1
    assert ops._decode_variant(32, 8192, group=4, c=4) == 1 and ops._decode_variant(1, 8192, group=4, c=4) == 0
    assert ops._decode_variant(1, 32768, group=7, c=4) == 0 and ops._decode_variant(8, 8192, group=7, c=4) == 1
    assert ops._decode_variant(32, 8192, group=1, c=4) == 1
    # groups that 2-4 do not divide: overlapping blocks of R heads, the same rule
    assert ops._decode_variant(32, 8192, group=5) == 1 and ops._decode_variant(3, 600, group=7) == 0
    for choice, v in (("cuda-core", 0), ("tensor-core", 1), ("tensor-core-16w", 2), ("tensor-core-per-head", 3)):
        monkeypatch.setattr(ops, "DECODE_KERNEL", choice)
        assert ops._decode_variant(1, 10) == v and ops._decode_variant(8, 32768, group=4) == v

    # dequant-sdpa: by choice at any shape; under auto for GQA at large batches of very short sequences, no window
    monkeypatch.setattr(ops, "DECODE_KERNEL", "dequant-sdpa")
    assert ops.decode_by_dequant(1, 1) and ops.decode_by_dequant(8, 32768, fp=True)
    monkeypatch.setattr(ops, "DECODE_KERNEL", "auto")
    assert ops.decode_by_dequant(128, 64, group=4, c=4) and ops.decode_by_dequant(512, 16, group=7, c=4)
    assert ops.decode_by_dequant(128, 128, group=4, c=4) and not ops.decode_by_dequant(64, 256, group=4, c=4)
    assert not ops.decode_by_dequant(128, 64, c=4) and not ops.decode_by_dequant(128, 64, group=4, c=4, fp=True)
    assert not ops.decode_by_dequant(8, 64, group=4, c=4) and not ops.decode_by_dequant(128, 129, group=4, c=4)
    assert not ops.decode_by_dequant(128, 64, group=4)  # c = 8: not taken (AUTO_DEQUANT_MAX_SEQ = 0)
    monkeypatch.setattr(ops, "AUTO_DEQUANT_MAX_SEQ", 64)
    assert ops.decode_by_dequant(128, 64, group=4) and not ops.decode_by_dequant(128, 65, group=4)
    monkeypatch.setattr(ops, "AUTO_DEQUANT_MAX_SEQ_C4", 0)
    assert not ops.decode_by_dequant(128, 64, group=4, c=4)
    monkeypatch.setattr(ops, "DECODE_KERNEL", "tensor-core")
    assert not ops.decode_by_dequant(128, 64, group=4)


@cuda_test
def test_generate_runs_on_the_kernels(tmp_path, tokenizer):
    """cqtool generate on a GPU: the CQ cache's encode and attention run on the CUDA kernels, and the output says
    which; the full-precision run beside it decodes too."""
    import json

    from conftest import tiny_model
    from test_codebook import make_codebook
    from typer.testing import CliRunner

    from cqtool.cli import app
    from cqtool.config import QuantSpec
    from cqtool.models import ModelInfo

    model = tiny_model("llama", heads=4, kv_heads=2, head_dim=64, vocab=len(tokenizer))
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    make_codebook(ModelInfo.from_config(model.config, "tiny"), QuantSpec(8, 8)).save(tmp_path / "cb.safetensors")
    r = CliRunner().invoke(app, ["generate", "--model", str(tmp_path / "m"), "--codebook", str(tmp_path / "cb.safetensors"),
                                 "--prompt", "w1 w2 the cat of w7", "--max-new-tokens", "6", "--device", "cuda",
                                 "--dtype", "bfloat16", "--json", str(tmp_path / "g.json")])
    assert r.exit_code == 0, r.output
    cq, fp = json.loads((tmp_path / "g.json").read_text())["runs"]
    assert cq["backends"] == {"encode": "cuda", "attention": "cuda"} and cq["attention_kernels"]
    assert "attention ran on CUDA kernels (" in r.output and cq["new_tokens"] >= 1 and fp["new_tokens"] >= 1
    # --backend reference: the same command without the kernels, and says so
    r = CliRunner().invoke(app, ["generate", "--model", str(tmp_path / "m"), "--codebook", str(tmp_path / "cb.safetensors"),
                                 "--prompt", "w1 w2 the cat of w7", "--max-new-tokens", "6", "--device", "cuda",
                                 "--dtype", "bfloat16", "--backend", "reference", "--no-compare", "--json",
                                 str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    (ref,) = json.loads((tmp_path / "r.json").read_text())["runs"]
    assert ref["attention_kernels"] == [] and ref["backends"]["attention"] == "reference"
    assert "attention ran on the PyTorch reference" in r.output
    # --cuda-graphs: the CQ cache in static mode on the kernels, transformers' StaticCache beside it
    r = CliRunner().invoke(app, ["generate", "--model", str(tmp_path / "m"), "--codebook", str(tmp_path / "cb.safetensors"),
                                 "--prompt", "w1 w2 the cat of w7", "--max-new-tokens", "6", "--device", "cuda",
                                 "--dtype", "bfloat16", "--cuda-graphs", "--json", str(tmp_path / "c.json")])
    assert r.exit_code == 0, r.output
    out = json.loads((tmp_path / "c.json").read_text())
    gq, gfp = out["runs"]
    assert out["cuda_graphs"] and gfp["cache"] == "StaticCache (full precision)" and gq["backends"]["attention"] == "cuda"
    assert 1 <= gq["new_tokens"] <= 6 and gq["graph_replays"] == 3 and "3 decode steps replayed as a CUDA graph" in r.output
