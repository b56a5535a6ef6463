"""Baseline KV cache methods behind the `KVMethod` interface: per-token INT-b and KIVI-style.

Both are simulated ("fake quantization"): the cache keeps the dequantized version of every quantized
token, with scales and zero points rounded to fp16 exactly as they would be stored, beside the
full-precision residual; `bits_per_channel` counts what a real implementation stores (codes, fp16
scales and zero points, full-precision tokens). Keys are quantized post-RoPE, as KIVI and transformers'
QuantizedCache do (CQ codes keys pre-RoPE).

What makes a perplexity fair is which version of each key and value every query sees. Here that follows
the method's decode loop exactly, in prefill too (transformers' QuantizedCache hands prefill full-precision
K/V, so its perplexity measures nothing): see `Rule`. A forward in which all queries agree gets dense
tensors and transformers' SDPA; one in which they do not (a prefill longer than the residual) gets a
`MixedView` and the "fakequant" attention below, which picks, per (query, key) pair, the full-precision
or the dequantized key and value.

Names (`parse_method`):
    fp16, bf16              the model's own cache
    int<b>[-r<R>]           b in 1..8: each token's keys (all kv heads x head_dim together) min-max
                            quantized with one fp16 scale and zero point, likewise its values; with
                            -r<R> the R most recent tokens (the current one included) stay full precision
    kivi<b>[-g<G>][-r<R>]   KIVI (Liu et al. 2024): keys per channel over groups of G tokens, values per
                            token over groups of G channels, fp16 scales and zero points, residual R
                            (defaults G=32, R=128; R must be a multiple of G, as in KIVI)

KVQuant-style (pre-RoPE non-uniform per-channel levels from calibration, dense-and-sparse outliers) is
not implemented.
"""
from __future__ import annotations

import re
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache

from .cache import AppendOnlyLayer
from .config import ConfigError
from .methods import REGISTRY, FullPrecision, KVMethod

ATTN_NAME = "fakequant"
FP_BITS = 16
SCALE_BITS = 16  # one fp16 scale and one fp16 zero point per quantization group
MAX_BITS = 8
KIVI_GROUP, KIVI_RESIDUAL = 32, 128
QUERY_CHUNK = 256  # queries per block in attend_mixed: bounds its memory, skips each block's future keys


# ---------------------------------------------------------------------------------------------- quantizers


def fake_quant(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Asymmetric min-max round-to-nearest over `dim`, quantized and dequantized; x's shape and dtype.

    Scale (max - min) / (2**bits - 1) and zero point min are rounded to fp16, as stored, before use.
    Computed in fp32 (fp64 for fp64 inputs).
    """
    levels = 2**bits - 1
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    mn = xf.amin(dim, keepdim=True).half().to(xf.dtype)
    scale = ((xf.amax(dim, keepdim=True) - mn) / levels).half().to(xf.dtype)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant group: every entry is mn
    q = ((xf - mn) / scale).round_().clamp_(0, levels)
    return (q * scale + mn).to(x.dtype)


def quant_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x: [B, H_kv, n, D]; one group per token over all H_kv * D channels."""
    B, H, n, D = x.shape
    flat = x.transpose(1, 2).reshape(B, n, H * D)
    return fake_quant(flat, bits, -1).view(B, n, H, D).transpose(1, 2)


def quant_channel_over_tokens(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """x: [B, H_kv, n, D], n a multiple of `group`; one group per channel and `group` consecutive tokens."""
    B, H, n, D = x.shape
    return fake_quant(x.reshape(B, H, n // group, group, D), bits, 3).view(B, H, n, D)


def quant_token_over_channels(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """x: [B, H_kv, n, D], D a multiple of `group`; one group per token, head and `group` channels."""
    B, H, n, D = x.shape
    return fake_quant(x.reshape(B, H, n, D // group, group), bits, -1).view(B, H, n, D)


# ---------------------------------------------------------------------------------------------- residual rule


@dataclass(frozen=True)
class Rule:
    """Which tokens of one stream (the keys or the values of a layer) are held in full precision.

    After t tokens the stream holds `committed(t) = block * floor(max(0, t - keep) / block)` tokens quantized
    and the rest in full precision. The query at cache index i sees token j <= i in full precision iff
    j >= fp_start(i) = committed(i + eager): with `eager` a new token is quantized before it attends
    (per-token INT: every token, its own included, is seen quantized); without, attention runs first and
    the residual is flushed after it, as in KIVI's decode (jy-yuan/KIVI, models/llama_kivi.py):

    KIVI keys   (block=R, keep=0): the key residual grows to R tokens; after the attention of the token
                that fills it, all R are quantized (per channel, groups of G tokens). Query i sees keys
                j >= R * floor(i / R) in full precision: between 1 and R of them.
    KIVI values (block=1, keep=R): after each attention the oldest of R + 1 values is quantized. Query i
                sees values j >= i - R in full precision: R + 1 of them, its own included.
    INT -r<R>   (block=1, keep=R, eager): query i sees j > i - R in full precision (CQ's window rule).

    Quantizing a token never depends on later tokens (a key group is quantized only once complete), so
    a prefill of any length gives what token-by-token decoding gives.
    """

    block: int = 1
    keep: int = 0
    eager: bool = False

    def committed(self, t: torch.Tensor | int):
        if isinstance(t, int):
            return self.block * (max(0, t - self.keep) // self.block)
        return self.block * ((t - self.keep).clamp(min=0) // self.block)

    def fp_start(self, i: torch.Tensor) -> torch.Tensor:
        return self.committed(i + int(self.eager))

    def stored_fp_tokens(self, seqlen: int) -> int:
        return seqlen - self.committed(seqlen)


def stream_bits(rule: Rule, code_bits: float, seqlen: int) -> float:
    """Average stored bits per channel over `seqlen` tokens of one stream (codes + scales, fp tokens)."""
    fp = rule.stored_fp_tokens(seqlen)
    return ((seqlen - fp) * code_bits + fp * FP_BITS) / seqlen


# ---------------------------------------------------------------------------------------------- cache


@dataclass
class Side:
    """One stream's tensors for the queries of one forward (cache indices start .. S - 1).

    deq: [B, H_kv, hi, D] dequantized tokens 0 .. hi - 1 (None when hi = 0)
    fp:  [B, H_kv, S - lo, D] full-precision tokens lo .. S - 1 (lo <= hi: all any of these queries sees in fp)
    fp_start: [Q] int64, query q sees token j in full precision iff j >= fp_start[q]
    uniform: every query sees the same version of each token it attends to
    """

    deq: torch.Tensor | None
    fp: torch.Tensor
    lo: int
    fp_start: torch.Tensor
    uniform: bool

    def _upto(self, f: int) -> torch.Tensor:
        """Tokens 0 .. f - 1 dequantized, f .. S - 1 full precision (lo <= f <= hi)."""
        if self.deq is None:
            return self.fp
        if f - self.lo == self.fp.shape[2]:
            return self.deq[:, :, :f]
        return torch.cat([self.deq[:, :, :f], self.fp[:, :, f - self.lo :]], 2)

    @property
    def dense(self) -> torch.Tensor:
        """[B, H_kv, S, D]: the dequantized version wherever one exists."""
        return self._upto(0 if self.deq is None else self.deq.shape[2])

    def as_dense(self) -> torch.Tensor:
        """What every query sees (only when `uniform`)."""
        return self._upto(int(self.fp_start[-1]))


class Stream:
    """Keys or values of one layer: dequantized tokens 0 .. n - 1 and full-precision tokens n .. S - 1."""

    def __init__(self, rule: Rule, quantize):
        self.rule, self.quantize = rule, quantize
        self.deq: torch.Tensor | None = None  # [B, H_kv, n, D]
        self.fp: torch.Tensor | None = None  # [B, H_kv, S - n, D]
        self.n = 0

    def append(self, x: torch.Tensor, start: int) -> Side:
        """x: [B, H_kv, Q, D] tokens start .. start + Q - 1 -> what their queries see; then commits."""
        S = start + x.shape[2]
        lo = self.n
        fp = x if self.fp is None else torch.cat([self.fp, x], 2)  # tokens lo .. S - 1
        hi = self.rule.committed(S)  # fp_start(i) <= hi for every query of this forward
        deq = self.deq
        if hi > lo:
            new = self.quantize(fp[:, :, : hi - lo])
            deq = new if deq is None else torch.cat([deq, new], 2)
        qi = torch.arange(start, S)
        fs = self.rule.fp_start(qi)
        seen = torch.minimum(fs, qi + 1)  # a query only sees keys j <= i
        uniform = bool((seen == torch.minimum(fs[-1], qi + 1)).all())
        self.deq, self.fp, self.n = deq, fp[:, :, hi - lo :], hi
        return Side(deq, fp, lo, fs, uniform)

    def reorder(self, beam_idx: torch.Tensor) -> None:
        for name in ("deq", "fp"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, beam_idx.to(t.device)))

    def reset(self) -> None:
        self.deq = self.fp = None
        self.n = 0


@dataclass
class MixedView:
    """Handed to the "fakequant" attention when the queries of one forward disagree on what they see."""

    key: Side
    value: Side
    start: int


class FakeQuantLayer(AppendOnlyLayer):
    is_sliding = False
    is_compileable = False

    def __init__(self, key: Stream, value: Stream):
        super().__init__()
        self.key, self.value = key, value
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key_states/value_states: [B, H_kv, Q, D] (keys post-RoPE) -> dense K, V or a MixedView twice."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.length
        self.length += key_states.shape[2]
        k = self.key.append(key_states, start)
        v = self.value.append(value_states, start)
        if k.uniform and v.uniform:
            return k.as_dense(), v.as_dense()
        view = MixedView(k, v, start)
        return view, view

    def reset(self) -> None:
        self.length = 0
        self.key.reset()
        self.value.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.key.reorder(beam_idx)
        self.value.reorder(beam_idx)

    def offload(self):
        pass

    def prefetch(self):
        pass


class FakeQuantCache(Cache):
    """A simulated quantized KV cache: each layer quantizes keys and values with `method`'s functions on the
    schedule of its rules. model(ids, cache=FakeQuantCache(model, KIVI(2))) (past_key_values= before transformers 5.24)"""

    def __init__(self, model, method: "FakeQuantMethod"):
        prepare_model(model)
        super().__init__(layers=[method.new_layer() for _ in range(model.config.num_hidden_layers)])


# ---------------------------------------------------------------------------------------------- attention


def prepare_model(model) -> None:
    from .attention import register_view_attention

    register_view_attention(ATTN_NAME, MixedView, attend_mixed)
    if model.config._attn_implementation != ATTN_NAME:
        model.set_attn_implementation(ATTN_NAME)


def attend_mixed(query: torch.Tensor, view: MixedView, attention_mask, scaling: float) -> torch.Tensor:
    """Attention where query q sees key/value j in full precision iff j >= fp_start[q] (per stream).

    query: [B, H_q, Q, D] post-RoPE -> [B, Q, H_q, D]; computed in fp32 (fp64 for fp64 inputs), in blocks of
    QUERY_CHUNK queries, each against the keys up to its last query and the fp keys from its first fp_start.
    """
    from .attention import _dense_mask

    k, v = view.key, view.value
    B, Hq, Q, D = query.shape
    dt = torch.promote_types(query.dtype, torch.float32)
    kd, vd, kf, vf = (t.to(dt) for t in (k.dense, v.dense, k.fp, v.fp))
    Hk, S = kd.shape[1], kd.shape[2]
    rep = Hq // Hk
    dev = query.device
    q5 = query.to(dt).view(B, Hk, rep, Q, D)  # query heads h*rep .. h*rep+rep-1 share kv head h
    allowed = _dense_mask(attention_mask, B, Q, S, view.start, dev)  # [B, 1, Q, S]
    fs_k, fs_v = k.fp_start.to(dev), v.fp_start.to(dev)
    out = torch.empty(B, Hk, rep, Q, D, dtype=dt, device=dev)
    for a in range(0, Q, QUERY_CHUNK):
        b = min(Q, a + QUERY_CHUNK)
        n, end = b - a, view.start + b  # keys from `end` on are in the future of every query here
        q = q5[:, :, :, a:b].reshape(B, Hk, rep * n, D)
        scores = (q @ kd[:, :, :end].transpose(-1, -2)).view(B, Hk, rep, n, end) * scaling
        lo = min(max(k.lo, int(k.fp_start[a])), end)  # fp_start never decreases
        if lo < end:
            fp_scores = (q @ kf[:, :, lo - k.lo : end - k.lo].transpose(-1, -2)).view(B, Hk, rep, n, end - lo) * scaling
            use = torch.arange(lo, end, device=dev) >= fs_k[a:b, None]
            scores[..., lo:] = torch.where(use, fp_scores, scores[..., lo:])
        scores.masked_fill_(~allowed[:, :, a:b, :end].unsqueeze(1), float("-inf"))
        p = torch.softmax(scores, dim=-1).nan_to_num_(0.0)  # rows with nothing to attend (padding) give zeros
        lo = min(max(v.lo, int(v.fp_start[a])), end)
        p_fp = p[..., lo:] * (torch.arange(lo, end, device=dev) >= fs_v[a:b, None])
        p[..., lo:] -= p_fp
        o = p.view(B, Hk, rep * n, end) @ vd[:, :, :end]
        o += p_fp.reshape(B, Hk, rep * n, end - lo) @ vf[:, :, lo - v.lo : end - v.lo]
        out[:, :, :, a:b] = o.view(B, Hk, rep, n, D)
    return out.view(B, Hq, Q, D).transpose(1, 2).to(query.dtype).contiguous()


# ---------------------------------------------------------------------------------------------- methods


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= MAX_BITS:
        raise ConfigError(f"bits must be in 1..{MAX_BITS}, got {bits}")


def _kv_shape(model) -> tuple[int, int]:
    """(H_kv, head_dim) of a Llama-family model."""
    from .models import ModelInfo

    info = ModelInfo.from_config(model.config)
    return info.num_kv_heads, info.head_dim


class FakeQuantMethod(KVMethod):
    """A baseline simulated by FakeQuantCache: two rules and two quantizers ([B, H_kv, n, D] -> same)."""

    key_rule: Rule
    value_rule: Rule

    @abstractmethod
    def quantize_keys(self, x: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def quantize_values(self, x: torch.Tensor) -> torch.Tensor: ...

    def check_model(self, model) -> None:
        """Raise ConfigError when the model's KV shape does not suit the method."""

    def new_layer(self) -> FakeQuantLayer:
        return FakeQuantLayer(Stream(self.key_rule, self.quantize_keys), Stream(self.value_rule, self.quantize_values))

    def make_cache(self, model) -> FakeQuantCache:
        self.check_model(model)
        return FakeQuantCache(model, self)


class IntPerToken(FakeQuantMethod):
    """INT-b per token: one fp16 scale and zero point per token per layer for the keys (all H_kv * D
    channels together), likewise for the values; optionally the R most recent tokens in full precision.

    Bits per channel: b + 32 / (H_kv * D) for quantized tokens, so the method needs the model's KV width
    (`kv_dim`, given or learnt by `make_cache`) before it can state its cost.
    """

    def __init__(self, bits: int, residual: int = 0, kv_dim: int | None = None):
        _check_bits(bits)
        if residual < 0:
            raise ConfigError(f"residual must be >= 0, got {residual}")
        self.bits, self.residual, self.kv_dim = bits, residual, kv_dim
        self.name = f"int{bits}" + (f"-r{residual}" if residual else "")
        self.key_rule = self.value_rule = Rule(block=1, keep=residual, eager=True)

    def quantize_keys(self, x: torch.Tensor) -> torch.Tensor:
        return quant_per_token(x, self.bits)

    quantize_values = quantize_keys

    def check_model(self, model) -> None:
        H, D = _kv_shape(model)
        if self.kv_dim is not None and self.kv_dim != H * D:
            raise ConfigError(f"{self.name} was set up for kv_dim={self.kv_dim}, the model has {H} kv heads x {D} = {H * D}")
        self.kv_dim = H * D

    def bits_per_channel(self, seqlen: int) -> float:
        if self.kv_dim is None:
            raise ConfigError(f"{self.name}: bits per channel depend on the model's kv heads x head_dim; "
                              f"pass kv_dim to parse_method or call make_cache(model) first")
        return stream_bits(self.key_rule, self.bits + 2 * SCALE_BITS / self.kv_dim, seqlen)

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "bits": self.bits, "residual": self.residual, "kv_dim": self.kv_dim,
                "key_position": "post_rope", "scales": "fp16 per token"}


class KIVI(FakeQuantMethod):
    """KIVI-style 2/4-bit cache: keys per channel over groups of G tokens, values per token over groups of
    G channels, fp16 scales and zero points, a full-precision residual of R tokens (see `Rule` for exactly
    which). Bits per quantized channel: b + 32 / G (2-bit, G=32: 3 bits), residual tokens 16. kivi2 over
    L = 2048 tokens: all 2048 keys quantized (2048 is a multiple of R = 128) -> 3 bits; values 1920 x 3 +
    128 x 16 -> 3.8125 bits; 3.40625 bits per channel on average.
    """

    def __init__(self, bits: int = 2, group: int = KIVI_GROUP, residual: int = KIVI_RESIDUAL):
        _check_bits(bits)
        if group < 1:
            raise ConfigError(f"group must be >= 1, got {group}")
        if residual < 0 or residual % group:
            raise ConfigError(f"residual must be a multiple of the group ({group}), as in KIVI; got {residual}")
        self.bits, self.group, self.residual = bits, group, residual
        default = group == KIVI_GROUP and residual == KIVI_RESIDUAL
        self.name = f"kivi{bits}" + ("" if default else f"-g{group}-r{residual}")
        # R = 0 is not in KIVI's code; here it flushes keys group by group
        self.key_rule = Rule(block=residual or group, keep=0, eager=False)
        self.value_rule = Rule(block=1, keep=residual, eager=False)

    def quantize_keys(self, x: torch.Tensor) -> torch.Tensor:
        return quant_channel_over_tokens(x, self.bits, self.group)

    def quantize_values(self, x: torch.Tensor) -> torch.Tensor:
        return quant_token_over_channels(x, self.bits, self.group)

    def check_model(self, model) -> None:
        _, D = _kv_shape(model)
        if D % self.group:
            allowed = [g for g in range(1, D + 1) if D % g == 0]
            raise ConfigError(f"{self.name}: value groups of {self.group} channels must divide head_dim={D}; allowed: {allowed}")

    def bits_per_channel(self, seqlen: int) -> float:
        code = self.bits + 2 * SCALE_BITS / self.group
        return (stream_bits(self.key_rule, code, seqlen) + stream_bits(self.value_rule, code, seqlen)) / 2

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "bits": self.bits, "group": self.group, "residual": self.residual,
                "key_position": "post_rope", "scales": "fp16"}


_INT = re.compile(r"int(\d+)((?:-r\d+)?)")
_KIVI = re.compile(r"kivi(\d+)((?:-[gr]\d+)*)")


def _options(mods: str, allowed: str) -> dict[str, int]:
    found = re.findall(r"-([a-z])(\d+)", mods)
    keys = [k for k, _ in found]
    if len(set(keys)) != len(keys) or not set(keys) <= set(allowed):
        raise ConfigError(f"options {mods!r}: each of {['-' + a for a in allowed]} at most once")
    return {k: int(v) for k, v in found}


def parse_method(name: str, kv_dim: int | None = None) -> KVMethod | None:
    """A baseline from its name (see the module docstring), or None for a name that is not a baseline.

    kv_dim: the model's H_kv * head_dim, needed by int<b> to state its bits before make_cache.
    """
    n = name.strip().lower()
    if n in ("fp16", "bf16"):
        m = FullPrecision(16)
        m.name = n
        return m
    if mt := _INT.fullmatch(n):
        return IntPerToken(int(mt.group(1)), _options(mt.group(2), "r").get("r", 0), kv_dim=kv_dim)
    if mt := _KIVI.fullmatch(n):
        o = _options(mt.group(2), "gr")
        return KIVI(int(mt.group(1)), o.get("g", KIVI_GROUP), o.get("r", KIVI_RESIDUAL))
    return None


for _b in range(1, MAX_BITS + 1):
    REGISTRY.setdefault(f"int{_b}", lambda b=_b, **kw: IntPerToken(b, **kw))
    REGISTRY.setdefault(f"kivi{_b}", lambda b=_b, **kw: KIVI(b, **kw))
