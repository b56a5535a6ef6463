"""Codebook files: CQ centroids for every layer, for keys and values, and a header that describes them.

File format (safetensors): tensors `layers.{i}.key` [H_kv, G_k, 2**b_k, c_k] and `layers.{i}.value`
[H_kv, G_v, 2**b_v, c_v]; metadata key "cqtool" holds the JSON header (FORMAT_VERSION, model facts,
quantizer settings, calibration provenance). Loading checks the header against the tensors, and
`validate_model` refuses a model whose shape differs, naming the field.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import FORMAT_VERSION, CQConfig, ConfigError, QuantSpec
from .io import atomic_path
from .models import ModelInfo

SHAPE_FIELDS = ("architecture", "num_layers", "num_kv_heads", "head_dim", "hidden_size", "num_heads")


@dataclass
class Codebook:
    config: CQConfig
    model: ModelInfo
    key_centroids: list[torch.Tensor]  # per layer [H_kv, G_k, 2**b_k, c_k]
    value_centroids: list[torch.Tensor]  # per layer [H_kv, G_v, 2**b_v, c_v]
    meta: dict[str, Any] = field(default_factory=dict)  # fisher, data_hash, seed, nsamples, seqlen, ...

    def __post_init__(self) -> None:
        self._pinned: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # pinned(): id -> (tensor, copy); not a field
        n = self.model.num_layers
        if len(self.key_centroids) != n or len(self.value_centroids) != n:
            raise ConfigError(f"codebook has {len(self.key_centroids)} key / {len(self.value_centroids)} value layers, model has {n}")
        for i, (k, v) in enumerate(zip(self.key_centroids, self.value_centroids)):
            for t, spec, what in ((k, self.config.key, "key"), (v, self.config.value, "value")):
                want = (self.model.num_kv_heads, self.model.head_dim // spec.channels, spec.num_centroids, spec.channels)
                if tuple(t.shape) != want:
                    raise ConfigError(f"layer {i} {what} centroids have shape {tuple(t.shape)}, header says {want}")

    def pinned(self, t: torch.Tensor) -> torch.Tensor:
        """A centroid tensor t in page-locked host memory, copied there once (the copy kept with the codebook; a tensor
        changed in place afterwards is not seen), so that a cache's copy of it to a GPU is asynchronous: from pageable
        memory it synchronises the host with the GPU, which stalls micro-batches pipelined on their own streams
        (pipeline.MicroBatches). t itself where it is not on the CPU, already pinned, or CUDA is absent."""
        if t.device.type != "cpu" or not torch.cuda.is_available() or t.is_pinned():
            return t
        hit = self._pinned.get(id(t))
        if hit is None or hit[0] is not t:
            hit = self._pinned[id(t)] = (t, t.pin_memory())
        return hit[1]

    def __getstate__(self) -> dict[str, Any]:  # pickling and copies leave the pinned copies behind
        return {**self.__dict__, "_pinned": {}}

    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    def header(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "model": self.model.__dict__,
            "key": {"channels": self.config.key.channels, "code_bits": self.config.key.code_bits},
            "value": {"channels": self.config.value.channels, "code_bits": self.config.value.code_bits},
            "key_position": self.config.key_position,
            "dtype": str(self.key_centroids[0].dtype).removeprefix("torch."),
            **self.meta,
        }

    def save(self, path: str | Path, dtype: torch.dtype | None = None) -> None:
        from safetensors.torch import save_file

        tensors = {}
        for i, (k, v) in enumerate(zip(self.key_centroids, self.value_centroids)):
            tensors[f"layers.{i}.key"] = (k if dtype is None else k.to(dtype)).contiguous().cpu()
            tensors[f"layers.{i}.value"] = (v if dtype is None else v.to(dtype)).contiguous().cpu()
        header = self.header()
        if dtype is not None:
            header["dtype"] = str(dtype).removeprefix("torch.")
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"cqtool": json.dumps(header)})

    @classmethod
    def load(cls, path: str | Path) -> "Codebook":
        from safetensors import safe_open

        path = Path(path)
        if path.is_dir():  # a calibration directory: name the codebooks it holds
            files = ", ".join(sorted(f.name for f in path.glob("*.safetensors"))) or "no .safetensors files"
            raise ConfigError(f"codebook {str(path)!r} is a directory ({files}); give one codebook file, e.g. "
                              f"{path / 'cq-8c8b.safetensors'}")
        if not path.is_file():
            raise ConfigError(f"codebook file {str(path)!r} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if "cqtool" not in meta:
                    raise ConfigError(f"{str(path)!r} is a safetensors file but not a cqtool codebook (no 'cqtool' header)")
                header = json.loads(meta["cqtool"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except ConfigError:
            raise
        except Exception as e:  # safetensors raises several types for damaged files
            raise ConfigError(f"codebook file {str(path)!r} is corrupted or not a safetensors file ({type(e).__name__}: {e})") from None
        version = header.get("format_version")
        if version != FORMAT_VERSION:
            raise ConfigError(f"codebook {str(path)!r} has format version {version}; this cqtool reads version {FORMAT_VERSION}")
        try:
            model = ModelInfo(**header["model"])
            config = CQConfig(QuantSpec(**header["key"]), QuantSpec(**header["value"]), header.get("key_position", "pre_rope"))
            n = model.num_layers
            keys = [tensors[f"layers.{i}.key"] for i in range(n)]
            values = [tensors[f"layers.{i}.value"] for i in range(n)]
        except (KeyError, TypeError) as e:
            raise ConfigError(f"codebook {str(path)!r} is incomplete: missing {e}") from None
        meta = {k: v for k, v in header.items() if k not in ("format_version", "model", "key", "value", "key_position", "dtype")}
        return cls(config, model, keys, values, meta)

    def validate_model(self, model_or_info) -> None:
        """Raise ConfigError naming the first field in which the model differs from the codebook's."""
        info = model_or_info if isinstance(model_or_info, ModelInfo) else ModelInfo.from_config(model_or_info.config)
        for f in SHAPE_FIELDS:
            a, b = getattr(self.model, f), getattr(info, f)
            if a != b:
                raise ConfigError(
                    f"codebook was made for another model: {f} is {a} in the codebook ({self.model.model_id}) but {b} in this model"
                )

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.key_centroids + self.value_centroids)
