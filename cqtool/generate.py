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


def check_args(prompt: str | None, prompt_file: str | None, max_new_tokens: int,
               prompts_file: str | None = None) -> str | list[str]:
    """The prompt text (from --prompt or --prompt-file), or the prompts of --prompts (a file, one prompt per line, blank
    lines skipped: a list, decoded as one batch); exactly one of the three, else a ConfigError naming what is wrong."""
    from pathlib import Path

    given = [f for f, v in (("--prompt TEXT", prompt), ("--prompt-file FILE", prompt_file), ("--prompts FILE", prompts_file))
             if v is not None]
    if len(given) != 1:
        raise ConfigError("give exactly one of --prompt TEXT, --prompt-file FILE or --prompts FILE"
                          f" (got {' and '.join(given) if given else 'neither'})")
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    for flag, path in (("--prompt-file", prompt_file), ("--prompts", prompts_file)):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{flag} {path!r} does not exist")
    if prompts_file is not None:
        lines = Path(prompts_file).read_text(encoding="utf-8", errors="replace").splitlines()
        prompts = [ln for ln in lines if ln.strip()]
        if not prompts:
            raise ConfigError(f"--prompts {prompts_file!r} has no prompt (one per line)")
        return prompts
    if prompt_file is not None:
        prompt = Path(prompt_file).read_text(encoding="utf-8", errors="replace")
    if not prompt.strip():
        raise ConfigError("the prompt is empty")
    return prompt


@torch.no_grad()
def decode_eager(model, ids: torch.Tensor, cache, max_new_tokens: int, eos: int | None,
                 sampling: Sampling = GREEDY) -> tuple[list[int], float]:
    """Decode `max_new_tokens` tokens (greedy or sampled; stops early at `eos`) with `cache`. Returns (new token ids,
    seconds). One forward per token through the model's own cache argument."""
    out, secs = decode_batch(model, ids, None, cache, max_new_tokens, eos, sampling)
    return out[0], secs


@torch.no_grad()
def decode_batch(model, ids: torch.Tensor, mask: torch.Tensor | None, cache, max_new_tokens: int, eos: int | None,
                 sampling: Sampling = GREEDY) -> tuple[list[list[int]], float]:
    """decode_eager() for a batch of prompts, left-padded: `mask` [B, L] is 1 on prompt tokens, 0 on padding (None: no
    padding), and each row's positions count its own tokens. A row stops at `eos` (the batch runs on while others have
    not, feeding it tokens that are dropped). Sampled rows draw from one generator in batch order. Returns (new token
    ids per row, seconds)."""
    kw = {cache_kwarg(model): cache, "use_cache": True}
    dev = model_device(model)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    B = ids.shape[0]
    sync()
    t0 = time.perf_counter()
    if mask is None:
        pos = None
        logits = model(input_ids=ids, **kw, logits_to_keep=1).logits
    else:
        pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, **kw, logits_to_keep=1).logits
        pos = pos[:, -1:] + 1
    out: list[list[int]] = [[] for _ in range(B)]
    live = [True] * B
    for step in range(max_new_tokens):
        nxt = next_token(logits[:, -1], sampling)  # [B, 1]
        for b, t in enumerate(nxt[:, 0].tolist()):
            if live[b]:
                out[b].append(t)
                live[b] = not (eos is not None and t == eos)
        if not any(live) or step == max_new_tokens - 1:
            break
        if mask is None:
            logits = model(input_ids=nxt, **kw).logits
        else:
            mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
            logits = model(input_ids=nxt, attention_mask=mask, position_ids=pos, **kw).logits
            pos = pos + 1
    sync()
    return out, time.perf_counter() - t0


def decode_graph(model, ids: torch.Tensor, cache, max_new_tokens: int, eos: int | None, graph: bool = True,
                 sampling: Sampling = GREEDY) -> tuple[list[int], float, int]:
    """decode_graph_batch() of one prompt: its new token ids, seconds, graph-replayed steps."""
    out, secs, replays = decode_graph_batch(model, ids, None, cache, max_new_tokens, eos, graph, sampling)
    return out[0], secs, replays


def decode_graph_batch(model, ids: torch.Tensor, mask: torch.Tensor | None, cache, max_new_tokens: int,
                       eos: int | None, graph: bool = True,
                       sampling: Sampling = GREEDY) -> tuple[list[list[int]], float, int]:
    """decode_eager() with static shapes, every decode step after two warm-up steps replayed as a CUDA graph
    (graphs.StaticDecoder; `cache` from graphs.static_cache; graph=False: every step eagerly, the same path on the
    CPU). Always runs `max_new_tokens` steps (a graph cannot stop early), then cuts the tokens after `eos`. Returns
    (new token ids, seconds: prefill, warm-up, capture, replays, the number of steps that were graph replays: 0 for 3
    tokens or fewer). `mask`: a left-padded batch, as decode_batch(); each row is cut after its own `eos`."""
    from .graphs import StaticDecoder
    from .pipeline import sync_all

    sync = sync_all if graph else (lambda: None)
    sync()
    t0 = time.perf_counter()
    dec = StaticDecoder(model, cache, ids.shape[1] + max_new_tokens, graph=graph, sampling=sampling)
    first = dec.prefill(ids, mask)
    toks = first if max_new_tokens == 1 else torch.cat([first, dec.decode(first, max_new_tokens - 1)], 1)
    rows = toks.tolist()
    sync()
    secs = time.perf_counter() - t0
    rows = [r[: r.index(eos) + 1] if eos is not None and eos in r else r for r in rows]
    return rows, secs, dec.timings["steps"] if dec.timings.get("graph") else 0


def prompt_ids(tok, prompt: str, chat: bool) -> list[int]:
    """Token ids of the prompt; `chat`: as the user's turn of the tokenizer's chat template, the assistant's turn
    opened (a ConfigError when the tokenizer has no template)."""
    if not chat:
        return tok(prompt)["input_ids"]
    if not getattr(tok, "chat_template", None):
        raise ConfigError("--chat: this model's tokenizer has no chat template; drop --chat to use the prompt as it is")
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def agreeing(a: list[int], b: list[int]) -> int:
    """How many tokens two decodes share before their first difference."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def batch_ids(tok, prompts: list[str], chat: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts' token ids left-padded to one length [B, L] (the pad token, else end of sequence, else 0: masked
    anyway) and their mask (1 on tokens)."""
    rows = [prompt_ids(tok, p, chat) for p in prompts]
    L = max(len(r) for r in rows)
    pad = next((t for t in (tok.pad_token_id, tok.eos_token_id) if t is not None), 0)
    ids = torch.tensor([[pad] * (L - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def run_generate(model_name: str, codebook_path: str, prompt: str | list[str], max_new_tokens: int = 64,
                 window: int | None = None,
                 sinks: int | None = None, compare: bool = True, device: str = "auto", dtype: str = "auto",
                 device_map: str | None = None, chat: bool = False, graphs: bool = False,
                 sampling: Sampling = GREEDY) -> dict[str, Any]:
    """Load model and codebook, decode with the CQ cache (and with DynamicCache when `compare`), greedily or sampled
    (`sampling`; each run starts from the same seed: sampling.seed, or one drawn here and reported). `graphs`: decode
    steps replayed as CUDA graphs, the CQ cache in static mode and transformers' StaticCache beside it. A list of
    prompts decodes as one left-padded batch (decode_batch, or decode_graph_batch with `graphs`): each run's "outputs"
    hold every prompt's tokens, text and agreement, its "new_tokens" and "tokens_agreeing" their sums."""
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
    batch = isinstance(prompt, list)
    model, tok, info = load_model(model_name, device, dtype, device_map)
    if batch:
        ids, mask = batch_ids(tok, prompt, chat, model_device(model))
    else:
        ids, mask = torch.tensor([prompt_ids(tok, prompt, chat)], device=model_device(model)), None
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
            rows, secs, replays = decode_graph_batch(model, ids, mask, cache, max_new_tokens, eos, sampling=sampling)
        else:
            cache = CQCache(model, cb, window=window, sinks=sinks, max_length=cap) if kind == "cq" else DynamicCache()
            rows, secs = decode_batch(model, ids, mask, cache, max_new_tokens, eos, sampling)
        base = "StaticCache" if graphs else "DynamicCache"
        row = {"cache": cache.config.name if kind == "cq" else f"{base} (full precision)",
               "bits_per_channel": cb.config.bits_per_channel if kind == "cq" else torch.finfo(model.dtype).bits,
               "seconds": secs, "cache_bytes": held_bytes(cache)}
        outputs = [{"token_ids": r, "text": tok.decode(r, skip_special_tokens=True), "new_tokens": len(r)} for r in rows]
        if batch:  # every prompt's tokens; the total over the batch
            row.update(outputs=outputs, new_tokens=sum(o["new_tokens"] for o in outputs))
        else:
            row.update(outputs[0])
        # a graph runs every step even past the end-of-sequence token: tokens/s counts the steps it ran
        row["tokens_per_s"] = (len(rows) * max_new_tokens if graphs else row["new_tokens"]) / secs
        if graphs:
            row["graph_replays"] = replays
        if kind == "cq":
            row.update(window=cache.config.window, sinks=cache.config.sinks, backends=dict(ops.BACKEND_USED),
                       attention_kernels=sorted(ops.KERNELS_RUN))
        runs.append(row)
        del cache
    if compare:  # new tokens equal to the full-precision ones before the first difference
        if batch:
            for o, f in zip(runs[0]["outputs"], runs[1]["outputs"]):
                o["tokens_agreeing"] = agreeing(o["token_ids"], f["token_ids"])
            runs[0]["tokens_agreeing"] = sum(o["tokens_agreeing"] for o in runs[0]["outputs"])
        else:
            runs[0]["tokens_agreeing"] = agreeing(runs[0]["token_ids"], runs[1]["token_ids"])
    head = ({"prompts": prompt, "prompt_tokens": mask.sum(1).tolist()} if batch else
            {"prompt": prompt, "prompt_tokens": int(ids.shape[1])})
    return {"model": info.__dict__, "codebook": str(codebook_path), **head, "chat": chat,
            "cuda_graphs": graphs, "decoding": sampling.describe(),
            "sampling": dataclasses.asdict(sampling),
            "max_new_tokens": max_new_tokens, "device": str(model_device(model)), "devices": model_devices(model),
            "dtype": str(model.dtype), "runs": runs}
