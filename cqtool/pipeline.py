"""Micro-batches pipelined over the GPUs of a model split by layers.

A model dispatched over GPUs by layers (accelerate's `device_map`) runs them one after the other: while the last GPU
works on a decode step, the first waits for the step's token. Cut the batch into micro-batches, each with its own
cache, and the first GPU can run micro-batch 2's layers while the second runs micro-batch 1's; with at least as many
micro-batches as GPUs every GPU can stay busy, so a second GPU adds throughput, not only memory.

That needs a CUDA stream per micro-batch on every GPU. torch orders a copy between two GPUs after the work queued on
both GPUs' current streams (the destination's stream is recorded and the source's made to wait, then the reverse).
With one stream per GPU, micro-batch 2's hidden states could not leave GPU 0 before micro-batch 1's layers on GPU 1
were done, and GPU 0's stream would wait with them; on its own pair of streams a micro-batch is ordered only against
itself. The token each micro-batch picks is copied to the first GPU at once, in its own streams, so the next step's
embedding waits for nothing else.

Fill micro-batch m's cache inside `with pipe.on(m)` (after fork()), so that every tensor it holds belongs to m's
streams. A decode step frees tensors (DynamicCache regrows by torch.cat, the CQ cache grows its buffers) at the time
the host queues it; the caching allocator keeps a freed block from other use only on the stream that allocated it,
and near the memory cap it unmaps cached blocks after waiting for that stream alone. A cache filled on the default
stream and freed from a micro-batch stream was unmapped while that stream still read it: an illegal address.
Likewise, after decode() wait for the GPUs (or record_stream) before dropping the caches on another stream's watch.
"""
from __future__ import annotations

import contextlib

import torch

from .config import ConfigError
from .models import cache_kwarg, model_devices


def sync_all() -> None:
    """Wait for every visible GPU (a model may be spread over several); nothing without CUDA."""
    for d in range(torch.cuda.device_count()):
        torch.cuda.synchronize(d)


def split_batch(batch: int, parts: int) -> list[slice]:
    """Contiguous row ranges of near-equal size (the first ones one row longer), e.g. 5 rows in 2: [0:3], [3:5]."""
    if parts < 1 or parts > batch:
        raise ConfigError(f"{parts} micro-batches of a batch of {batch}: must be between 1 and the batch")
    base, extra = divmod(batch, parts)
    out, start = [], 0
    for i in range(parts):
        n = base + (i < extra)
        out.append(slice(start, start + n))
        start += n
    return out


class MicroBatches:
    """A CUDA stream per (micro-batch, GPU) for a model spread over GPUs; decode() runs greedy steps of several
    micro-batches, each with its own cache, in turn on their own streams."""

    def __init__(self, model, parts: int):
        if parts < 1:
            raise ConfigError(f"{parts} micro-batches: must be at least 1")
        self.model = model
        self.devices = [torch.device(d) for d in model_devices(model) if d.startswith("cuda")]  # in index order
        if not self.devices:
            raise ConfigError(f"{parts} micro-batches: micro-batch pipelining needs the model on CUDA GPUs; it is on "
                              f"{', '.join(model_devices(model))} (use 1)")
        self.first = model.get_input_embeddings().weight.device  # where the next step's tokens are needed
        self.streams = [{d: torch.cuda.Stream(device=d) for d in self.devices} for _ in range(parts)]

    @property
    def parts(self) -> int:
        return len(self.streams)

    @contextlib.contextmanager
    def on(self, m: int):
        """Micro-batch m's streams are the current streams of every GPU; the current device stays the same."""
        dev = torch.cuda.current_device()
        with contextlib.ExitStack() as stack:
            for s in self.streams[m].values():
                stack.enter_context(torch.cuda.stream(s))  # also makes s's GPU the current device
            torch.cuda.set_device(dev)
            yield  # leaving the stream contexts restores the device as well

    def fork(self) -> None:
        """Every micro-batch stream waits for the work already queued on its GPU's current stream (the prefill)."""
        for per in self.streams:
            for d, s in per.items():
                s.wait_stream(torch.cuda.current_stream(d))

    def join(self) -> None:
        """Every GPU's current stream waits for the micro-batch streams on it."""
        for per in self.streams:
            for d, s in per.items():
                torch.cuda.current_stream(d).wait_stream(s)

    @torch.no_grad()
    def decode(self, caches: list, tokens: list[torch.Tensor], steps: int) -> list[torch.Tensor]:
        """`steps` greedy steps of each micro-batch: caches[m] holds micro-batch m's prompt (filled under on(m)),
        tokens[m] [B_m, 1] its next input tokens. Returns each micro-batch's generated tokens [B_m, steps] on the first GPU. Queues the work
        and returns without waiting for it (join() has run: a sync of the GPUs, or work on their current streams,
        waits for it)."""
        if len(caches) != self.parts or len(tokens) != self.parts:
            raise ConfigError(f"{len(caches)} caches and {len(tokens)} token tensors for {self.parts} micro-batches")
        key = cache_kwarg(self.model)
        self.fork()
        toks = []
        for m, t in enumerate(tokens):
            with self.on(m):
                toks.append(t.to(self.first))
            if t.device in self.streams[m]:  # read on m's streams: not to be reused before they have
                t.record_stream(self.streams[m][t.device])
        out: list[list[torch.Tensor]] = [[] for _ in caches]
        for _ in range(steps):
            for m, cache in enumerate(caches):
                with self.on(m):
                    logits = self.model(input_ids=toks[m], **{key: cache}, use_cache=True).logits
                    toks[m] = logits[:, -1:].argmax(-1).to(self.first)
                    out[m].append(toks[m])
        res = []
        for m, seq in enumerate(out):  # each micro-batch's tokens joined on its own streams, where they were made
            with self.on(m):
                res.append(torch.cat(seq, 1) if seq else toks[m][:, :0].clone())
        self.join()
        for t in res:  # the caller uses and frees them on the current streams: not to be reused before those have
            t.record_stream(torch.cuda.current_stream(t.device))
        return res


def micro_batch_cache(method, model):
    """A fresh cache of KV method `method` for one forward on a micro-batch's streams; for a method without one, an
    empty DynamicCache: without a cache or mask transformers checks for packed sequences by reading the positions on
    the host, a sync per forward that would stall the other micro-batches; with an empty cache it does not."""
    cache = method.make_cache(model)
    if cache is None:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
    return cache


def shared_pipeline(model, parts: int) -> MicroBatches:
    """One MicroBatches per (model, parts), kept on the model: every call runs on the same streams, so what is cached
    per stream (the caching allocator's blocks, cuBLAS workspaces, the kernels' scratch) carries over from one call
    (an untimed pass, the previous method of an eval) to the next instead of starting cold."""
    memo = model.__dict__.setdefault("_cq_micro_batches", {})
    if parts not in memo:
        memo[parts] = MicroBatches(model, parts)
    return memo[parts]
