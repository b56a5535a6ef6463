"""INT-b per token and KIVI-style baselines: quantizers, bit accounting, KIVI's decode schedule, and
prefill == token-by-token decoding on a tiny random Llama."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cqtool.models import cache_kwarg
from cqtool import baselines
from cqtool.baselines import (KIVI, FakeQuantCache, IntPerToken, MixedView, attend_mixed, fake_quant, parse_method,
                              quant_channel_over_tokens, quant_per_token, quant_token_over_channels)
from cqtool.config import ConfigError, EvalConfig
from cqtool.methods import FullPrecision


# --- reference: KIVI's decode loop for one head, written out as in jy-yuan/KIVI models/llama_kivi.py ---

def _minmax(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Stored-format min-max quantizer: fp16 zero point and scale."""
    levels = 2**bits - 1
    mn = x.amin(dim, keepdim=True).half().to(x.dtype)
    sc = ((x.amax(dim, keepdim=True) - mn) / levels).half().to(x.dtype)
    sc = torch.where(sc > 0, sc, torch.ones_like(sc))
    return ((x - mn) / sc).round().clamp(0, levels) * sc + mn


def kivi_decode_reference(q, k, v, bits: int, group: int, residual: int) -> torch.Tensor:
    """q, k, v: [T, D] one head -> [T, D]. Keys: residual flushed (per channel, groups of `group` tokens) after
    the attention of the token that makes it `residual` long. Values: the oldest of residual + 1 quantized
    (per token, groups of `group` channels) after each attention."""
    T, D = q.shape
    kq, kf, vq, vf, outs = [], [], [], [], []
    for i in range(T):
        kf.append(k[i])
        p = torch.softmax(torch.stack(kq + kf) @ q[i] * D**-0.5, 0)
        if len(kf) == residual:
            kq += list(_minmax(torch.stack(kf).view(residual // group, group, D), bits, 1).view(residual, D))
            kf = []
        vf.append(v[i])
        outs.append(p @ torch.stack(vq + vf))
        if len(vf) > residual:
            vq.append(_minmax(vf.pop(0).view(D // group, group), bits, -1).view(D))
    return torch.stack(outs)


# --- helpers ---

def tiny_llama(dtype=torch.float32, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, max_position_embeddings=256, initializer_range=0.2)
    return LlamaForCausalLM(cfg).eval().to(dtype)


@torch.no_grad()
def logits_prefill(model, ids, method):
    return model(ids, **{cache_kwarg(model): method.make_cache(model)}, use_cache=True).logits


@torch.no_grad()
def logits_chunks(model, ids, method, sizes):
    """Feed ids in chunks of `sizes` through one cache of `method` (None: transformers' DynamicCache)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config) if method is None else method.make_cache(model)
    out, t = [], 0
    for n in sizes:
        out.append(model(ids[:, t : t + n], **{cache_kwarg(model): cache}, use_cache=True).logits)
        t += n
    assert t == ids.shape[1]
    return torch.cat(out, 1)


# --- quantizers ---

QUANTIZERS = {
    "per_token": lambda x, b: quant_per_token(x, b),
    "channel_over_tokens": lambda x, b: quant_channel_over_tokens(x, b, 16),
    "token_over_channels": lambda x, b: quant_token_over_channels(x, b, 16),
}


@pytest.mark.parametrize("which", list(QUANTIZERS))
def test_quantization_error_drops_as_bits_rise(which):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 32) * torch.linspace(0.1, 4, 32)  # channels of different ranges, as keys have
    errs = [float(((QUANTIZERS[which](x, b) - x).pow(2).mean() / x.pow(2).mean())) for b in range(1, 9)]
    assert all(a > 2.5 * b for a, b in zip(errs, errs[1:])), errs  # ~4x per bit for round-to-nearest
    assert errs[0] > 1e-2 and errs[-1] < 1e-4


def test_quantized_groups_have_at_most_2_to_the_b_levels():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 32, 32)
    per_tok = quant_per_token(x, 2)  # one group: all heads and channels of a token
    assert max(per_tok[0, :, t].unique().numel() for t in range(32)) <= 4
    assert max(per_tok[0, :, t].unique().numel() for t in range(32)) > 2
    keys = quant_channel_over_tokens(x, 1, 8)  # one group: a channel over 8 tokens
    assert all(keys[0, h, g * 8 : g * 8 + 8, c].unique().numel() <= 2 for h in range(2) for g in range(4) for c in range(32))
    vals = quant_token_over_channels(x, 3, 16)
    assert all(vals[0, h, t, g * 16 : g * 16 + 16].unique().numel() <= 8 for h in range(2) for t in range(32) for g in range(2))


def test_key_groups_do_not_look_ahead():
    # a token's quantized key depends only on its own group of tokens: the premise of prefill == decode
    torch.manual_seed(0)
    x = torch.randn(1, 2, 32, 16)
    y = x.clone()
    y[:, :, 24:] *= 100
    assert torch.equal(quant_channel_over_tokens(x, 2, 8)[:, :, :24], quant_channel_over_tokens(y, 2, 8)[:, :, :24])
    assert not torch.equal(quant_channel_over_tokens(x, 2, 8)[:, :, 24:], quant_channel_over_tokens(y, 2, 8)[:, :, 24:] / 100)


def test_fake_quant_keeps_constant_groups_and_dtype():
    x = torch.full((4, 8), 3.0, dtype=torch.bfloat16)
    y = fake_quant(x, 2, -1)
    assert y.dtype == torch.bfloat16 and torch.equal(y, x)


# --- bit accounting ---

def test_bits_accounting():
    L = 2048
    # keys: 2048 = 16 * 128 all quantized at 2 + 32/32 = 3 bits; values: 128 most recent in fp16
    assert parse_method("kivi2").bits_per_channel(L) == pytest.approx((3 + (1920 * 3 + 128 * 16) / 2048) / 2)
    assert parse_method("kivi2").bits_per_channel(L) == pytest.approx(3.40625)
    assert parse_method("kivi4-g32-r128").bits_per_channel(L) == pytest.approx((5 + (1920 * 5 + 128 * 16) / 2048) / 2)
    # one token short of a full key block: 127 keys still in the residual
    assert parse_method("kivi2").bits_per_channel(2047) == pytest.approx(
        ((1920 * 3 + 127 * 16) / 2047 + (1919 * 3 + 128 * 16) / 2047) / 2)
    assert parse_method("kivi2").bits_per_channel(100) == 16.0  # everything inside the residual
    assert parse_method("kivi2-g64-r128").bits_per_channel(1 << 20) == pytest.approx(2.5, abs=1e-3)
    # per-token INT: one fp16 scale and zero point per token over H_kv * D = 3 * 64 channels (SmolLM2-135M)
    assert parse_method("int2", kv_dim=192).bits_per_channel(L) == pytest.approx(2 + 32 / 192)
    assert parse_method("int4-r128", kv_dim=192).bits_per_channel(L) == pytest.approx((1920 * (4 + 32 / 192) + 128 * 16) / 2048)
    assert parse_method("fp16").bits_per_channel(L) == 16.0


def test_int_bits_need_the_model_shape():
    m = parse_method("int2")
    with pytest.raises(ConfigError, match="kv heads x head_dim"):
        m.bits_per_channel(2048)
    m.make_cache(tiny_llama())  # 2 kv heads x 32
    assert m.bits_per_channel(2048) == pytest.approx(2 + 32 / 64)
    with pytest.raises(ConfigError, match="kv_dim=192"):
        parse_method("int2", kv_dim=192).make_cache(tiny_llama())


# --- KIVI's decode schedule, one layer and one head ---

@pytest.mark.parametrize("chunk", [256, 5])
@pytest.mark.parametrize("group,residual", [(4, 8), (8, 8), (2, 16)])
def test_kivi_matches_its_decode_loop(group, residual, chunk, monkeypatch):
    monkeypatch.setattr(baselines, "QUERY_CHUNK", chunk)  # queries per block in attend_mixed
    torch.manual_seed(0)
    T, D = 37, 16
    q, k, v = (torch.randn(T, D, dtype=torch.float64) for _ in range(3))
    ref = kivi_decode_reference(q, k, v, 2, group, residual)
    method = KIVI(2, group, residual)
    as4 = lambda x: x.view(1, 1, -1, D)  # noqa: E731  [B=1, H=1, S, D]

    layer = method.new_layer()  # prefill: every query sees what the decode loop shows it
    view, _ = layer.update(as4(k), as4(v))
    assert isinstance(view, MixedView)
    out = attend_mixed(as4(q), view, None, D**-0.5)  # [1, T, 1, D]
    torch.testing.assert_close(out.view(T, D), ref, rtol=0, atol=1e-12)

    layer, steps = method.new_layer(), []  # token by token: dense tensors
    for i in range(T):
        kk, vv = layer.update(as4(k[i : i + 1]), as4(v[i : i + 1]))
        assert torch.is_tensor(kk)
        steps.append(torch.softmax(kk[0, 0] @ q[i] * D**-0.5, 0) @ vv[0, 0])
    torch.testing.assert_close(torch.stack(steps), ref, rtol=0, atol=1e-12)
    assert layer.key.n == residual * (T // residual) and layer.value.fp.shape[2] == residual


# --- whole model ---

STREAMED = ["int2", "int3-r8", "kivi2-g4-r8", "kivi4-g8-r16", "kivi1-g16-r16"]


@pytest.mark.parametrize("name", STREAMED)
def test_prefill_equals_token_by_token_decoding(name, monkeypatch):
    # fp64 so that no rounding decision flips between the two schedules: the schedules must agree exactly
    monkeypatch.setattr(baselines, "QUERY_CHUNK", 16)  # several query blocks in attend_mixed
    model = tiny_llama(torch.float64)
    ids = torch.randint(0, 97, (2, 45), generator=torch.Generator().manual_seed(1))
    method = parse_method(name)
    pre = logits_prefill(model, ids, method)
    stream = logits_chunks(model, ids, method, [1] * 45)
    chunks = logits_chunks(model, ids, method, [7, 13, 1, 1, 20, 3])
    torch.testing.assert_close(pre, stream, rtol=0, atol=1e-9)
    torch.testing.assert_close(pre, chunks, rtol=0, atol=1e-9)
    with torch.no_grad():
        fp = model(ids).logits
    assert (pre - fp).abs().max() > 1e-2  # the quantization is really seen, so the comparison means something


@pytest.mark.parametrize("name", ["kivi2-g8-r64", "int2-r64", "kivi2"])
def test_window_covering_everything_reproduces_fp16(name):
    model = tiny_llama()
    ids = torch.randint(0, 97, (1, 45), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fp = model(ids).logits
    m = parse_method(name, kv_dim=64)
    assert torch.equal(logits_prefill(model, ids, m), fp)
    sizes = [30] + [1] * 15
    assert torch.equal(logits_chunks(model, ids, m, sizes), logits_chunks(model, ids, None, sizes))
    assert m.bits_per_channel(45) == 16.0


def test_generate_through_the_cache_matches_greedy_decoding():
    model = tiny_llama()
    ids = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(3))
    m = parse_method("kivi2-g4-r8")
    gen = model.generate(ids, **{cache_kwarg(model): m.make_cache(model)}, max_new_tokens=12, do_sample=False,
                         min_new_tokens=12, pad_token_id=0)
    seq = ids
    with torch.no_grad():
        for _ in range(12):  # recompute each step from scratch: prefill with the same streaming semantics
            nxt = logits_prefill(model, seq, m)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(gen, seq)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(dtype):
    model = tiny_llama(dtype)
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(4))
    out = logits_prefill(model, ids, parse_method("kivi2-g4-r8"))
    assert out.dtype == dtype and torch.isfinite(out).all()


# --- names ---

def test_parse_method_names():
    k = parse_method("kivi2")
    assert isinstance(k, KIVI) and (k.bits, k.group, k.residual, k.name) == (2, 32, 128, "kivi2")
    assert parse_method("KIVI2-g32-r128").name == "kivi2"
    k = parse_method("kivi4-r64-g16")
    assert (k.bits, k.group, k.residual, k.name) == (4, 16, 64, "kivi4-g16-r64")
    i = parse_method("int4")
    assert isinstance(i, IntPerToken) and (i.bits, i.residual, i.name) == (4, 0, "int4")
    assert parse_method("int1-r32").residual == 32
    assert isinstance(parse_method("bf16"), FullPrecision) and parse_method("bf16").name == "bf16"
    for other in ("cq-8c8b", "cq-4c8b-w128", "kvquant", "int", "kivi", "int2x"):
        assert parse_method(other) is None


@pytest.mark.parametrize("name,msg", [("int9", "1..8"), ("kivi0", "1..8"), ("kivi2-g5", "multiple of the group"),
                                      ("kivi2-g32-g16", "at most once")])
def test_bad_baseline_options(name, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_method(name)


def test_value_groups_must_divide_head_dim():
    with pytest.raises(ConfigError, match=r"head_dim=32; allowed: \[1, 2, 4, 8, 16, 32\]"):
        parse_method("kivi2-g24-r48").make_cache(tiny_llama())


def test_unknown_method_gives_did_you_mean():
    from cqtool.evaluate import resolve_methods

    with pytest.raises(ConfigError, match="did you mean 'kivi2'"):
        resolve_methods(EvalConfig(model="tiny", methods=("kivl2",)), "tiny", {})
    got = resolve_methods(EvalConfig(model="tiny", methods=("int2", "kivi2-g32-r128", "fp16")), "tiny", {})
    assert [type(m) for m in got] == [IntPerToken, KIVI, FullPrecision]


def test_cache_reports_length_and_resets():
    model = tiny_llama()
    m = parse_method("kivi2-g4-r8")
    cache = m.make_cache(model)
    assert isinstance(cache, FakeQuantCache)
    with torch.no_grad():
        model(torch.randint(0, 97, (1, 21)), **{cache_kwarg(model): cache}, use_cache=True)
    assert cache.get_seq_length() == 21 and cache.layers[0].key.n == 16 and cache.layers[0].value.n == 13
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.layers[0].key.deq is None
    assert math.isclose(m.bits_per_channel(21), ((16 * 10 + 5 * 16) + (13 * 10 + 8 * 16)) / 21 / 2)
