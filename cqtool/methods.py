"""KV cache methods behind one interface, so that CQ and the baselines are evaluated the same way.

A method makes the cache object a forward pass uses (`make_cache`) and states its honest memory cost
(`bits_per_channel` at a given context length, scales, zero points and full-precision windows included).
"""
from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from typing import Any, Callable

from .config import ConfigError


class KVMethod(ABC):
    name: str

    @abstractmethod
    def make_cache(self, model):
        """A transformers Cache for one sequence batch, or None for the model's default (full precision)."""

    @abstractmethod
    def bits_per_channel(self, seqlen: int) -> float:
        """Average bits per stored K/V channel per token over a context of `seqlen` tokens."""

    def describe(self) -> dict[str, Any]:
        return {"method": self.name}


class FullPrecision(KVMethod):
    def __init__(self, bits: int = 16):
        self.name, self.bits = "fp16", bits

    def make_cache(self, model):
        return None

    def bits_per_channel(self, seqlen: int) -> float:
        return float(self.bits)


def window_bits(code_bits: float, seqlen: int, window: int, sinks: int = 0, fp_bits: int = 16) -> float:
    """Average bits when the first `sinks` and last `window` of `seqlen` tokens are kept in fp16."""
    fp = min(seqlen, window + sinks)
    return ((seqlen - fp) * code_bits + fp * fp_bits) / seqlen


class CQMethod(KVMethod):
    def __init__(self, codebook, window: int | None = None, sinks: int | None = None, name: str | None = None):
        self.codebook = codebook
        self.config = codebook.config.with_runtime(window=window, sinks=sinks)
        fisher = codebook.meta.get("fisher", True)
        self.name = name or (self.config.name + ("" if fisher else "-uniform"))

    def make_cache(self, model):
        from .cache import CQCache

        return CQCache(model, self.codebook, window=self.config.window, sinks=self.config.sinks)

    def bits_per_channel(self, seqlen: int) -> float:
        c = self.config
        return window_bits(c.bits_per_channel, seqlen, c.window, c.sinks)

    def describe(self) -> dict[str, Any]:
        c = self.config
        meta = self.codebook.meta
        return {"method": self.name, "key": c.key.name, "value": c.value.name, "window": c.window, "sinks": c.sinks,
                "fisher": meta.get("fisher"), "codebook_bytes": self.codebook.nbytes(),
                # how this codebook was calibrated, as its file says (not the eval's defaults)
                "calibration": {k: meta[k] for k in ("data", "data_hash", "nsamples", "seqlen", "kmeans_iters", "seed")
                                if k in meta}}


# name -> factory(**options) for methods that need no calibration; baselines register here
REGISTRY: dict[str, Callable[..., KVMethod]] = {"fp16": lambda **kw: FullPrecision(16), "bf16": lambda **kw: FullPrecision(16)}


def unknown_method(name: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown method {name!r}{hint} (known: {', '.join(sorted(known))}, cq-<c>c<b>b[-w<W>][-s<S>])")
