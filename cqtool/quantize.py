"""`cqtool quantize`: calibration directory -> deployable codebook file + report."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .calibrate import list_configs
from .codebook import Codebook
from .config import ConfigError
from .io import write_json

DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float32": torch.float32, "fp32": torch.float32}


def export(calib_dir: str, output: str, config: str | None = None, dtype: str = "float16",
           json_out: str | None = None) -> dict[str, Any]:
    names = list_configs(calib_dir)
    if config is None:
        if len(names) != 1:
            raise ConfigError(f"{calib_dir!r} holds {len(names)} configurations {names}; choose one with --config")
        config = names[0]
    if config not in names:
        raise ConfigError(f"configuration {config!r} is not in {calib_dir!r}; it holds {names}")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not allowed; use one of {sorted(DTYPES)}")
    d = Path(calib_dir)
    cb = Codebook.load(d / f"{config}.safetensors")
    stats = json.loads((d / f"{config}.stats.json").read_text())
    cb.save(output, dtype=DTYPES[dtype])
    nbytes = sum(t.numel() for t in cb.key_centroids + cb.value_centroids) * DTYPES[dtype].itemsize
    params = cb.meta.get("model_params") or 0
    layers = []
    for i in range(cb.num_layers):
        k = next(s for s in stats if s["layer"] == i and s["kind"] == "key")
        v = next(s for s in stats if s["layer"] == i and s["kind"] == "value")
        layers.append({"layer": i, "key_rel_error": k["rel_error"], "value_rel_error": v["rel_error"],
                       "key_iterations": k["iterations"], "value_iterations": v["iterations"]})
    rep = {"config": config, "output": output, "bits_per_channel": cb.config.bits_per_channel,
           "key": cb.config.key.name, "value": cb.config.value.name, "codebook_bytes": nbytes,
           "model_params": params, "percent_of_model": 100.0 * nbytes / (params * DTYPES[dtype].itemsize) if params else float("nan"),
           "fisher": cb.meta.get("fisher"), "layers": layers}
    if json_out:
        write_json(json_out, rep)
    return rep
