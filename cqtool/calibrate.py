"""`cqtool calibrate`: load the model, gather activations (and Fisher weights) once, fit every requested
CQ configuration with k-means, and write a calibration directory atomically.

Calibration directory:
    calib.json              resolved CalibConfig, model facts, data hash, timings
    <name>.safetensors      a Codebook with fp32 centroids, one per configuration (name like cq-8c8b)
    <name>.stats.json       per layer, for K and V: k-means objective, iterations, relative reconstruction error
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from . import kmeans, quant
from .codebook import Codebook
from .collect import KVCollector
from .config import CalibConfig, CQConfig, ConfigError, QuantSpec, to_dict
from .data import calibration_windows, load_text, text_hash, tokenize
from .io import atomic_dir, write_json
from .models import ModelInfo, load_config, load_model, load_tokenizer, model_device, pick_device, pick_dtype


def config_name(key: QuantSpec, value: QuantSpec) -> str:
    return CQConfig(key, value).name


def _groups(acts: torch.Tensor, fisher: torch.Tensor | None, info: ModelInfo, spec: QuantSpec, fisher_group: int,
            device: torch.device, idx: torch.Tensor | None):
    """acts [N, H*D] (+ fisher [N, H*D/fisher_group]) -> x [G, n, c] fp32 and weights [G, n] (or None)."""
    N = acts.shape[0]
    c, G = spec.channels, info.kv_dim // spec.channels
    x = acts.to(device, torch.float32).view(N, G, c).transpose(0, 1)
    w = None
    if fisher is not None:
        w = fisher.to(device).view(N, G, c // fisher_group).sum(-1).transpose(0, 1)
    if idx is not None:
        x, w = x[:, idx], (None if w is None else w[:, idx])
    return x, w


def _rel_error(acts: torch.Tensor, cent: torch.Tensor, info: ModelInfo, device: torch.device) -> float:
    """Unweighted relative reconstruction error of one layer's calibration activations."""
    N = acts.shape[0]
    xs = acts.to(device, torch.float32).view(N, info.num_kv_heads, info.head_dim).transpose(0, 1).unsqueeze(0)
    c = cent.to(device)
    rec = quant.decode(quant.encode(xs, c), c)
    return float(((rec - xs) ** 2).sum() / (xs**2).sum().clamp_min(1e-30))


def _fit_kind(coll: KVCollector, kind: str, spec: QuantSpec, info: ModelInfo, cfg: CalibConfig, fisher_group: int,
              device: torch.device, track, name: str, budget_bytes: int = 4 << 30):
    """k-means for every layer of one kind (key or value); several layers' groups are solved in one batch."""
    acts_all = coll.keys if kind == "key" else coll.values
    fis_all = (coll.key_fisher if kind == "key" else coll.value_fisher) if cfg.fisher else None
    N = acts_all.shape[1]
    idx = None
    if cfg.max_tokens and N > cfg.max_tokens:
        idx = torch.randperm(N, generator=torch.Generator().manual_seed(cfg.seed))[: cfg.max_tokens].to(device)
    n = N if idx is None else idx.numel()
    per_layer = info.kv_dim * n * 4 * 2  # x and a working copy, fp32
    step = max(1, min(info.num_layers, budget_bytes // max(1, per_layer)))
    cents, stats = [], []
    G = info.kv_dim // spec.channels
    for lo in track(range(0, info.num_layers, step), description=f"k-means {name} {kind}s"):
        layers = range(lo, min(info.num_layers, lo + step))
        parts = [_groups(acts_all[i], None if fis_all is None else fis_all[i], info, spec, fisher_group, device, idx) for i in layers]
        x = torch.cat([p[0] for p in parts]).contiguous()
        w = None if fis_all is None else torch.cat([p[1] for p in parts]).contiguous()
        del parts
        seed = cfg.seed * 100003 + lo * 2 + (kind == "value")
        res = kmeans.fit(x, spec.num_centroids, weights=w, iters=cfg.kmeans_iters, tol=cfg.kmeans_tol, seed=seed,
                         backend=cfg.kmeans_backend, device=device)
        del x, w
        for j, i in enumerate(layers):
            cent = res.centroids[j * G : (j + 1) * G].reshape(info.num_kv_heads, info.head_dim // spec.channels,
                                                               spec.num_centroids, spec.channels).float().cpu()
            cents.append(cent)
            stats.append({"layer": i, "kind": kind, "objective": float(res.objective[j * G : (j + 1) * G].mean()),
                          "iterations": res.iterations, "refilled": res.refilled, "seconds": res.seconds / len(layers),
                          "backend": res.backend, "rel_error": _rel_error(acts_all[i], cent, info, device)})
    return cents, stats


@contextlib.contextmanager
def deterministic_mode(on: bool):
    """torch's deterministic algorithms while the block runs (cfg.deterministic), restored after. warn_only: an op
    with no deterministic version warns instead of failing. cuBLAS needs CUBLAS_WORKSPACE_CONFIG for reproducible
    results; it is set here unless the user set it (it takes effect for cuBLAS handles made after this), and removed
    again after the block."""
    if not on:
        yield
        return
    set_env = "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    if set_env:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        if set_env:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def calibrate(cfg: CalibConfig, output: str | Path, progress=None) -> dict[str, Any]:
    """Run the whole calibration; returns the summary also written to calib.json."""
    with deterministic_mode(cfg.deterministic):
        return _calibrate(cfg, output, progress)


def too_few_tokens(cfg: CalibConfig, tokens: int) -> list[str]:
    """A warning per configuration whose k-means sees fewer tokens per channel group than it has centroids: every
    token then becomes a centroid, the rest repeat tokens, and the calibration error reads 0 (an overfit codebook)."""
    n = min(tokens, cfg.max_tokens) if cfg.max_tokens else tokens
    out = []
    for k, v in cfg.specs:
        kmax = max(k.num_centroids, v.num_centroids)
        if n < kmax:
            out.append(f"{config_name(k, v)}: k-means sees {n} tokens per channel group for {kmax} centroids, so "
                       f"centroids repeat tokens and the calibration error reads 0; give more tokens (--nsamples x "
                       f"--seqlen; the paper: 16 x 2048)")
    return out


def _calibrate(cfg: CalibConfig, output: str | Path, progress=None) -> dict[str, Any]:
    t0 = time.time()
    track = progress or (lambda it, **kw: it)
    _, _, _, info = load_config(cfg.model)  # every check that needs no weights comes first
    for k, v in cfg.specs:
        k.check_head_dim(info.head_dim, "key ")
        v.check_head_dim(info.head_dim, "value ")
    pick_dtype(cfg.dtype, pick_device(cfg.device))
    text = load_text(cfg.data)
    tok = load_tokenizer(cfg.model)
    windows = calibration_windows(tokenize(tok, text), cfg.nsamples, cfg.seqlen, cfg.seed)
    warnings = too_few_tokens(cfg, windows.numel())
    model, tok, info = load_model(cfg.model, cfg.device, cfg.dtype, cfg.device_map, tokenizer=tok)
    t_load = time.time()
    if cfg.deterministic and cfg.fisher:
        # the fused SDPA backward (flash / memory-efficient) accumulates dQ with atomics: the Fisher weights of every
        # layer but the last then differ from run to run, and so do the centroids. Eager attention's backward is
        # matmuls and a softmax (deterministic), at the cost of heads x seqlen^2 activations per layer.
        model.set_attn_implementation("eager")
    dev = model_device(model)
    fisher_group = math.gcd(*[s.channels for pair in cfg.specs for s in pair])
    for p in model.parameters():
        p.requires_grad_(False)
    store_dtype = torch.float32 if model.dtype == torch.float32 else torch.float16
    coll = KVCollector(model, windows.numel(), fisher=cfg.fisher, fisher_group=fisher_group, store_dtype=store_dtype)
    losses = []
    try:
        for w in track(windows, description="gather K/V" + (" + Fisher" if cfg.fisher else "")):
            losses.append(coll.add_batch(w.unsqueeze(0).to(dev)))
    finally:
        coll.close()
    t_gather = time.time()
    summary: dict[str, Any] = {"config": to_dict(cfg), "model": info.__dict__, "data_hash": text_hash(text),
                               "calib_loss": sum(losses) / len(losses), "tokens": int(windows.numel()),
                               "model_params": sum(p.numel() for p in model.parameters()), "configs": {},
                               "warnings": warnings}
    del model  # k-means needs the GPU memory more than the model now
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    km_dev = dev if dev.type == "cuda" else torch.device("cpu")
    with atomic_dir(output) as tmp:
        for k_spec, v_spec in cfg.specs:
            name = config_name(k_spec, v_spec)
            kc, kstats = _fit_kind(coll, "key", k_spec, info, cfg, fisher_group, km_dev, track, name)
            vc, vstats = _fit_kind(coll, "value", v_spec, info, cfg, fisher_group, km_dev, track, name)
            stats = sorted(kstats + vstats, key=lambda s: (s["layer"], s["kind"]))
            meta = {"fisher": cfg.fisher, "data": cfg.data, "data_hash": summary["data_hash"], "seed": cfg.seed,
                    "nsamples": cfg.nsamples, "seqlen": cfg.seqlen, "kmeans_iters": cfg.kmeans_iters,
                    "model_params": summary["model_params"]}
            cb = Codebook(CQConfig(k_spec, v_spec), info, kc, vc, meta)
            cb.save(tmp / f"{name}.safetensors")
            write_json(tmp / f"{name}.stats.json", stats)
            summary["configs"][name] = {
                "bits_per_channel": cb.config.bits_per_channel,
                "key_rel_error": sum(s["rel_error"] for s in stats if s["kind"] == "key") / info.num_layers,
                "value_rel_error": sum(s["rel_error"] for s in stats if s["kind"] == "value") / info.num_layers,
            }
        summary["seconds"] = {"load": t_load - t0, "gather": t_gather - t_load, "total": time.time() - t0}
        write_json(tmp / "calib.json", summary)
    return summary


def list_configs(calib_dir: str | Path) -> list[str]:
    d = Path(calib_dir)
    if not (d / "calib.json").is_file():
        raise ConfigError(f"{str(d)!r} is not a calibration directory (no calib.json); run cqtool calibrate first")
    return sorted(p.name.removesuffix(".safetensors") for p in d.glob("*.safetensors"))


