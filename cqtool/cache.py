"""A Coupled-Quantization KV cache for transformers 5.

Every token's keys (before RoPE) and values are stored as packed b-bit codes; the `window` most recent
tokens and the first `sinks` tokens are also kept in full precision. `update` returns a `CQView` instead
of dense tensors, and the attention function registered as "cq" (see `attention.py`) computes attention
from the codes, in prefill as in decode: no query ever sees a full-precision key outside the window.

Pre-RoPE keys and token positions are taken with hooks on the model (`prepare_model`): the k_proj output
(k_norm output where the model has one, as Qwen3 does) and the rotary module's position ids.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import quant
from .config import CQConfig, ConfigError


def attention_modules(model) -> list[torch.nn.Module]:
    """The self-attention module of every decoder layer, in order."""
    mods = [m for m in model.modules() if hasattr(m, "k_proj") and hasattr(m, "v_proj") and hasattr(m, "layer_idx")]
    if not mods:
        raise ConfigError(f"{type(model).__name__} has no attention modules with k_proj/v_proj: not a Llama-family model")
    return sorted(mods, key=lambda m: m.layer_idx)


def pre_rope_key_module(attn: torch.nn.Module) -> torch.nn.Module:
    """The module whose output is the pre-RoPE key: k_norm when the model normalises keys (Qwen3), else k_proj."""
    return attn.k_norm if hasattr(attn, "k_norm") else attn.k_proj


def rotary_module(model) -> torch.nn.Module:
    for m in model.modules():
        if hasattr(m, "inv_freq") and hasattr(m, "attention_scaling"):
            return m
    raise ConfigError(f"{type(model).__name__} has no rotary embedding module")


class _ModelTap:
    """Hooks that hand the current forward's pre-RoPE keys and positions to the cache."""

    def __init__(self, model):
        self.attn = attention_modules(model)
        self.rotary = rotary_module(model)
        self.keys: dict[int, torch.Tensor] = {}
        self.positions: torch.Tensor | None = None
        self.enabled = 0
        # a pre-hook, registered before any other: it sees the position ids the model passes, not a copy that a later
        # hook makes on the rotary module's GPU (graphs._GraphPerDevice, for a model spread over GPUs)
        self.handles = [self.rotary.register_forward_pre_hook(self._on_rotary, with_kwargs=True, prepend=True)]
        for a in self.attn:
            self.handles.append(pre_rope_key_module(a).register_forward_hook(self._on_key(a.layer_idx, a.head_dim)))

    def _on_rotary(self, module, args, kwargs):
        if self.enabled:
            self.positions = args[1] if len(args) > 1 else kwargs.get("position_ids")

    def _on_key(self, layer_idx: int, head_dim: int):
        def hook(module, args, output):
            if self.enabled:
                # k_proj: [B, S, H*D]; k_norm: [B, S, H, D] -> [B, H, S, D]
                self.keys[layer_idx] = output.reshape(*output.shape[:2], -1, head_dim).transpose(1, 2)

        return hook


def prepare_model(model) -> _ModelTap:
    """Install the taps once per model and select the "cq" attention implementation."""
    from .attention import register

    register()
    tap = getattr(model, "_cq_tap", None)
    if tap is None:
        tap = _ModelTap(model)
        model._cq_tap = tap
    if model.config._attn_implementation != "cq":
        model.set_attn_implementation("cq")
    return tap


@dataclass
class CQView:
    """What `update` hands to the attention function for one layer and one forward.

    new_k: [B, H_kv, Q, D] post-RoPE keys of the new tokens (full precision), new_v likewise.
    start: cache index of the first new token; the layer now holds start + Q tokens.
    win_k/win_v: full-precision post-RoPE keys/values of the tokens just before `start` that were still in
    the window ([B, H_kv, w, D], w <= window), i.e. positions start - w .. start - 1.
    rows: static decoding (CQCache.make_static) only: the cache rows of the new tokens, on the device ([Q] int64;
    `start` is then capacity - Q, the view spans every row and the mask picks the held ones); the window is then a
    ring of `window` rows, token j at row j % window of win_k / win_v, the new tokens already in it.
    """

    layer: "CQLayer"
    new_k: torch.Tensor
    new_v: torch.Tensor
    start: int
    win_k: torch.Tensor | None
    win_v: torch.Tensor | None
    rows: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.start + self.new_k.shape[2]


class AppendOnlyLayer(CacheLayerMixin):
    """A cache layer that only appends tokens and counts them in `self.length` (no sliding, no maximum)."""

    length = 0

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1


class CQLayer(AppendOnlyLayer):
    """One decoder layer's CQ cache: packed codes for all tokens, full precision for window and sinks.

    k_codes: [B, H_kv, cap, R_k] uint8, v_codes: [B, H_kv, cap, R_v] uint8 (first `length` rows valid)
    k_centroids: [H_kv, G_k, 2**b_k, c_k], v_centroids: [H_kv, G_v, 2**b_v, c_v]
    """

    is_sliding = False
    is_compileable = False

    def __init__(self, parent: "CQCache", layer_idx: int, k_centroids: torch.Tensor, v_centroids: torch.Tensor):
        super().__init__()
        self._parent = weakref.ref(parent)
        self.layer_idx = layer_idx
        self.config: CQConfig = parent.config
        self.k_centroids_cpu, self.v_centroids_cpu = k_centroids, v_centroids
        self.length = 0

    @property
    def parent(self) -> "CQCache":
        return self._parent()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, _, D = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        k, v = self.k_centroids_cpu, self.v_centroids_cpu
        if self.device.type == "cuda":  # from page-locked memory: the host does not wait for the copy
            k, v = self.parent.codebook.pinned(k), self.parent.codebook.pinned(v)
        self.k_centroids = k.to(self.device, non_blocking=True).to(key_states.dtype)
        self.v_centroids = v.to(self.device, non_blocking=True).to(value_states.dtype)
        self.k_bits, self.v_bits = self.config.key.code_bits, self.config.value.code_bits
        self.k_groups, self.v_groups = self.k_centroids.shape[1], self.v_centroids.shape[1]
        self.k_rb = quant.row_bytes(self.k_groups, self.k_bits)
        self.v_rb = quant.row_bytes(self.v_groups, self.v_bits)
        self.k_codes = torch.empty(B, H, 0, self.k_rb, dtype=torch.uint8, device=self.device)
        self.v_codes = torch.empty(B, H, 0, self.v_rb, dtype=torch.uint8, device=self.device)
        self.win_k = self.win_v = None
        self.sink_k = self.sink_v = None
        self.static = False  # static mode (CQCache.make_static)
        self.is_initialized = True

    def _grow(self, need: int) -> None:
        cap = self.k_codes.shape[2]
        if need <= cap:
            return
        reserve = self.parent.max_length if self.parent is not None else None
        # a caller's reserve when it covers the need; else grow by 25% (memory stays near the advertised bits)
        new_cap = reserve if reserve and reserve >= need else max(need, cap + cap // 4, 256)
        for name in ("k_codes", "v_codes"):
            old = getattr(self, name)
            buf = torch.empty(*old.shape[:2], new_cap, old.shape[3], dtype=old.dtype, device=old.device)
            buf[:, :, :cap] = old
            setattr(self, name, buf)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key_states: [B, H_kv, Q, D] post-RoPE (stored as codes of the pre-RoPE keys taken by the tap)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        parent = self.parent
        Q = key_states.shape[2]
        pre = parent.pop_pre_rope_keys(self.layer_idx, key_states)
        if self.static:  # before _grow: a static cache never reallocates (a captured graph holds its buffers)
            return self._update_static(pre, key_states, value_states)
        start = self.length
        self._grow(start + Q)
        from . import ops  # the encode kernel on GPU, the reference elsewhere (or with --backend reference)

        ops.encode_kv_into(pre, self.k_centroids, self.k_bits, self.k_codes, value_states, self.v_centroids, self.v_bits,
                           self.v_codes, start)
        self.length = start + Q
        view = CQView(self, key_states, value_states, start, self.win_k, self.win_v)
        W, Sk = self.config.window, self.config.sinks
        if W:
            k = key_states if self.win_k is None else torch.cat([self.win_k, key_states], dim=2)
            v = value_states if self.win_v is None else torch.cat([self.win_v, value_states], dim=2)
            self.win_k, self.win_v = k[:, :, -W:].contiguous(), v[:, :, -W:].contiguous()
        if Sk and start < Sk:
            n = min(Sk - start, Q)
            k, v = key_states[:, :, :n], value_states[:, :, :n]
            self.sink_k = k if self.sink_k is None else torch.cat([self.sink_k, k], dim=2)
            self.sink_v = v if self.sink_v is None else torch.cat([self.sink_v, v], dim=2)
        return view, view

    def _update_static(self, pre: torch.Tensor, key_states: torch.Tensor, value_states: torch.Tensor):
        """Static mode: the new tokens' codes go to the rows the device-side length names (the encode kernel's
        `encode_rows`; `index_copy_` on the reference path), and the view spans the whole capacity; the caller's attention mask (4D, True = attend) tells which rows hold tokens.
        No shape and no kernel argument depends on the length, so a decode step can be captured as a CUDA graph and
        replayed (cqtool/graphs.py)."""
        from . import ops

        Q, cap = key_states.shape[2], self.k_codes.shape[2]
        rows = self.parent.on_device("static_rows", self.device)  # this step's rows, set by layer 0 (_append_positions)
        W = self.config.window
        ring = None
        if W:  # the window's ring: token j at row j % W (make_static; the rows computed once for all layers), written
            # by the encode launch where it can (ops.encode_kv_into)
            slot = self.parent.on_device("static_ring_rows", self.device)
            ring = (key_states, value_states, self.win_k, self.win_v, slot)
        ops.encode_kv_into(pre, self.k_centroids, self.k_bits, self.k_codes, value_states, self.v_centroids, self.v_bits,
                           self.v_codes, 0, rows=rows, ring=ring)
        self.length += Q  # host bookkeeping; a replayed graph does not run it (CQCache.sync_static_length)
        view = CQView(self, key_states, value_states, cap - Q, self.win_k if W else None, self.win_v if W else None,
                      rows=rows)
        return view, view

    def valid_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.static:  # static mode: every row; the mask picks the held ones
            return self.k_codes, self.v_codes
        return self.k_codes[:, :, : self.length], self.v_codes[:, :, : self.length]

    def reset(self) -> None:
        self.length = 0
        self.static = False
        self.win_k = self.win_v = self.sink_k = self.sink_v = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for name in ("k_codes", "v_codes", "win_k", "win_v", "sink_k", "sink_v"):
            t = getattr(self, name, None)
            if t is not None:
                setattr(self, name, t.index_select(0, beam_idx.to(t.device)))

    def offload(self):  # codes are small; offloading is not supported
        pass

    def prefetch(self):
        pass

    def memory_bytes(self) -> int:
        """Bytes this layer really holds for `length` tokens (codes, window, sinks)."""
        n = 0
        if self.is_initialized:
            n += self.k_codes[:, :, : self.length].numel() + self.v_codes[:, :, : self.length].numel()
            for t in (self.win_k, self.win_v, self.sink_k, self.sink_v):
                if t is not None:
                    n += t.numel() * t.element_size()
        return n


def held_bytes(cache) -> int:
    """Bytes a KV cache holds: CQCache.memory_bytes(), or the keys and values of a transformers cache's layers
    (DynamicCache)."""
    if hasattr(cache, "memory_bytes"):
        return cache.memory_bytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers
               for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None)


class CQCache(Cache):
    """KV cache whose keys (pre-RoPE) and values live as coupled-quantization codes.

    cache = CQCache(model, codebook, window=128)
    model.generate(ids, past_key_values=cache)  # or model(ids, past_key_values=cache)
    """

    def __init__(self, model, codebook, window: int | None = None, sinks: int | None = None,
                 max_length: int | None = None):
        """max_length: tokens to reserve code buffers for (e.g. prompt + new tokens); grown on demand past it."""
        codebook.validate_model(model)
        self.max_length = max_length
        self.config = codebook.config.with_runtime(window=window, sinks=sinks)
        self.codebook = codebook
        self.tap = prepare_model(model)
        self.tap.enabled += 1
        self._model_ref = weakref.ref(model)
        rot = self.tap.rotary
        self.inv_freq = rot.inv_freq.detach().float()
        self.rope_scale = float(rot.attention_scaling)
        self.positions: torch.Tensor | None = None  # [B, S] int64, every cached token's RoPE position
        # static mode (make_static): the number of cached tokens on the device, and the current step's rows
        self.static_length: torch.Tensor | None = None
        self.static_rows: torch.Tensor | None = None
        self.static_ring_rows: torch.Tensor | None = None
        # copies of those (and of the positions) on the other GPUs of a model spread over several, which a caller that
        # replays one CUDA graph per GPU refreshes between the graphs (graphs.StaticDecoder, replica_pairs)
        self._replicas: dict[tuple[str, str], torch.Tensor] = {}
        self._copies: dict[tuple[str, str], tuple[torch.Tensor, int, torch.Tensor]] = {}  # on_device's eager copies
        self._inv_freq_copies: dict[str, torch.Tensor] = {}
        layers = [CQLayer(self, i, codebook.key_centroids[i], codebook.value_centroids[i]) for i in range(codebook.num_layers)]
        super().__init__(layers=layers)
        self._cos_sin_cache: tuple[tuple, torch.Tensor, torch.Tensor] | None = None

    def __del__(self):
        tap = getattr(self, "tap", None)
        if tap is not None:
            tap.enabled = max(0, tap.enabled - 1)

    def pop_pre_rope_keys(self, layer_idx: int, key_states: torch.Tensor) -> torch.Tensor:
        pre = self.tap.keys.pop(layer_idx, None)
        if pre is None or pre.shape != key_states.shape:
            raise RuntimeError(
                "CQCache did not see this layer's pre-RoPE keys: build it with CQCache(model, codebook) for the model it is used with"
            )
        if layer_idx == 0:
            self._append_positions(key_states)
        return pre

    def _append_positions(self, key_states: torch.Tensor) -> None:
        B, _, Q, _ = key_states.shape
        static = self.static_length
        pos = self.tap.positions
        if pos is None or pos.shape[-1] != Q:
            if static is not None:
                raise RuntimeError("CQCache in static mode needs the model's position ids (pass position_ids)")
            start = 0 if self.positions is None else self.positions.shape[1]
            pos = torch.arange(start, start + Q, device=key_states.device).unsqueeze(0)
        pos = pos.to(key_states.device).long().expand(B, Q)
        if static is not None:  # the step's rows, from the device-side length, once for all layers; then advance it
            self.static_rows = static + torch.arange(Q, device=static.device)
            if self.config.window:  # their rows in the layers' window rings
                self.static_ring_rows = self.static_rows % self.config.window
            self.positions.index_copy_(1, self.static_rows, pos.contiguous())
            static.add_(Q)
            return
        self.positions = pos if self.positions is None else torch.cat([self.positions, pos], dim=1)

    def make_static(self, capacity: int) -> None:
        """Static mode from here on: code buffers and positions of `capacity` tokens, the number of cached tokens also
        held on the device (one counter for all layers, advanced in place by layer 0), and each step's view spanning
        the whole capacity, masked by the 4D
        attention mask the caller passes (True = attend). This is what lets a decode step run as a CUDA graph
        (graphs.StaticDecoder); the attention computed is the same (tests/test_graphs.py). A full-precision window
        becomes a ring of `window` rows (token j at row j % window, written in place each step); the sinks, fixed
        once the prompt holds them, stay as they are (a prompt shorter than the sinks is refused)."""
        W, n_sink = self.config.window, self.config.sinks
        first = self.layers[0]
        if not first.is_initialized or self.positions is None:
            raise ConfigError("make_static: run the prompt through the model first (the cache is empty)")
        if capacity < first.length + 1:
            raise ConfigError(f"capacity {capacity}: must exceed the {first.length} tokens already cached")
        if n_sink and first.length < n_sink:
            raise ConfigError(f"static decoding (CUDA graphs) with {n_sink} sinks needs a prompt of at least {n_sink} "
                              f"tokens (got {first.length}): the sinks must be full before the steps are captured")
        self.max_length = capacity
        for layer in self.layers:
            if layer.length != first.length:
                raise ConfigError("make_static: the layers hold different numbers of tokens")
            if layer.k_codes.shape[2] != capacity:  # exactly `capacity` rows: every step's view spans all of them
                for name in ("k_codes", "v_codes"):
                    old = getattr(layer, name)
                    buf = torch.zeros(*old.shape[:2], capacity, old.shape[3], dtype=old.dtype, device=old.device)
                    buf[:, :, : layer.length] = old[:, :, : layer.length]
                    setattr(layer, name, buf)
            if W and not layer.static:
                # the window (tokens n - w .. n - 1) into a ring of W rows: token j at row j % W
                n, w = layer.length, layer.win_k.shape[2]
                slot = torch.arange(n - w, n, device=layer.win_k.device) % W
                for name in ("win_k", "win_v"):
                    old = getattr(layer, name)
                    ring = torch.zeros(*old.shape[:2], W, old.shape[3], dtype=old.dtype, device=old.device)
                    ring[:, :, slot] = old
                    setattr(layer, name, ring)
            layer.static = True
        self.static_length = torch.tensor(first.length, dtype=torch.long, device=self.positions.device)
        B, n = self.positions.shape
        pos = torch.arange(capacity, device=self.positions.device).expand(B, capacity).clone()
        pos[:, :n] = self.positions
        self.positions = pos
        self._cos_sin_cache = None

    REPLICATED = ("static_rows", "static_ring_rows", "positions")

    def on_device(self, name: str, device) -> torch.Tensor:
        """One of REPLICATED on `device`: the tensor itself where it lives there (the GPU of layer 0), else the copy a
        graph replay keeps there (replica_pairs), else a copy for eager decoding of a model spread over GPUs, made
        once per (tensor, version, device): the layers of a step on one GPU share it, and a step that appends (a new
        tensor) or writes in place (static mode: a new version) gets a fresh one."""
        t = getattr(self, name)
        device = torch.device(device)
        if t.device == device:
            return t
        rep = self.replica(name, device)
        if rep is not None:
            return rep
        key = (name, str(device))
        memo = self._copies.get(key)
        if memo is None or memo[0] is not t or memo[1] != t._version:  # memo[0] keeps t alive: its id is not reused
            memo = self._copies[key] = (t, t._version, t.to(device))
        return memo[2]

    def replica(self, name: str, device) -> torch.Tensor | None:
        """The copy of REPLICATED tensor `name` that replica_pairs keeps on `device`, if any."""
        return self._replicas.get((name, str(torch.device(device))))

    def replica_pairs(self, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Static mode, for one CUDA graph per GPU: a copy on `device` of each REPLICATED tensor that lives elsewhere,
        which the layers on `device` read from now on instead of copying it themselves (a copy across GPUs cannot be
        captured in that GPU's graph). Returns (source, copy) pairs: the caller copies each source into its copy
        before every replay of `device`'s graph. drop_replicas() ends it."""
        pairs = []
        for name in self.REPLICATED:
            t = getattr(self, name)
            if t is None or t.device == torch.device(device):
                continue
            rep = torch.empty_like(t, device=device)  # filled by the caller's copy before each replay
            self._replicas[(name, str(torch.device(device)))] = rep
            pairs.append((t, rep))
        return pairs

    def inv_freq_on(self, device) -> torch.Tensor:
        """The RoPE frequencies (fp32, contiguous) on `device`, copied once per device (they never change)."""
        key = str(torch.device(device))
        t = self._inv_freq_copies.get(key)
        if t is None:
            t = self._inv_freq_copies[key] = self.inv_freq.to(device=device, dtype=torch.float32).contiguous()
        return t

    def drop_replicas(self) -> None:
        self._replicas.clear()
        self._copies.clear()  # a replayed graph writes in place without bumping versions: earlier copies are stale

    def sync_static_length(self) -> int:
        """Static mode: copy the device-side length to the host's `length` (a replayed graph advances only the
        former); returns it."""
        if self.static_length is not None:
            n = int(self.static_length)
            for layer in self.layers:
                layer.length = n
        return self.layers[0].length

    def cos_sin(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE cos/sin [B, length, D] fp32 for the first `length` cached tokens (memoised per step)."""
        cached = self._cos_sin_cache
        key = (length, self.positions._version)  # static mode writes the positions in place
        if cached is None or cached[0] != key or cached[1].device != torch.device(device):
            pos = self.on_device("positions", device)[:, :length]
            cos, sin = quant.rope_cos_sin(pos, self.inv_freq_on(device), self.rope_scale)
            self._cos_sin_cache = (key, cos, sin)
            cached = self._cos_sin_cache
        return cached[1], cached[2]

    def memory_bytes(self) -> int:
        return sum(layer.memory_bytes() for layer in self.layers)

    def reset(self):
        super().reset()
        self.positions = None
        self.static_length = self.static_rows = self.static_ring_rows = None
        self._replicas.clear()
        self._copies.clear()
        self._cos_sin_cache = None
