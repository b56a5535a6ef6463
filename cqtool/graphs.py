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

A model spread over several GPUs (accelerate's dispatch: `device_map`) cannot be captured as one graph: torch captures
on one device, and a copy between GPUs inside a capture is refused. Its step is captured as one graph per run of
blocks on one GPU (_GraphPerDevice): at the first block of each run the capture of the previous GPU ends, the tensors
the block receives from another GPU (hidden states, mask, RoPE tables, position ids) and the cache's cross-GPU state
(CQCache.replica_pairs) get copies on the new GPU, and the capture of the new GPU begins. A replay runs the graphs in
order with those copies between them; the last graph, on the first GPU, picks the token and feeds it back: a
handful of host calls per step instead of one.
"""
from __future__ import annotations

import contextlib
import time

import torch

from .config import ConfigError
from .models import cache_kwarg
from .pipeline import shared_pipeline, sync_all
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


def dispatched_blocks(model) -> list[tuple[torch.nn.Module, torch.device]]:
    """The blocks of a model dispatched over devices by accelerate (`model.hf_device_map`) with their devices; []
    for a model on one device."""
    dm = getattr(model, "hf_device_map", None) or {}
    if len({str(d) for d in dm.values()}) < 2:
        return []
    blocks = []
    for name, d in dm.items():
        dev = torch.device("cuda", d) if isinstance(d, int) else torch.device(d)
        if dev.type != "cuda":
            raise ConfigError(f"CUDA graphs need every block on a GPU (device_map puts {name or 'the model'} on {d})")
        blocks.append((model.get_submodule(name), dev))
    return blocks


class _GraphPerDevice:
    """Captures one forward of a model spread over GPUs as one CUDA graph per run of blocks on one GPU (see the top
    of this file). begin(device) starts the first capture; forward pre-hooks on the blocks switch GPUs; end() closes
    the last. replay() runs them all with the copies between them."""

    def __init__(self, blocks, streams: dict, extra_pairs):
        self.streams = streams  # a capture stream per GPU (the warm-up ran on them too)
        self.extra_pairs = extra_pairs  # device -> [(source, copy)] of state the blocks read outside their arguments
        self.segments: list[dict] = []
        self.cur: torch.device | None = None
        self.memo: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._ctx: contextlib.ExitStack | None = None
        self.handles = [m.register_forward_pre_hook(self._hook(d), with_kwargs=True) for m, d in blocks]

    def begin(self, device, pairs=()) -> None:
        ctx = contextlib.ExitStack()
        ctx.enter_context(torch.cuda.device(device))
        ctx.enter_context(torch.cuda.stream(self.streams[device]))
        g = torch.cuda.CUDAGraph()
        self.segments.append({"device": device, "graph": g, "pairs": list(pairs)})
        self.cur, self._ctx = device, ctx
        g.capture_begin()

    def end(self) -> None:
        self.segments[-1]["graph"].capture_end()
        self._ctx.close()
        self.cur = self._ctx = None

    def _move(self, x, device, pairs: list | None):
        """x with every tensor on another device replaced by its copy on `device` (made now where `pairs` is a list,
        between two captures; else it must exist already: inside a capture no copy across GPUs can be made)."""
        if isinstance(x, torch.Tensor):
            if x.device == device:
                return x
            hit = self.memo.get(id(x))
            if hit is None:
                if pairs is None:
                    raise RuntimeError(f"CUDA graphs over several GPUs: a block on {device} got a new tensor from "
                                       f"{x.device} in the middle of its GPU's run of blocks; only a run's first block "
                                       "may take inputs from another GPU")
                hit = self.memo[id(x)] = (x, torch.empty_like(x, device=device))
                pairs.append(hit)
            return hit[1]
        if isinstance(x, tuple):
            return tuple(self._move(v, device, pairs) for v in x)
        if isinstance(x, list):
            return [self._move(v, device, pairs) for v in x]
        if isinstance(x, dict):
            return {k: self._move(v, device, pairs) for k, v in x.items()}
        return x

    def _hook(self, device):
        def hook(module, args, kwargs):
            if self.cur is None:  # not capturing: the eager steps
                return None
            if device == self.cur:
                return self._move((args, kwargs), device, None)
            self.end()
            self.memo = {}
            pairs = list(self.extra_pairs(device))
            moved = self._move((args, kwargs), device, pairs)
            self.begin(device, pairs)
            return moved

        return hook

    def replay(self) -> None:
        for seg in self.segments:
            for src, dst in seg["pairs"]:
                dst.copy_(src)
            seg["graph"].replay()

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


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
        self.blocks = dispatched_blocks(model) if self.graph else []  # a model spread over GPUs: a graph per GPU
        self.length = 0
        self.prompt_mask: torch.Tensor | None = None  # [B, P] bool of a left-padded batch (prefill's mask)
        self.timings: dict = {}

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the prompt ids [B, P] (eagerly, in chunks of `chunk` tokens if set); returns the first new token [B, 1]
        (greedy or sampled, as `sampling` says). `mask` [B, P]: 1 on prompt tokens, 0 on left padding, each row's
        positions counting its own tokens (None: every row a whole prompt of P tokens); the decode mask holds it."""
        B, P = ids.shape
        if P + 1 > self.capacity:
            raise ConfigError(f"capacity {self.capacity}: must exceed the prompt's {P} tokens")
        keep = None if mask is None else mask.to(device=self.device, dtype=torch.bool)
        allpos = None if keep is None else (keep.long().cumsum(-1) - 1).clamp_min(0)
        step = self.chunk or P
        for s in range(0, P, step):
            n = min(step, P - s)
            if keep is None:
                pos, extra = torch.arange(s, s + n, device=self.device).unsqueeze(0).expand(B, n), {}
            else:
                pos, extra = allpos[:, s : s + n], {"attention_mask": keep[:, : s + n].long()}
            logits = self.model(input_ids=ids[:, s : s + n], position_ids=pos, **extra, **self.kw,
                                logits_to_keep=1).logits
        self.length = P
        self.prompt_mask = keep
        if hasattr(self.cache, "make_static"):
            self.cache.make_static(self.capacity)
        self.batch = B
        return next_token(logits[:, -1], self.sampling)

    @torch.no_grad()
    def decode(self, first: torch.Tensor, steps: int, warmup: int = 2) -> torch.Tensor:
        """`steps` new tokens [B, steps] (greedy or sampled) after `first` [B, 1] (the token prefill returned, fed as
        the first input)."""
        P = self.length
        if steps < 1:
            raise ConfigError(f"steps {steps}: must be at least 1")
        if P + steps > self.capacity:
            raise ConfigError(f"capacity {self.capacity}: too small for {P} + {steps} tokens")
        if self.blocks:
            return self._decode_spread(first, steps, warmup)
        dev = self.device
        mask, feed = self._step_inputs(first, steps)

        def step():
            mask.index_fill_(3, feed.row, True)
            feed(self.model(input_ids=feed.ids, position_ids=feed.pos, attention_mask=mask, **self.kw).logits[:, -1])

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
            with torch.cuda.graph(g, stream=side):  # the warm-up's stream: the kernels' workspace is per stream
                step()
            sync()
            t0 = time.perf_counter()
            for _ in range(replays):
                g.replay()
            sync()
            self.timings = {"steps": replays, "seconds": time.perf_counter() - t0, "graph": True}
            del g
        self._finish(steps)
        return feed.out

    def _step_inputs(self, first: torch.Tensor, steps: int) -> tuple[torch.Tensor, "_Feed"]:
        """The buffers a decode step reads and advances in place, on the model's first device: the 4D mask [B, 1, 1,
        capacity] (the rows held so far, the prompt's padding left out), and the _Feed that holds the input token, its
        position (per row: the tokens it holds) and row, and writes the new tokens to its `out` [B, steps]."""
        B, P, dev = self.batch, self.length, self.device
        mask = torch.zeros(B, 1, 1, self.capacity, dtype=torch.bool, device=dev)
        if self.prompt_mask is None:
            mask[..., :P] = True
            pos = torch.full((B, 1), P, dtype=torch.long, device=dev)
        else:
            mask[:, 0, 0, :P] = self.prompt_mask
            pos = self.prompt_mask.long().sum(1, keepdim=True)
        row = torch.tensor([P], dtype=torch.long, device=dev)  # the new token's row, in the cache and the mask
        out = torch.zeros(B, steps, dtype=torch.long, device=dev)
        return mask, _Feed(first.clone(), pos, row, out, self.sampling)

    def _finish(self, steps: int) -> None:
        """After `steps` decode steps: the host's count of cached tokens (a replayed graph advances only the device's)."""
        self.length += steps
        if hasattr(self.cache, "sync_static_length"):
            self.cache.sync_static_length()

    def _decode_spread(self, first: torch.Tensor, steps: int, warmup: int) -> torch.Tensor:
        """decode() for a model spread over GPUs: the step runs the decoder and the LM head (not the top-level
        forward, whose accelerate hook would copy the logits back to the first GPU inside the last capture), then a
        _Feed block on the first GPU, where the eager forward returns the logits: it picks the token there (from that
        GPU's random numbers, as the eager decode does) and feeds it back. Replays are _GraphPerDevice's graphs."""
        dev = self.device
        decoder, head = self.model.get_decoder(), self.model.get_output_embeddings()
        kw = {cache_kwarg(decoder): self.cache, "use_cache": True}
        mask, feed = self._step_inputs(first, steps)
        blocks = self.blocks + [(feed, dev)]
        devices = list(dict.fromkeys(d for _, d in blocks))

        def step() -> None:
            mask.index_fill_(3, feed.row, True)
            hidden = decoder(input_ids=feed.ids, position_ids=feed.pos, attention_mask=mask, **kw).last_hidden_state
            feed(head(hidden[:, -1:])[:, -1])

        pipe = shared_pipeline(self.model, 1)  # a stream per GPU: the warm-up runs on the streams the captures use
        streams = pipe.streams[0]
        eager = min(warmup, steps)
        sync_all()
        t0 = time.perf_counter()
        pipe.fork()
        with pipe.on(0), torch.cuda.device(dev):
            for _ in range(eager):
                step()
        pipe.join()
        sync_all()
        self.timings = {"steps": eager, "seconds": time.perf_counter() - t0, "graph": False, "gpus": len(devices)}
        replays = steps - eager
        if replays:
            cap = _GraphPerDevice(blocks, streams, getattr(self.cache, "replica_pairs", lambda d: []))
            try:
                sync_all()
                try:
                    cap.begin(dev)
                    step()
                    cap.end()
                except BaseException:
                    if cap.cur is not None:  # end the broken capture; the error that broke it is the one to report
                        with contextlib.suppress(Exception):
                            cap.end()
                    raise
                finally:
                    cap.close()
                sync_all()
                t0 = time.perf_counter()
                for _ in range(replays):
                    cap.replay()
                sync_all()
                self.timings = {"steps": replays, "seconds": time.perf_counter() - t0, "graph": True,
                                "gpus": len(devices), "graphs_per_step": len(cap.segments)}
            finally:
                if hasattr(self.cache, "drop_replicas"):  # eager steps copy across GPUs themselves again
                    self.cache.drop_replicas()
            del cap
        self._finish(steps)
        return feed.out


class _Feed(torch.nn.Module):
    """The end of a decode step: the next token from the logits (moved to the first GPU, where the eager forward
    returns them), written to `out`, fed back as the next input; position and row advanced. A module so that, for a
    model spread over GPUs, it is a block of its own on the first GPU (StaticDecoder._decode_spread)."""

    def __init__(self, ids, pos, row, out, sampling: Sampling):
        super().__init__()
        self.ids, self.pos, self.row, self.out, self.sampling = ids, pos, row, out, sampling
        self.i = torch.zeros(1, dtype=torch.long, device=out.device)

    def forward(self, logits: torch.Tensor) -> None:
        nxt = next_token(logits.to(self.out.device), self.sampling)
        self.out.index_copy_(1, self.i, nxt)
        self.i.add_(1)
        self.ids.copy_(nxt)
        self.pos.add_(1)
        self.row.add_(1)
