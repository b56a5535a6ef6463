"""Attention computed from CQ codes: the PyTorch reference and the dispatch to the CUDA kernels.

The "cq" attention implementation receives a `CQView` (see cache.py) in place of dense keys and values.
Key j is seen by query i (at cache index p_i) in full precision when p_i - j < window or j < sinks, and
through its codes otherwise; that is exactly what token-by-token decoding would give, so prefill and
perplexity measure the same thing generation does.
"""
from __future__ import annotations

import contextlib

import torch

from . import quant

_REGISTERED: set[str] = set()
# `cqtool eval / generate --backend reference`: run the PyTorch reference even where the CUDA kernels would run
FORCE_REFERENCE = False


@contextlib.contextmanager
def backend(name: str):
    """`--backend auto|reference` for the duration of a command (FORCE_REFERENCE set, then restored)."""
    global FORCE_REFERENCE
    from .config import ConfigError

    if name not in ("auto", "reference"):
        raise ConfigError(f"--backend {name!r} is not allowed; use auto or reference")
    prev, FORCE_REFERENCE = FORCE_REFERENCE, name == "reference"
    try:
        yield
    finally:
        FORCE_REFERENCE = prev


def register_view_attention(name: str, view_type: type, attend) -> None:
    """Register attention implementation `name` with transformers (idempotent, no work at import).

    A cache's `update` hands it a `view_type` object instead of dense keys: attend(query, view, mask, scaling)
    -> [B, Q, H_q, D] computes the attention; dense keys and values (no such cache) go to SDPA.
    """
    if name in _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
        """transformers attention interface. query: [B, H_q, Q, D] -> ([B, Q, H_q, D], None)."""
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        if not isinstance(key, view_type):
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                          **kwargs)
        return attend(query, key, attention_mask, scaling), None

    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    _REGISTERED.add(name)


def register() -> None:
    """Register "cq": attention from a CQView's codes."""
    from .cache import CQView

    register_view_attention("cq", CQView, attend_codes)


def attend_codes(query: torch.Tensor, view, attention_mask, scaling: float) -> torch.Tensor:
    """The CUDA kernels where they apply (ops), the reference otherwise or when FORCE_REFERENCE is set."""
    from . import ops

    if attention_mask is None and getattr(view.layer, "static", False):
        from .config import ConfigError

        raise ConfigError("a CQ cache in static mode (make_static) needs the 4D attention mask [B, 1, Q, capacity] "
                          "that marks the rows holding tokens (graphs.StaticDecoder passes it); got none")
    if FORCE_REFERENCE:
        ops._note("attention", "reference", "forced by --backend reference")
        return attend_codes_reference(query, view, attention_mask, scaling)
    return ops.cq_attention(query, view, attention_mask, scaling)


def _dense_mask(attention_mask, B: int, Q: int, S: int, start: int, device) -> torch.Tensor:
    """Boolean [B, 1, Q, S] (True = attend) from transformers' mask (None means causal, no padding)."""
    if attention_mask is None:
        qi = torch.arange(start, start + Q, device=device).view(Q, 1)
        return (torch.arange(S, device=device).view(1, S) <= qi).view(1, 1, Q, S).expand(B, 1, Q, S)
    m = attention_mask[..., :S]
    if m.dtype != torch.bool:
        m = m > torch.finfo(m.dtype).min / 2 if m.is_floating_point() else m.bool()
    return m


def fp_region(view, S: int) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
    """Full-precision keys/values available for this step: (first index, keys, values) covering lo..S-1."""
    if view.win_k is None:
        return view.start, view.new_k, view.new_v
    w = view.win_k.shape[2]
    return view.start - w, torch.cat([view.win_k, view.new_k], 2), torch.cat([view.win_v, view.new_v], 2)


def full_precision_pairs(view, Q: int, S: int, device) -> torch.Tensor:
    """bool [Q, S]: the (query, key) pairs that read the key in full precision, the window of recent tokens before
    each query and the sinks, rather than through its codes. (Static decoding: the queries' rows are on the device.)"""
    cfg = view.layer.config
    if view.rows is not None:
        qi = view.rows.to(device).view(Q, 1)
    else:
        qi = torch.arange(view.start, view.start + Q, device=device).view(Q, 1)
    kj = torch.arange(S, device=device).view(1, S)
    return ((qi - kj) < cfg.window) | (kj < min(cfg.sinks, S))


def attend_codes_reference(query: torch.Tensor, view, attention_mask, scaling: float) -> torch.Tensor:
    """Reference CQ attention. query [B, H_q, Q, D] (post-RoPE) -> [B, Q, H_q, D].

    Dequantizes every cached key (pre-RoPE codes -> centroids -> RoPE at the token's position) and value,
    then swaps in full-precision keys/values for the (query, key) pairs inside the window or the sinks.
    """
    layer = view.layer
    cache = layer.parent
    B, Hq, Q, D = query.shape
    S = view.length
    k_codes, v_codes = layer.valid_codes()
    cfg = layer.config
    kq = quant.decode(quant.unpack(k_codes, layer.k_bits, layer.k_groups), layer.k_centroids, torch.float32)
    cos, sin = cache.cos_sin(S, query.device)
    kq = quant.apply_rope(kq, cos, sin)
    vq = quant.decode(quant.unpack(v_codes, layer.v_bits, layer.v_groups), layer.v_centroids, torch.float32)
    Hk = kq.shape[1]
    rep = Hq // Hk
    q = query.float()
    kq, vq = kq.repeat_interleave(rep, 1), vq.repeat_interleave(rep, 1)
    allowed = _dense_mask(attention_mask, B, Q, S, view.start, query.device)
    scores = torch.matmul(q, kq.transpose(-1, -2)) * scaling  # [B, H_q, Q, S]
    use_fp = None
    if cfg.window or cfg.sinks:
        kf, vf = kq.clone(), vq.clone()
        static = view.rows is not None
        if static and cfg.window:  # static decoding: key j's full-precision copy at ring row j % window
            ring = torch.arange(S, device=query.device) % cfg.window
            kf = view.win_k.float()[:, :, ring].repeat_interleave(rep, 1)
            vf = view.win_v.float()[:, :, ring].repeat_interleave(rep, 1)
        elif not static:
            lo, fk, fv = fp_region(view, S)
            kf[:, :, lo:S] = fk.float().repeat_interleave(rep, 1)
            vf[:, :, lo:S] = fv.float().repeat_interleave(rep, 1)
        if cfg.sinks and layer.sink_k is not None:
            n = layer.sink_k.shape[2]
            kf[:, :, :n] = layer.sink_k.float().repeat_interleave(rep, 1)
            vf[:, :, :n] = layer.sink_v.float().repeat_interleave(rep, 1)
        use_fp = full_precision_pairs(view, Q, S, query.device)
        scores = torch.where(use_fp, torch.matmul(q, kf.transpose(-1, -2)) * scaling, scores)
    scores = scores.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with nothing to attend (padding) give zeros
    if use_fp is None:
        out = torch.matmul(p, vq)
    else:
        out = torch.matmul(p * use_fp, vf) + torch.matmul(p * ~use_fp, vq)
    return out.transpose(1, 2).to(query.dtype).contiguous()
