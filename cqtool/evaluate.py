"""`cqtool eval`: perplexity on WikiText-2 (token and word level) and lm-eval tasks, for each KV method."""
from __future__ import annotations

import math
import time
from typing import Any

import torch

from .data import eval_windows, load_text, tokenize
from .methods import KVMethod
from .models import model_device


@torch.no_grad()
def perplexity(model, tokenizer, text: str, method: KVMethod, seqlen: int = 2048, limit: int | None = None,
               batch_size: int = 1, progress=None) -> dict[str, Any]:
    """Non-overlapping `seqlen` windows; every window starts with an empty cache of `method`.

    Token perplexity = exp(mean NLL over predicted tokens). Word perplexity = exp(total NLL / words), words
    counted by whitespace in the evaluated windows' text (as lm-eval's wikitext task counts them).
    """
    track = progress or (lambda it, **kw: it)
    tokens = tokenize(tokenizer, text)
    windows = eval_windows(tokens, seqlen, limit)
    dev = model_device(model)
    nll, count, t0 = 0.0, 0, time.time()
    batches = list(windows.split(batch_size))
    for batch in track(batches, description=f"ppl {method.name}"):
        ids = batch.to(dev)
        cache = method.make_cache(model)
        kw = {"past_key_values": cache, "use_cache": True} if cache is not None else {"use_cache": False}
        logits = model(input_ids=ids, **kw).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                 reduction="sum")
        nll += float(loss)
        count += ids[:, 1:].numel()
        del cache, logits
    words = len(tokenizer.decode(windows.reshape(-1)).split())
    return {"perplexity": math.exp(nll / count), "word_perplexity": math.exp(nll / max(1, words)),
            "nll_per_token": nll / count, "tokens": count, "windows": int(windows.shape[0]), "words": words,
            "seconds": time.time() - t0}


def wikitext_text(data_dir: str | None) -> str:
    """WikiText-2 raw test: `<data_dir>/wikitext-2-raw/wiki.test.raw` (or any file/folder given), else the hub."""
    from pathlib import Path

    if data_dir:
        d = Path(data_dir)
        for cand in (d / "wikitext-2-raw" / "wiki.test.raw", d / "wiki.test.raw", d):
            if cand.is_file():
                return load_text(str(cand))
    return load_text("wikitext2-test")
