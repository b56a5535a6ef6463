"""Frozen, versioned configuration objects.

Every output directory gets the resolved config saved next to it (`to_dict`), so a result can always be
traced back to the exact settings that produced it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

FORMAT_VERSION = 1

# bits per channel -> (channels per group c, code bits b); the paper's named configurations.
BITS_PRESETS: dict[float, tuple[int, int]] = {
    4.0: (2, 8),
    2.0: (4, 8),
    1.0: (8, 8),
    1.25: (8, 10),
    0.75: (16, 12),
}
ALLOWED_CHANNELS = (1, 2, 4, 8, 16, 32)
MIN_CODE_BITS, MAX_CODE_BITS = 1, 16
KEY_POSITIONS = ("pre_rope", "post_rope")


class ConfigError(ValueError):
    """A user-facing configuration problem; the CLI prints its message on one line."""


def _fmt_bits(x: float) -> str:
    return f"{x:g}"


@dataclass(frozen=True)
class QuantSpec:
    """One coupled quantizer: groups of `channels` contiguous channels, each coded with `code_bits` bits."""

    channels: int
    code_bits: int

    def __post_init__(self) -> None:
        if self.channels not in ALLOWED_CHANNELS:
            raise ConfigError(f"channels must be one of {list(ALLOWED_CHANNELS)}, got {self.channels}")
        if not MIN_CODE_BITS <= self.code_bits <= MAX_CODE_BITS:
            raise ConfigError(f"code bits must be in [{MIN_CODE_BITS}, {MAX_CODE_BITS}], got {self.code_bits}")

    @property
    def bits_per_channel(self) -> float:
        return self.code_bits / self.channels

    @property
    def num_centroids(self) -> int:
        return 2**self.code_bits

    @property
    def name(self) -> str:
        return f"{self.channels}c{self.code_bits}b"

    @classmethod
    def from_bits(cls, bits: float) -> "QuantSpec":
        for k, (c, b) in BITS_PRESETS.items():
            if math.isclose(k, float(bits)):
                return cls(c, b)
        allowed = ", ".join(_fmt_bits(k) for k in BITS_PRESETS)
        raise ConfigError(f"--bits {_fmt_bits(float(bits))} has no CQ configuration; allowed: {allowed}")

    @classmethod
    def parse(cls, text: str) -> "QuantSpec":
        """'8c8b', 'cq-8c8b' or a bits-per-channel number such as '1' or '1.25'."""
        t = text.strip().lower().removeprefix("cq-")
        if "c" in t and t.endswith("b"):
            try:
                c, b = t[:-1].split("c")
                return cls(int(c), int(b))
            except ValueError:
                pass
            raise ConfigError(f"cannot parse quantizer {text!r}; expected e.g. '8c8b' or a bits value")
        try:
            return cls.from_bits(float(t))
        except ValueError as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"cannot parse quantizer {text!r}; expected e.g. '8c8b' or a bits value") from None

    def check_head_dim(self, head_dim: int, what: str = "") -> None:
        if head_dim % self.channels:
            raise ConfigError(
                f"{what}channels={self.channels} does not divide head_dim={head_dim}; "
                f"allowed: {[c for c in ALLOWED_CHANNELS if head_dim % c == 0]}"
            )


@dataclass(frozen=True)
class CQConfig:
    """How the KV cache is coded: one quantizer for keys, one for values, and what stays full precision."""

    key: QuantSpec
    value: QuantSpec
    key_position: str = "pre_rope"
    window: int = 0  # most recent tokens kept in full precision
    sinks: int = 0  # first tokens kept in full precision

    def __post_init__(self) -> None:
        if self.key_position not in KEY_POSITIONS:
            raise ConfigError(f"key_position must be one of {list(KEY_POSITIONS)}, got {self.key_position!r}")
        if self.window < 0 or self.sinks < 0:
            raise ConfigError(f"window and sinks must be >= 0, got window={self.window} sinks={self.sinks}")

    @property
    def name(self) -> str:
        n = f"cq-{self.key.name}" if self.key == self.value else f"cq-k{self.key.name}-v{self.value.name}"
        if self.window:
            n += f"-w{self.window}"
        if self.sinks:
            n += f"-s{self.sinks}"
        return n

    @property
    def bits_per_channel(self) -> float:
        return (self.key.bits_per_channel + self.value.bits_per_channel) / 2

    def with_runtime(self, window: int | None = None, sinks: int | None = None) -> "CQConfig":
        return dataclasses.replace(
            self, window=self.window if window is None else window, sinks=self.sinks if sinks is None else sinks
        )


@dataclass(frozen=True)
class CalibConfig:
    model: str
    specs: tuple[tuple[QuantSpec, QuantSpec], ...]  # (key, value) per configuration fitted
    data: str = "wikitext2"
    nsamples: int = 16
    seqlen: int = 2048
    seed: int = 0
    fisher: bool = True
    kmeans_backend: str = "auto"
    kmeans_iters: int = 100
    kmeans_tol: float = 1e-4
    max_tokens: int | None = None  # subsample calibration tokens per group for k-means (None: all)
    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None  # "auto": accelerate spreads the model over GPUs / CPU
    # reproducible on GPU: eager attention in the Fisher pass (SDPA's fused backward adds dQ with atomics, so every
    # layer below the last got different Fisher weights run to run) and torch's deterministic algorithms
    deterministic: bool = False
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.nsamples < 1 or self.seqlen < 2:
            raise ConfigError(f"need nsamples >= 1 and seqlen >= 2, got nsamples={self.nsamples} seqlen={self.seqlen}")
        if self.kmeans_backend not in ("auto", "torch", "faiss"):
            raise ConfigError(f"kmeans backend must be one of ['auto', 'torch', 'faiss'], got {self.kmeans_backend!r}")
        if self.kmeans_iters < 1:
            raise ConfigError(f"kmeans iterations must be >= 1, got {self.kmeans_iters}")
        if not 0 <= self.kmeans_tol < float("inf"):  # before the gathering pass, not after it
            raise ConfigError(f"--tol {self.kmeans_tol}: must be a number >= 0 (0: never stop early)")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError(f"--max-tokens {self.max_tokens}: must be at least 1 (omit it to use every token)")
        check_device_map(self.device_map)


@dataclass(frozen=True)
class EvalConfig:
    model: str
    tasks: tuple[str, ...] = ("wikitext",)
    methods: tuple[str, ...] = ()
    codebook: str | None = None
    window: int | None = None
    sinks: int | None = None
    seqlen: int = 2048
    limit: int | None = None
    batch_size: int = 1
    data_dir: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None
    seed: int = 0
    micro_batches: int = 1  # each batch (perplexity, lm-eval) as micro-batches on their own CUDA streams, pipelined
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self) -> None:  # before any model or data loads
        if self.seqlen < 2:
            raise ConfigError(f"--seqlen {self.seqlen}: a perplexity window needs at least 2 tokens")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size {self.batch_size}: must be at least 1")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be >= 1, got {self.limit}")
        check_device_map(self.device_map)
        if self.micro_batches < 1 or self.micro_batches > self.batch_size:
            raise ConfigError(f"--micro-batches {self.micro_batches}: must be between 1 and --batch-size "
                              f"({self.batch_size}), one sequence per micro-batch")


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's named placements


def check_device_map(device_map: str | None) -> None:
    """--device-map: None, one of accelerate's named placements, or one device (cpu, cuda, cuda:1), as transformers
    takes it."""
    if device_map is None or device_map in DEVICE_MAPS:
        return
    import torch

    try:
        torch.device(device_map)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device-map {device_map!r}: must be one of {', '.join(DEVICE_MAPS)} (auto fills the "
                          f"first GPU first, balanced spreads the layers evenly over the GPUs) or a device such as "
                          f"cuda:1") from None


def to_dict(obj: Any) -> Any:
    """JSON-ready view of a config (dataclasses and tuples become dicts and lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(x) for x in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
