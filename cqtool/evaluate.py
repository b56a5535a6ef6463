"""`cqtool eval`: perplexity on WikiText-2 (token and word level) and lm-eval tasks, for each KV method."""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any

import torch

from .data import eval_windows, load_text, tokenize
from .methods import KVMethod
from .models import cache_kwarg, model_device, model_devices
from .pipeline import micro_batch_cache, shared_pipeline, split_batch, sync_all


def perplexity(model, tokenizer, text: str, method: KVMethod, seqlen: int = 2048, limit: int | None = None,
               batch_size: int = 1, progress=None, micro_batches: int = 1) -> dict[str, Any]:
    """Non-overlapping `seqlen` windows; every window starts with an empty cache of `method`.

    Token perplexity = exp(mean NLL over predicted tokens). Word perplexity = exp(total NLL / words), words
    counted by whitespace in the evaluated windows' text (as lm-eval's wikitext task counts them).
    micro_batches: see windows_nll.
    """
    windows = eval_windows(tokenize(tokenizer, text), seqlen, limit)
    nll, count, seconds = windows_nll(model, windows, method, batch_size, micro_batches, progress,
                                      f"ppl {method.name}")
    words = len(tokenizer.decode(windows.reshape(-1)).split())
    return {"perplexity": math.exp(nll / count), "word_perplexity": math.exp(nll / max(1, words)),
            "nll_per_token": nll / count, "tokens": count, "windows": int(windows.shape[0]), "words": words,
            "seconds": seconds, **({"micro_batches": micro_batches} if micro_batches > 1 else {})}


@torch.no_grad()
def windows_nll(model, windows: torch.Tensor, method: KVMethod, batch_size: int = 1, micro_batches: int = 1,
                progress=None, description: str = "windows") -> tuple[float, int, float]:
    """(summed NLL of every token after the first of each window [N, T], the number of those tokens, seconds), each
    window run from an empty cache of `method`, `batch_size` windows per forward.

    micro_batches > 1 (a model on CUDA GPUs): each batch is cut into that many micro-batches, micro-batch j of every
    batch runs on its own CUDA streams (pipeline.MicroBatches) and the losses are summed on the GPU, read once at the
    end; on a model spread over GPUs by layers, the first GPU then works on one micro-batch while the next GPU works
    on the one before, where one batch at a time leaves all GPUs but one idle.
    """
    track = progress or (lambda it, **kw: it)
    dev = model_device(model)
    pipe = shared_pipeline(model, micro_batches) if micro_batches > 1 else None  # ConfigError unless on CUDA GPUs
    nll, count = 0.0, 0
    sync_all()
    t0 = time.perf_counter()
    batches = list(windows.to(dev).split(batch_size))  # one copy to the GPU, before the micro-batch streams fork
    sums: dict[int, torch.Tensor] = {}  # micro-batch -> its NLL so far, on its own streams
    cache_kw = cache_kwarg(model)
    if pipe:
        pipe.fork()
    try:
        for batch in track(batches, description=description):
            parts = split_batch(len(batch), min(micro_batches, len(batch)))
            for m, rows in enumerate(parts):
                with pipe.on(m) if pipe else contextlib.nullcontext():
                    ids = batch[rows]
                    cache = micro_batch_cache(method, model) if pipe else method.make_cache(model)
                    kw = {cache_kw: cache, "use_cache": True} if cache is not None else {"use_cache": False}
                    logits = model(input_ids=ids, **kw).logits.float()
                    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                             ids[:, 1:].reshape(-1), reduction="sum").double()
                    if pipe:
                        sums[m] = sums[m] + loss if m in sums else loss
                    else:
                        nll += float(loss)
                count += ids[:, 1:].numel()
                del cache, logits, loss
    finally:  # also after an error: the caller frees the windows on its own streams, which must wait for ours
        if pipe:
            pipe.join()
    if pipe:
        nll = sum(float(x) for x in sums.values())  # the current streams waited for the micro-batches' (join)
    sync_all()
    return nll, count, time.perf_counter() - t0


def wikitext_text(data_dir: str | None) -> str:
    """WikiText-2 raw test: `<data_dir>/wikitext-2-raw/wiki.test.raw` (or any file/folder given), else the hub."""
    from pathlib import Path

    if data_dir:
        d = Path(data_dir)
        for cand in (d / "wikitext-2-raw" / "wiki.test.raw", d / "wiki.test.raw", d):
            if cand.is_file():
                return load_text(str(cand))
    return load_text("wikitext2-test", "give --data-dir DIR with DIR/wikitext-2-raw/wiki.test.raw")


def parse_cq_name(name: str) -> dict[str, Any] | None:
    """'cq-8c8b[-uniform][-w128][-s4]' -> {'config': 'cq-8c8b', 'fisher': True, 'window': 128, 'sinks': 4}."""
    import re

    m = re.fullmatch(r"(cq-\d+c\d+b)((?:-uniform|-fisher|-w\d+|-s\d+)*)", name.strip().lower())
    if not m:
        return None
    mods = m.group(2)
    w = re.search(r"-w(\d+)", mods)
    s = re.search(r"-s(\d+)", mods)
    return {"config": m.group(1), "fisher": "-uniform" not in mods, "window": int(w.group(1)) if w else 0,
            "sinks": int(s.group(1)) if s else 0}


def resolve_methods(cfg, model_name: str, calib: dict[str, Any], progress=None, kv_dim: int | None = None) -> list:
    """EvalConfig -> KVMethods. CQ names are served from calibration dirs, calibrated when missing."""
    from pathlib import Path

    from .codebook import Codebook
    from .config import CalibConfig, QuantSpec
    from .methods import REGISTRY, CQMethod, unknown_method

    methods = []
    for path in (cfg.codebook or "").split(","):
        if path.strip():
            methods.append(CQMethod(Codebook.load(path.strip()), window=cfg.window, sinks=cfg.sinks))
    names = list(cfg.methods) or ([] if cfg.codebook else ["fp16"])
    want_cq: dict[bool, set[str]] = {True: set(), False: set()}
    parsed = []
    for n in names:
        cq = parse_cq_name(n)
        if cq:
            want_cq[cq["fisher"]].add(cq["config"])
        parsed.append((n, cq))
    for fisher, configs in want_cq.items():
        if not configs:
            continue
        d = Path(calib["dir"] + ("" if fisher else "-uniform"))
        have = {p.name.removesuffix(".safetensors") for p in d.glob("*.safetensors")} if d.exists() else set()
        missing = sorted(configs - have)
        if missing:
            from .calibrate import calibrate

            specs = []
            for c in sorted(configs | have):
                q = QuantSpec.parse(c)
                specs.append((q, q))
            ccfg = CalibConfig(model=model_name, specs=tuple(specs), data=calib["data"], nsamples=calib["nsamples"],
                               seqlen=calib["seqlen"], seed=cfg.seed, fisher=fisher, device=cfg.device, dtype=cfg.dtype,
                               kmeans_iters=calib.get("iters", 100))
            calibrate(ccfg, d, progress=progress)
    from .baselines import parse_method
    for n, cq in parsed:
        if cq:
            d = Path(calib["dir"] + ("" if cq["fisher"] else "-uniform"))
            cb = Codebook.load(d / f"{cq['config']}.safetensors")
            w = cq["window"] if cfg.window is None or cq["window"] else cfg.window
            s = cq["sinks"] if cfg.sinks is None or cq["sinks"] else cfg.sinks
            methods.append(CQMethod(cb, window=w, sinks=s, name=n.lower()))
            continue
        m = parse_method(n, kv_dim=kv_dim)
        if m is None and n.lower() in REGISTRY:
            m = REGISTRY[n.lower()]()
        if m is None:
            raise unknown_method(n, list(REGISTRY) + ["int<b>", "kivi<b>"])
        methods.append(m)
    return methods


def run_eval(cfg, calib: dict[str, Any] | None = None, progress=None) -> dict[str, Any]:
    """Evaluate every method on every task; returns {"results": [...], ...} ready for JSON and reports."""
    from .config import ConfigError, to_dict
    from .models import load_model

    tasks = [t.strip() for t in cfg.tasks if t.strip()]
    if not tasks:
        raise ConfigError("--tasks is empty; give e.g. wikitext or wikitext,arc_easy")
    from .models import load_config, pick_device, pick_dtype

    _, _, _, info = load_config(cfg.model)
    dev = pick_device(cfg.device)
    pick_dtype(cfg.dtype, dev)
    if cfg.micro_batches > 1 and not torch.cuda.is_available():
        raise ConfigError(f"--micro-batches {cfg.micro_batches}: pipelines micro-batches over CUDA GPUs; none is "
                          f"available here (use 1)")
    if cfg.micro_batches > 1 and dev.type != "cuda" and not cfg.device_map:
        raise ConfigError(f"--micro-batches {cfg.micro_batches}: pipelines micro-batches over CUDA GPUs; --device "
                          f"{cfg.device} puts the model on {dev} (use --device cuda, a --device-map, or 1)")
    calib = calib or {}
    calib.setdefault("dir", f"runs/calib/{info.model_id.replace('/', '_')}")
    calib.setdefault("data", "wikitext2")
    calib.setdefault("nsamples", 16)
    calib.setdefault("seqlen", 2048)
    methods = resolve_methods(cfg, cfg.model, calib, progress, kv_dim=info.kv_dim)
    for m in methods:  # refuse a codebook made for another model before any work starts
        if hasattr(m, "codebook"):
            m.codebook.validate_model(info)
    text = wikitext_text(cfg.data_dir) if "wikitext" in tasks else None
    model, tok, info = load_model(cfg.model, cfg.device, cfg.dtype, cfg.device_map)
    lm_tasks = [t for t in tasks if t != "wikitext"]
    results = []
    from . import ops

    for m in methods:
        ops.BACKEND_USED.clear()
        ops.KERNELS_RUN.clear()
        row: dict[str, Any] = {"method": m.name, "bits_per_channel": m.bits_per_channel(cfg.seqlen), **m.describe()}
        if text is not None:
            ppl = perplexity(model, tok, text, m, cfg.seqlen, cfg.limit, cfg.batch_size, progress, cfg.micro_batches)
            row.update(ppl)
        if lm_tasks:
            from .lmeval import run_tasks

            stats: dict[str, int] = {}
            sync_all()
            t0 = time.perf_counter()
            for task, res in run_tasks(model, tok, lm_tasks, m, cfg.data_dir, cfg.limit, cfg.batch_size, cfg.seed,
                                       micro_batches=cfg.micro_batches, stats=stats).items():
                for k, v in res.items():
                    row[f"{task}/{k}" if k != "acc" else task] = v
            sync_all()
            row["lm_eval_seconds"] = time.perf_counter() - t0  # wall time of this method's lm-eval run, task building
            # and data loading included (the first method may pay for loading what later ones find cached)
            if cfg.micro_batches > 1:  # how many of lm-eval's forwards ran as micro-batches (the others: as one)
                row["lm_eval_forwards"] = {"micro_batches": cfg.micro_batches, **stats}
        row["backends"] = dict(ops.BACKEND_USED)
        row["attention_kernels"] = sorted(ops.KERNELS_RUN)  # CUDA attention kernels that ran (empty: none)
        results.append(row)
    # the calibration directory and its settings only where CQ methods were named (--methods cq-...); codebook files
    # (--codebook) carry their own, in each result's "calibration"
    from_dir = any(parse_cq_name(n) for n in cfg.methods)
    return {"model": info.__dict__, "config": to_dict(cfg), "calibration": calib if from_dir else None,
            "devices": model_devices(model), "results": results}
