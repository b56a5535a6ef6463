"""Decoding with static shapes, one decode step replayed as a CUDA graph.

At small batches a decode step's wall time is the host's (transformers' eager Python, ~1 ms per decoder layer on the
H100, docs/RESULTS_kernels.md), so the GPU time the CQ kernels save does not show. A CUDA graph replays a step's
kernels without the host. That needs every shape and every kernel argument fixed from step to step:

- the cache holds `capacity` token rows from the start: transformers' StaticCache, or a CQCache in static mode
  (CQCache.make_static), whose length lives on the device and whose attention spans all rows;
- the attention mask is one 4D boolean tensor [B, 1, 1, capacity] (True = attend), written in place each step;
- the input token, its position and the step counter are device tensors advanced in place.

StaticDecoder runs the prompt eagerly, then `steps` decode steps (greedy, or sampled: sampling.next_token, which needs
no host synchronisation): all eagerly (`graph=False`, also on the CPU: the
same code path, what the CPU tests check), or two eagerly (the warm-up CUDA graphs require) and the rest as replays of
one captured step.
"""
from __future__ import annotations

import time

import torch

from .config import ConfigError
from .models import cache_kwarg
from .sampling import GREEDY, Sampling, next_token


def static_cache(model, kind: str, capacity: int, codebook=None, window: int | None = None, sinks: int | None = None):
    """A cache for StaticDecoder: "static" (transformers' StaticCache, bf16/fp16 keys and values) or "cq" (CQCache,
    put in static mode after the prompt; `window`, `sinks`: its full-precision recent and first tokens)."""
    if kind == "static":
        from transformers import StaticCache

        return StaticCache(config=model.config, max_cache_len=capacity)
    if kind == "cq":
        from .cache import CQCache

        if codebook is None:
            raise ConfigError("a CQ cache needs a codebook")
        return CQCache(model, codebook, window=window, sinks=sinks, max_length=capacity)
    raise ConfigError(f"cache kind {kind!r} is not allowed; use static or cq")


class StaticDecoder:
    """decoder = StaticDecoder(model, cache, capacity); first = decoder.prefill(ids); tokens = decoder.decode(n).

    `cache`: from static_cache(). `capacity`: prompt + new tokens at least (every row the cache will hold).
    After decode(), `timings` holds the seconds of the steps that ran as graph replays (or, where none did: all steps
    ran eagerly, or only the warm-up ones, the eager steps) and how many, and whether they were replays.
    """

    def __init__(self, model, cache, capacity: int, graph: bool | None = None, chunk: int = 0,
                 sampling: Sampling = GREEDY):
        self.model, self.cache, self.capacity = model, cache, int(capacity)
        self.sampling = sampling
        self.device = next(model.parameters()).device
        self.graph = self.device.type == "cuda" if graph is None else bool(graph)
        if self.graph and self.device.type != "cuda":
            raise ConfigError(f"CUDA graphs need the model on a CUDA GPU (it is on {self.device})")
        self.chunk = int(chunk)
        self.kw = {cache_kwarg(model): cache, "use_cache": True}
        self.length = 0
        self.timings: dict = {}

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt ids [B, P] (eagerly, in chunks of `chunk` tokens if set); returns the first new token [B, 1]
        (greedy or sampled, as `sampling` says). Every row is a whole prompt of P tokens: no padding (the decode mask
        marks rows 0..P-1 held for all)."""
        B, P = ids.shape
        if P + 1 > self.capacity:
            raise ConfigError(f"capacity {self.capacity}: must exceed the prompt's {P} tokens")
        step = self.chunk or P
        for s in range(0, P, step):
            n = min(step, P - s)
            pos = torch.arange(s, s + n, device=self.device).unsqueeze(0).expand(B, n)
            logits = self.model(input_ids=ids[:, s : s + n], position_ids=pos, **self.kw, logits_to_keep=1).logits
        self.length = P
        if hasattr(self.cache, "make_static"):
            self.cache.make_static(self.capacity)
        self.batch = B
        return next_token(logits[:, -1], self.sampling)

    @torch.no_grad()
    def decode(self, first: torch.Tensor, steps: int, warmup: int = 2) -> torch.Tensor:
        """`steps` new tokens [B, steps] (greedy or sampled) after `first` [B, 1] (the token prefill returned, fed as
        the first input)."""
        B, P = self.batch, self.length
        if steps < 1:
            raise ConfigError(f"steps {steps}: must be at least 1")
        if P + steps > self.capacity:
            raise ConfigError(f"capacity {self.capacity}: too small for {P} + {steps} tokens")
        dev = self.device
        ids = first.clone()
        pos = torch.full((B, 1), P, dtype=torch.long, device=dev)
        row = torch.tensor([P], dtype=torch.long, device=dev)  # the new token's row, in the cache and the mask
        mask = torch.zeros(B, 1, 1, self.capacity, dtype=torch.bool, device=dev)
        mask[..., :P] = True
        out = torch.zeros(B, steps, dtype=torch.long, device=dev)
        i = torch.zeros(1, dtype=torch.long, device=dev)

        def step():
            mask.index_fill_(3, row, True)
            logits = self.model(input_ids=ids, position_ids=pos, attention_mask=mask, **self.kw).logits
            nxt = next_token(logits[:, -1], self.sampling)
            out.index_copy_(1, i, nxt)
            ids.copy_(nxt)
            pos.add_(1)
            row.add_(1)
            i.add_(1)

        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        eager = steps if not self.graph else min(warmup, steps)
        sync()
        t0 = time.perf_counter()
        if self.graph:
            side = torch.cuda.Stream(dev)  # warm-up on a side stream, as torch.cuda.graphs asks
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                for _ in range(eager):
                    step()
            torch.cuda.current_stream(dev).wait_stream(side)
        else:
            for _ in range(eager):
                step()
        sync()
        self.timings = {"steps": eager, "seconds": time.perf_counter() - t0, "graph": False}
        replays = steps - eager
        if replays:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                step()
            sync()
            t0 = time.perf_counter()
            for _ in range(replays):
                g.replay()
            sync()
            self.timings = {"steps": replays, "seconds": time.perf_counter() - t0, "graph": True}
            del g
        self.length = P + steps
        if hasattr(self.cache, "sync_static_length"):
            self.cache.sync_static_length()
        return out
