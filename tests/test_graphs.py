"""Static decoding (cqtool/graphs.py): the code path CUDA graphs replay, run eagerly on the CPU, against the dynamic
caches' greedy tokens. The graph capture itself runs in tests/test_kernels.py (CUDA)."""
import pytest
import torch

from cqtool import ops
from cqtool.cache import CQCache
from cqtool.config import ConfigError
from cqtool.graphs import StaticDecoder, static_cache
from cqtool.models import ModelInfo, cache_kwarg

from conftest import tiny_model
from test_codebook import make_codebook

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


@torch.no_grad()
def greedy(model, cache, ids, steps):
    """Greedy tokens [B, steps] with a growing cache (transformers' own decode loop, one token per forward)."""
    kw = {cache_kwarg(model): cache, "use_cache": True}
    tok = model(input_ids=ids, **kw).logits[:, -1:].argmax(-1)
    out = [tok]
    for _ in range(steps - 1):  # the last token is produced, not fed back
        tok = model(input_ids=tok, **kw).logits[:, -1:].argmax(-1)
        out.append(tok)
    return torch.cat(out, 1)


def static_greedy(model, cache, ids, steps, capacity, chunk=0):
    dec = StaticDecoder(model, cache, capacity, graph=False, chunk=chunk)
    first = dec.prefill(ids)
    return torch.cat([first, dec.decode(first, steps - 1)], 1), dec


# (family, window, sinks): the prompt is 21 tokens and 8 more are fed back (29): a window shorter than the prompt,
# one longer that the decode steps fill and wrap (24), one never filled (32), sinks alone and with a window
STATIC_CASES = [(f, 0, 0) for f in FAMILIES] + [("llama", 8, 0), ("qwen2", 24, 2), ("llama", 32, 0), ("mistral", 0, 3),
                                                 ("qwen3", 8, 2)]


@pytest.mark.parametrize("family,window,sinks", STATIC_CASES)
def test_static_cq_decode_equals_the_growing_cache(family, window, sinks):
    """A CQ cache in static mode (codes at device-side rows, attention over every row under the 4D mask; a
    full-precision window as a ring of `window` rows, the sinks fixed) gives the tokens and cached codes of the
    ordinary CQ cache; the spare capacity rows change nothing."""
    model = tiny_model(family)
    cb = make_codebook(ModelInfo.from_config(model.config, "tiny"))
    ids = torch.randint(0, 512, (3, 21), generator=torch.Generator().manual_seed(1))
    ref_cache = CQCache(model, cb, window=window, sinks=sinks)
    ref = greedy(model, ref_cache, ids, 9)
    cache = static_cache(model, "cq", 40, cb, window=window, sinks=sinks)
    got, dec = static_greedy(model, cache, ids, 9, capacity=40, chunk=8)
    assert torch.equal(got, ref)
    n = 21 + 8  # the last token is produced, not yet fed back
    assert dec.length == n and cache.get_seq_length() == n and cache.layers[0].k_codes.shape[2] == 40
    assert dec.timings["steps"] == 8 and dec.timings["graph"] is False and dec.timings["seconds"] > 0
    for a, b in zip(cache.layers, ref_cache.layers):
        assert torch.equal(a.k_codes[:, :, :n], b.k_codes[:, :, :n]) and torch.equal(a.v_codes[:, :, :n], b.v_codes[:, :, :n])
        assert a.static and a.length == n
    assert int(cache.static_length) == n
    assert torch.equal(cache.positions[:, :n], ref_cache.positions)
    if window <= n:  # (a ring of more rows than tokens holds its empty rows too)
        assert cache.memory_bytes() == ref_cache.memory_bytes()
    if window:  # the ring holds the last `window` tokens' keys, token j at row j % window (to fp32 rounding: the
        # layers before computed them through the static path's masked attention)
        for a, b in zip(cache.layers, ref_cache.layers):
            w = b.win_k.shape[2]
            torch.testing.assert_close(a.win_k[:, :, torch.arange(n - w, n) % window], b.win_k, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(a.win_v[:, :, torch.arange(n - w, n) % window], b.win_v, rtol=1e-4, atol=1e-5)


def test_static_cache_baseline_equals_dynamic_cache():
    """The full-precision baseline of a graph run (transformers' StaticCache through the same decoder) gives
    DynamicCache's greedy tokens."""
    from transformers import DynamicCache

    model = tiny_model("llama")
    ids = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(2))
    ref = greedy(model, DynamicCache(), ids, 10)
    got, _ = static_greedy(model, static_cache(model, "static", 32), ids, 10, capacity=32)
    assert torch.equal(got, ref)


def test_static_mode_mask_is_what_attention_reads():
    """The static view spans every row: a mask that hides a held token changes the logits (the mask is honoured,
    not replaced by the length)."""
    model = tiny_model("llama")
    cb = make_codebook(ModelInfo.from_config(model.config, "tiny"))
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(3))
    kw = lambda c: {cache_kwarg(model): c, "use_cache": True}  # noqa: E731
    outs = []
    for hide in (None, 3):
        cache = CQCache(model, cb)
        with torch.no_grad():
            model(input_ids=ids, **kw(cache))
            cache.make_static(16)
            mask = torch.zeros(1, 1, 1, 16, dtype=torch.bool)
            mask[..., :13] = True
            if hide is not None:
                mask[..., hide] = False
            outs.append(model(input_ids=ids[:, :1], position_ids=torch.tensor([[12]]), attention_mask=mask,
                              **kw(cache)).logits)
    assert not torch.allclose(outs[0], outs[1])
    # without the mask a static cache cannot tell held rows from spare ones: an error, not attention over both
    with torch.no_grad(), pytest.raises(ConfigError, match="needs the 4D attention mask"):
        model(input_ids=ids[:, :1], position_ids=torch.tensor([[13]]), **kw(cache))


def test_static_mode_errors():
    from test_codebook import make_codebook as mk

    model = tiny_model("llama")
    cb = mk(ModelInfo.from_config(model.config, "tiny"))
    with pytest.raises(ConfigError, match="run the prompt through the model first"):
        CQCache(model, cb).make_static(8)
    cache = CQCache(model, cb, window=4, sinks=6)
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 5, dtype=torch.long), **{cache_kwarg(model): cache}, use_cache=True)
    with pytest.raises(ConfigError, match="with 6 sinks needs a prompt of at least 6 tokens \\(got 5\\)"):
        cache.make_static(16)
    dec = StaticDecoder(model, static_cache(model, "cq", 8, cb), 8, graph=False)
    with pytest.raises(ConfigError, match="capacity 8: must exceed the prompt's 8 tokens"):
        dec.prefill(torch.zeros(1, 8, dtype=torch.long))
    first = dec.prefill(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ConfigError, match="capacity 8: too small for 5 \\+ 4 tokens"):
        dec.decode(first, 4)
    with pytest.raises(ConfigError, match="CUDA graphs need the model on a CUDA GPU"):
        StaticDecoder(model, static_cache(model, "static", 8), 8, graph=True)
    with pytest.raises(ConfigError, match="cache kind 'dense' is not allowed"):
        static_cache(model, "dense", 8)


# ---------------------------------------------------------------- CUDA: the captured graph

def _cuda_model(kv_heads: int, layers: int = 2, dtype=torch.bfloat16, head_dim: int = 128):
    model = tiny_model("llama", layers=layers, heads=4, kv_heads=kv_heads, head_dim=head_dim)
    return model.to("cuda", dtype).eval()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kv_heads,window", [(4, 0), (1, 16)])
def test_graph_replay_of_a_padded_batch(kv_heads, window):
    """A left-padded batch (cqtool generate --prompts --cuda-graphs): the steps replayed as a CUDA graph give, token for
    token, the same static decode run eagerly, on the CUDA kernels; CQ and StaticCache."""
    from cqtool.config import QuantSpec
    from cqtool.generate import decode_graph_batch

    model = _cuda_model(kv_heads)
    cb = make_codebook(ModelInfo.from_config(model.config, "tiny"), QuantSpec(8, 8))
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (30, 7, 41)]
    L, new = max(map(len, prompts)), 12
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts], device="cuda")
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts], device="cuda")
    for kind in ("cq", "static"):
        runs = []
        for graph in (False, True):
            ops.BACKEND_USED.clear()
            cache = static_cache(model, kind, L + new, cb, window)
            rows, _, replays = decode_graph_batch(model, ids, mask, cache, new, None, graph=graph)
            assert replays == (new - 3 if graph else 0)
            runs.append(rows)
        assert runs[0] == runs[1] and all(len(r) == new for r in runs[0]), kind
        if kind == "cq":
            assert ops.BACKEND_USED == {"encode": "cuda", "attention": "cuda"}, ops.BACKEND_USED


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# MHA (tensor-core decode kernel) and a GQA group of 4; with a full-precision window (a ring in static mode) shorter
# than the prompt, and one the steps fill and wrap (37 + 13 > 48), with and without sinks
@pytest.mark.parametrize("kv_heads,window,sinks", [(4, 0, 0), (1, 0, 0), (4, 16, 4), (1, 48, 0)])
def test_graph_replay_equals_eager_static_decode(kv_heads, window, sinks):
    """A decode step captured as a CUDA graph and replayed gives, token for token, what the same static decode
    gives eagerly; the attention and encode of both ran on the CUDA kernels; the step's logits equal the growing
    cache's to bf16 rounding."""
    from cqtool import ops
    from cqtool.config import QuantSpec

    model = _cuda_model(kv_heads)
    cb = make_codebook(ModelInfo.from_config(model.config, "tiny"), QuantSpec(8, 8))
    ids = torch.randint(0, 512, (3, 37), generator=torch.Generator().manual_seed(4)).cuda()
    eager, _ = static_greedy(model, static_cache(model, "cq", 64, cb, window, sinks), ids, 14, capacity=64)
    ops.BACKEND_USED.clear()
    ops.KERNEL_USED.clear()
    cache = static_cache(model, "cq", 64, cb, window, sinks)
    dec = StaticDecoder(model, cache, 64, graph=True)
    first = dec.prefill(ids)
    got = torch.cat([first, dec.decode(first, 13)], 1)
    assert dec.timings["graph"] and dec.timings["steps"] == 11
    assert torch.equal(got, eager)
    assert ops.BACKEND_USED == {"encode": "cuda", "attention": "cuda"}, ops.BACKEND_USED
    assert ops.KERNEL_USED["attention"].startswith("decode"), ops.KERNEL_USED
    assert cache.get_seq_length() == 37 + 13 and int(cache.static_length) == 50
    # one step of the static cache (all 64 rows, masked) against the growing cache, same tokens
    grow = CQCache(model, cb, window=window, sinks=sinks)
    kw = lambda c: {cache_kwarg(model): c, "use_cache": True}  # noqa: E731
    with torch.no_grad():
        model(input_ids=ids, **kw(grow))
        a = model(input_ids=first, **kw(grow)).logits.float()
        st = static_cache(model, "cq", 64, cb, window, sinks)
        StaticDecoder(model, st, 64, graph=False).prefill(ids)
        mask = torch.zeros(3, 1, 1, 64, dtype=torch.bool, device="cuda")
        mask[..., :38] = True
        b = model(input_ids=first, position_ids=torch.full((3, 1), 37, device="cuda"), attention_mask=mask,
                  **kw(st)).logits.float()
    assert float((a - b).norm() / a.norm()) < 2e-2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kv_heads,window,sinks,kernel,dtype", [
    (4, 16, 0, "tensor-core", torch.bfloat16), (4, 48, 4, "tensor-core", torch.bfloat16),
    (4, 0, 4, "tensor-core", torch.float16), (1, 16, 4, "tensor-core", torch.bfloat16),
    (1, 64, 0, "tensor-core", torch.float16), (2, 7, 0, "tensor-core", torch.bfloat16),
    (4, 16, 4, "cuda-core", torch.bfloat16), (1, 48, 0, "cuda-core", torch.float16), (2, 1, 1, "cuda-core", torch.bfloat16),
    (2, 16, 2, "cuda-core-d64", torch.float16), (4, 48, 0, "cuda-core-d64", torch.bfloat16)])  # head_dim 64
def test_static_window_kernels_vs_reference(monkeypatch, kv_heads, window, sinks, kernel, dtype):
    """Static decoding with a full-precision window (a ring of `window` rows, read at the query's row that the device
    holds) and sinks, through the decode kernels (the tensor-core kernel and its full-precision split, or the CUDA-core
    kernel) against the PyTorch reference on the same static cache: 12 teacher-forced steps after a 37-token prompt,
    windows shorter than the prompt, filled and wrapped by the steps (48), never filled (64), of 1 and 7 rows; MHA and
    GQA groups of 2 and 4; bf16 and fp16; head_dim 128 and 64 (the CUDA-core kernel)."""
    from cqtool import ops
    from cqtool.config import QuantSpec

    head_dim = 64 if kernel.endswith("-d64") else 128
    kernel = kernel.removesuffix("-d64")
    monkeypatch.setattr(ops, "DECODE_KERNEL", kernel)
    model = _cuda_model(kv_heads, dtype=dtype, head_dim=head_dim)
    cb = make_codebook(ModelInfo.from_config(model.config, "tiny"), QuantSpec(8, 8))
    ids = torch.randint(0, 512, (3, 49), generator=torch.Generator().manual_seed(12)).cuda()
    kw = lambda c: {cache_kwarg(model): c, "use_cache": True}  # noqa: E731

    def run():
        cache = static_cache(model, "cq", 64, cb, window, sinks)
        StaticDecoder(model, cache, 64, graph=False).prefill(ids[:, :37])
        mask = torch.zeros(3, 1, 1, 64, dtype=torch.bool, device="cuda")
        mask[..., :37] = True
        out, kernels = [], set()
        with torch.no_grad():
            for t in range(37, 49):
                mask[..., t] = True
                out.append(model(input_ids=ids[:, t : t + 1], position_ids=torch.full((3, 1), t, device="cuda"),
                                 attention_mask=mask, **kw(cache)).logits.float())
                kernels.add(ops.KERNEL_USED.get("attention"))
        assert cache.get_seq_length() == 49
        return torch.cat(out, 1), kernels

    def run_growing():  # the same tokens through the ordinary cache (window kept by position, not as a ring)
        cache = CQCache(model, cb, window=window, sinks=sinks)
        with torch.no_grad():
            model(input_ids=ids[:, :37], **kw(cache))
            return torch.cat([model(input_ids=ids[:, t : t + 1], **kw(cache)).logits.float() for t in range(37, 49)], 1)

    ops.KERNEL_USED.clear()
    got, kernels = run()
    want = {"cuda-core": "decode", "tensor-core": "decode-mma" if kv_heads == 4 else "decode-mma-gqa"}[kernel]
    assert kernels == {want}, kernels
    assert ops.BACKEND_USED["attention"] == "cuda"
    grow = run_growing()
    assert ops.KERNEL_USED["attention"] == want
    monkeypatch.setattr(ops, "get_module", lambda: None)
    ref, _ = run()
    assert ops.BACKEND_USED["attention"] == "reference"
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    # the same kernels over the same codes and full-precision keys: bf16/fp16 rounding of a different split of the
    # sequence; against the fp32 reference, the kernels' own rounding (as test_model_tensor_core_decode_vs_reference)
    assert rel(got, grow) < 2e-2 and rel(got, ref) < 0.1, (rel(got, grow), rel(got, ref), rel(grow, ref))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_replay_of_the_static_cache_baseline():
    """The full-precision baseline (transformers' StaticCache) through a captured graph gives DynamicCache's greedy
    tokens on the GPU."""
    from transformers import DynamicCache

    model = _cuda_model(4).float()
    ids = torch.randint(0, 512, (2, 29), generator=torch.Generator().manual_seed(5)).cuda()
    ref = greedy(model, DynamicCache(), ids, 12)
    dec = StaticDecoder(model, static_cache(model, "static", 48), 48, graph=True)
    first = dec.prefill(ids)
    assert torch.equal(torch.cat([first, dec.decode(first, 11)], 1), ref)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_replay_samples_from_the_seed():
    """A sampling decode step (temperature, top-k, top-p) captured as a CUDA graph: replays draw fresh numbers each step
    from torch's Philox state, so one seed gives the same tokens as the same static decode run eagerly from that seed,
    and again on a second capture; another seed gives other tokens; they are not the greedy ones; top-k 1 is greedy."""
    from cqtool.config import QuantSpec
    from cqtool.sampling import Sampling

    model = _cuda_model(4)
    cb = make_codebook(ModelInfo.from_config(model.config, "tiny"), QuantSpec(8, 8))
    ids = torch.randint(0, 512, (3, 37), generator=torch.Generator().manual_seed(8)).cuda()

    def run(s, graph, seed=9):
        torch.manual_seed(seed)
        dec = StaticDecoder(model, static_cache(model, "cq", 64, cb), 64, graph=graph, sampling=s)
        first = dec.prefill(ids)
        out = torch.cat([first, dec.decode(first, 20)], 1)
        assert dec.timings["graph"] == graph and (not graph or dec.timings["steps"] == 18)
        return out

    s = Sampling(temperature=1.0, top_k=200, top_p=0.95)
    got = run(s, True)
    assert torch.equal(got, run(s, True))
    assert torch.equal(got, run(s, False))
    assert not torch.equal(got, run(s, True, seed=10))
    greedy_tokens = run(Sampling(), True)
    assert not torch.equal(got, greedy_tokens)
    assert torch.equal(run(Sampling(temperature=1.0, top_k=1), True), greedy_tokens)


def test_greedy_graph_path_on_the_cpu():
    """cqtool generate --cuda-graphs' decode loop (graph=False: the same static path, eagerly): the tokens of the
    growing cache's greedy decode, cut after the end-of-sequence token although every step ran."""
    from cqtool.generate import decode_graph

    model = tiny_model("llama")
    cb = make_codebook(ModelInfo.from_config(model.config, "tiny"))
    ids = torch.randint(0, 512, (1, 15), generator=torch.Generator().manual_seed(6))
    ref = greedy(model, CQCache(model, cb), ids, 10)[0].tolist()
    out, secs, replays = decode_graph(model, ids, static_cache(model, "cq", 25, cb), 10, None, graph=False)
    assert out == ref and secs > 0 and replays == 0
    eos = ref[4]
    cut, _, _ = decode_graph(model, ids, static_cache(model, "cq", 25, cb), 10, eos, graph=False)
    assert cut == ref[: ref.index(eos) + 1]


def test_dispatched_blocks_of_a_device_map():
    """The blocks StaticDecoder captures one graph per GPU run for: none for a model on one device, each device_map
    entry's module otherwise; a block off the GPUs is a clear error."""
    from cqtool.graphs import dispatched_blocks

    model = tiny_model("llama")
    assert dispatched_blocks(model) == []
    model.hf_device_map = {"": 0}
    assert dispatched_blocks(model) == []
    model.hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cuda:1", "model.norm": 1,
                           "model.rotary_emb": 0, "lm_head": 1}
    blocks = dispatched_blocks(model)
    assert [(m, str(d)) for m, d in blocks] == [
        (model.model.embed_tokens, "cuda:0"), (model.model.layers[0], "cuda:0"), (model.model.layers[1], "cuda:1"),
        (model.model.norm, "cuda:1"), (model.model.rotary_emb, "cuda:0"), (model.lm_head, "cuda:1")]
    model.hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu", "model.norm": "cpu",
                           "model.rotary_emb": 0, "lm_head": "cpu"}
    with pytest.raises(ConfigError, match=r"every block on a GPU \(device_map puts model.layers.1 on cpu\)"):
        dispatched_blocks(model)


def test_cache_replicas_for_graphs_per_gpu():
    """CQCache's state read outside the layers' arguments (this step's rows, the ring's rows, the positions), as the
    layers on another device see it: the tensor itself on its own device; a copy made per call in eager decoding;
    the copy replica_pairs registers, until drop_replicas, when one graph per GPU is replayed ("meta" stands in for
    a second GPU)."""
    model = tiny_model("llama")
    cb = make_codebook(ModelInfo.from_config(model.config, "tiny"))
    cache = static_cache(model, "cq", 40, cb, window=8)
    dec = StaticDecoder(model, cache, 40, graph=False)
    dec.decode(dec.prefill(torch.randint(0, 512, (2, 21))), 3)
    for name in CQCache.REPLICATED:
        assert cache.on_device(name, "cpu") is getattr(cache, name)
    assert cache.replica_pairs("cpu") == []
    eager = cache.on_device("positions", "meta")
    assert eager.device.type == "meta" and eager.shape == cache.positions.shape
    # one eager copy per step: the layers of a step share it, kernels' positions included (ops._device_positions)
    assert cache.on_device("positions", "meta") is eager and ops._device_positions(cache, torch.device("meta")) is eager
    cache.positions.add_(0)  # written in place (a static step): a new version, a fresh copy
    fresh = cache.on_device("positions", "meta")
    assert fresh is not eager and cache.on_device("positions", "meta") is fresh
    rows = cache.on_device("static_rows", "meta")
    cache.static_rows = cache.static_rows + 0  # the next step's rows: a new tensor
    assert cache.on_device("static_rows", "meta") is not rows
    pairs = cache.replica_pairs("meta")
    assert [src is getattr(cache, n) for (src, _), n in zip(pairs, CQCache.REPLICATED)] == [True] * 3
    for name, (_, rep) in zip(CQCache.REPLICATED, pairs):
        assert rep.device.type == "meta" and cache.on_device(name, "meta") is rep and cache.replica(name, "meta") is rep
    cache.drop_replicas()  # graph replays wrote in place without new versions: no copy from before is reused
    after = cache.on_device("positions", "meta")
    assert cache.replica("positions", "meta") is None and after is not pairs[2][1] and after is not fresh
