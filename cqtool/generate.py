"""`cqtool generate`: generation from a prompt through a CQ cache, beside the full-precision cache.

Shows what a codebook does to a model's text (the same decode with DynamicCache, and how many new tokens agree before
the first difference; greedy, or sampled with the same seed for both caches: sampling.py), how much memory each cache
holds, and which backend (CUDA kernels or the PyTorch reference) computed the attention.
"""
from __future__ import annotations

import time
from typing import Any

import torch

from .config import ConfigError
from .models import cache_kwarg, model_device, model_devices
from .sampling import GREEDY, Sampling, next_token


def check_args(prompt: str | None, prompt_file: str | None, max_new_tokens: int) -> str:
    """The prompt text (from --prompt or --prompt-file, exactly one), or a ConfigError naming what is wrong."""
    from pathlib import Path

    if (prompt is None) == (prompt_file is None):
        raise ConfigError("give exactly one of --prompt TEXT or --prompt-file FILE"
                          f" (got {'both' if prompt is not None else 'neither'})")
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    if prompt_file is not None:
        p = Path(prompt_file)
        if not p.is_file():
            raise ConfigError(f"--prompt-file {prompt_file!r} does not exist")
        prompt = p.read_text(encoding="utf-8", errors="replace")
    if not prompt.strip():
        raise ConfigError("the prompt is empty")
    return prompt


@torch.no_grad()
def decode_eager(model, ids: torch.Tensor, cache, max_new_tokens: int, eos: int | None,
                 sampling: Sampling = GREEDY) -> tuple[list[int], float]:
    """Decode `max_new_tokens` tokens (greedy or sampled; stops early at `eos`) with `cache`. Returns (new token ids,
    seconds). One forward per token through the model's own cache argument."""
    kw = {cache_kwarg(model): cache, "use_cache": True}
    dev = model_device(model)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    logits = model(input_ids=ids, **kw, logits_to_keep=1).logits
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(next_token(logits[:, -1], sampling)[0, 0])
        out.append(nxt)
        if (eos is not None and nxt == eos) or len(out) == max_new_tokens:
            break
        logits = model(input_ids=torch.tensor([[nxt]], device=dev), **kw).logits
    sync()
    return out, time.perf_counter() - t0


def decode_graph(model, ids: torch.Tensor, cache, max_new_tokens: int, eos: int | None, graph: bool = True,
                 sampling: Sampling = GREEDY) -> tuple[list[int], float, int]:
    """decode_eager() with static shapes, every decode step after two warm-up steps replayed as a CUDA graph
    (graphs.StaticDecoder; `cache` from graphs.static_cache; graph=False: every step eagerly, the same path on the
    CPU). Always runs `max_new_tokens` steps (a graph cannot stop early), then cuts the tokens after `eos`. Returns
    (new token ids, seconds: prefill, warm-up, capture, replays, the number of steps that were graph replays: 0 for 3
    tokens or fewer)."""
    from .graphs import StaticDecoder
    from .pipeline import sync_all

    sync = sync_all if graph else (lambda: None)
    sync()
    t0 = time.perf_counter()
    dec = StaticDecoder(model, cache, ids.shape[1] + max_new_tokens, graph=graph, sampling=sampling)
    first = dec.prefill(ids)
    toks = first if max_new_tokens == 1 else torch.cat([first, dec.decode(first, max_new_tokens - 1)], 1)
    out = toks[0].tolist()
    sync()
    secs = time.perf_counter() - t0
    if eos is not None and eos in out:
        out = out[: out.index(eos) + 1]
    return out, secs, dec.timings["steps"] if dec.timings.get("graph") else 0


def prompt_ids(tok, prompt: str, chat: bool) -> list[int]:
    """Token ids of the prompt; `chat`: as the user's turn of the tokenizer's chat template, the assistant's turn
    opened (a ConfigError when the tokenizer has no template)."""
    if not chat:
        return tok(prompt)["input_ids"]
    if not getattr(tok, "chat_template", None):
        raise ConfigError("--chat: this model's tokenizer has no chat template; drop --chat to use the prompt as it is")
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def run_generate(model_name: str, codebook_path: str, prompt: str, max_new_tokens: int = 64, window: int | None = None,
                 sinks: int | None = None, compare: bool = True, device: str = "auto", dtype: str = "auto",
                 device_map: str | None = None, chat: bool = False, graphs: bool = False,
                 sampling: Sampling = GREEDY) -> dict[str, Any]:
    """Load model and codebook, decode with the CQ cache (and with DynamicCache when `compare`), greedily or sampled
    (`sampling`; each run starts from the same seed: sampling.seed, or one drawn here and reported). `graphs`: decode
    steps replayed as CUDA graphs, the CQ cache in static mode and transformers' StaticCache beside it."""
    import dataclasses
    import secrets

    from transformers import DynamicCache

    from . import ops
    from .cache import CQCache, held_bytes
    from .codebook import Codebook
    from .graphs import static_cache
    from .models import load_config, load_model

    cb = Codebook.load(codebook_path)
    _, _, _, info = load_config(model_name)
    cb.validate_model(info)  # before the weights are loaded
    model, tok, info = load_model(model_name, device, dtype, device_map)
    ids = torch.tensor([prompt_ids(tok, prompt, chat)], device=model_device(model))
    if graphs and model_device(model).type != "cuda":
        raise ConfigError(f"--cuda-graphs needs the model on a CUDA GPU (it is on {model_device(model)}; --device cuda)")
    eos = tok.eos_token_id
    cap = ids.shape[1] + max_new_tokens  # every token a run will hold
    if not sampling.greedy and sampling.seed is None:  # reported, so that the run can be repeated
        sampling = dataclasses.replace(sampling, seed=secrets.randbelow(2**31))
    runs = []
    kinds = ["cq"] + (["full precision"] if compare else [])
    for kind in kinds:
        ops.BACKEND_USED.clear()
        ops.KERNELS_RUN.clear()
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)  # the CPU and every GPU's generator: the same draws for both caches
        if graphs:
            cache = static_cache(model, "cq" if kind == "cq" else "static", cap, cb, window, sinks)
            new, secs, replays = decode_graph(model, ids, cache, max_new_tokens, eos, sampling=sampling)
        else:
            cache = CQCache(model, cb, window=window, sinks=sinks, max_length=cap) if kind == "cq" else DynamicCache()
            new, secs = decode_eager(model, ids, cache, max_new_tokens, eos, sampling)
        base = "StaticCache" if graphs else "DynamicCache"
        row = {"cache": cache.config.name if kind == "cq" else f"{base} (full precision)",
               "bits_per_channel": cb.config.bits_per_channel if kind == "cq" else torch.finfo(model.dtype).bits,
               "new_tokens": len(new), "seconds": secs, "token_ids": new,
               # a graph runs every step even past the end-of-sequence token: tokens/s counts the steps it ran
               "tokens_per_s": (max_new_tokens if graphs else len(new)) / secs,
               "text": tok.decode(new, skip_special_tokens=True), "cache_bytes": held_bytes(cache)}
        if graphs:
            row["graph_replays"] = replays
        if kind == "cq":
            row.update(window=cache.config.window, sinks=cache.config.sinks, backends=dict(ops.BACKEND_USED),
                       attention_kernels=sorted(ops.KERNELS_RUN))
        runs.append(row)
        del cache
    if compare:
        a, b = runs[0]["token_ids"], runs[1]["token_ids"]
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        runs[0]["tokens_agreeing"] = same  # new tokens equal to the full-precision ones before the first difference
    return {"model": info.__dict__, "codebook": str(codebook_path), "prompt": prompt, "chat": chat,
            "prompt_tokens": int(ids.shape[1]), "cuda_graphs": graphs, "decoding": sampling.describe(),
            "sampling": dataclasses.asdict(sampling),
            "max_new_tokens": max_new_tokens, "device": str(model_device(model)), "devices": model_devices(model),
            "dtype": str(model.dtype), "runs": runs}
