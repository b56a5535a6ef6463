"""Several GPUs in one process: what a model spread over GPUs with `device_map` (`--device-map balanced` or `auto`)
asks of the kernels and of the CQ cache. Each layer's cache lives on that layer's GPU and its kernels run there while
another GPU is the current device.

Marked `cuda`; skipped unless two or more GPUs are visible.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json

import pytest
import torch

from cqtool import ops
from cqtool.models import cache_kwarg
from test_kernels import C4, assert_within_2x, make_case, poison_allocator, rel_err

N_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(N_GPUS < 2, reason=f"needs two CUDA GPUs ({N_GPUS} visible)")]


def _run_on(dev: str, case: dict, decode: str, prefill: str, monkeypatch):
    monkeypatch.setattr(ops, "DECODE_KERNEL", decode)
    monkeypatch.setattr(ops, "PREFILL_KERNEL", prefill)
    query, view, mask, scaling = make_case(dev=dev, **case)
    poison_allocator(device=dev)  # that GPU's allocator: unwritten outputs show
    out = ops.cq_attention(query, view, mask, scaling)  # the current device stays cuda:0
    torch.cuda.synchronize(dev)
    assert out.device == torch.device(dev)
    assert ops.BACKEND_USED["attention"] == "cuda", ops.kernel_status()
    assert_within_2x(out, query, view, mask, scaling)
    return ops.KERNEL_USED["attention"]


# Kernels that opt into more than 48 KiB of dynamic shared memory (set per device by cudaFuncSetAttribute), each run
# on every GPU in turn in the same process: the second GPU's launch needs its own opt-in.
CASES = [  # (decode kernel, prefill kernel, case, the kernel that must run)
    ("tensor-core", "sdpa", dict(S=3000, Q=1, B=2, Hq=4, Hkv=4, pads=[0, 1234]), "decode-mma"),
    ("tensor-core", "sdpa", dict(S=1500, Q=1, B=2, Hq=8, Hkv=2, dtype=torch.bfloat16), "decode-mma-gqa"),
    ("tensor-core", "sdpa", dict(S=300, Q=1, B=2, Hq=8, Hkv=2, window=128, sinks=2, pads=[0, 100]), "decode-mma-gqa"),
    ("tensor-core", "sdpa", dict(S=2500, Q=1, B=1, Hq=4, Hkv=2, dtype=torch.bfloat16, **C4), "decode-mma-gqa"),
    ("tensor-core-16w", "sdpa", dict(S=2000, Q=1, B=1, Hq=2, Hkv=2), "decode-mma16"),
    ("cuda-core", "sdpa", dict(S=3000, Q=1, B=1, Hq=8, Hkv=8, kspec=(4, 8), vspec=(4, 8)), "decode"),
    ("cuda-core", "sdpa", dict(S=17, Q=1, B=3, Hq=3, Hkv=1, D=64, kspec=(16, 12), vspec=(1, 4)), "decode"),
    ("auto", "tensor-core", dict(S=300, Q=83, B=1, Hq=8, Hkv=2, dtype=torch.bfloat16, mask_none=True), "prefill"),
    ("auto", "sdpa", dict(S=257, Q=257, B=2, Hq=6, Hkv=2, D=64, kspec=(4, 8), vspec=(2, 6), pads=[11, 0]),
     "dequant+sdpa"),
]


@pytest.mark.parametrize("decode,prefill,case,kernel", CASES, ids=[f"{c[3]}-{i}" for i, c in enumerate(CASES)])
def test_each_kernel_on_every_gpu(decode, prefill, case, kernel, monkeypatch):
    for i in range(N_GPUS):
        assert _run_on(f"cuda:{i}", case, decode, prefill, monkeypatch) == kernel, f"cuda:{i}"


def test_encode_on_second_gpu():
    from cqtool import quant

    dev = "cuda:1"
    x = torch.randn(2, 5, 3, 128, device=dev).to(torch.bfloat16).transpose(1, 2)
    cent = torch.randn(3, 16, 256, 8, device=dev).to(torch.bfloat16)
    codes = torch.zeros(2, 3, 9, 16, dtype=torch.uint8, device=dev)
    ops.encode_into(x, cent, 8, codes, 2)
    torch.cuda.synchronize(dev)
    assert ops.BACKEND_USED["encode"] == "cuda"
    got = quant.unpack(codes[:, :, 2:7], 8, 16)
    assert (got == quant.encode(x, cent)).float().mean() > 0.99


def test_tensors_on_two_gpus_are_a_clear_error(monkeypatch):
    """A cache buffer on another GPU than the query is refused with the names of both devices (a pointer from
    another GPU would be an illegal address inside the kernel)."""
    monkeypatch.setattr(ops, "DECODE_KERNEL", "tensor-core")
    query, view, mask, scaling = make_case(dev="cuda:1", S=300, Q=1, B=1, Hq=4, Hkv=4)
    view.layer.k_codes = view.layer.k_codes.to("cuda:0")
    with pytest.raises(RuntimeError, match=r"k_codes is on cuda:0, the kernel runs on cuda:1"):
        ops.cq_attention(query, view, mask, scaling)


@pytest.mark.parametrize("family,heads,kv_heads,c,window", [("llama", 8, 2, 8, 0), ("llama", 4, 4, 8, 32),
                                                             ("qwen2", 8, 2, 4, 0)])
def test_model_spread_over_gpus(monkeypatch, family, heads, kv_heads, c, window):
    """A tiny model (head_dim 128, 4 layers) dispatched over the GPUs by accelerate (layers 0-1 on cuda:0, 2-3 on the
    last GPU, as `device_map` does for a big model): prefill and 10 decode steps through the CQ cache and the
    kernels give the logits of the same model on one GPU (same kernels, so the same numbers up to the float rounding
    of moved activations), and of the reference path."""
    from accelerate import dispatch_model
    from conftest import tiny_model
    from test_codebook import make_codebook

    from cqtool.cache import CQCache
    from cqtool.config import QuantSpec
    from cqtool.models import ModelInfo

    last = N_GPUS - 1
    model = tiny_model(family, layers=4, heads=heads, kv_heads=kv_heads, head_dim=128).to(torch.bfloat16)
    cb = make_codebook(ModelInfo.from_config(model.config, "tiny"), QuantSpec(c, 8))
    ids = torch.randint(0, 512, (2, 600), generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(ops, "DECODE_KERNEL", "tensor-core")  # the context is short: force the tensor-core kernel

    def run(m):
        cache = CQCache(m, cb, window=window)
        x = ids.to("cuda:0")
        kernels = set()
        with torch.no_grad():
            out = [m(x[:, :590], **{cache_kwarg(m): cache}, use_cache=True).logits[:, -1:].float().cpu()]
            for t in range(590, 600):
                ops.KERNELS_RUN.clear()
                out.append(m(x[:, t : t + 1], **{cache_kwarg(m): cache}, use_cache=True).logits.float().cpu())
                kernels |= ops.KERNELS_RUN
        devices = {str(layer.k_codes.device) for layer in cache.layers}
        return torch.cat(out, 1), kernels, devices

    device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 0, "model.layers.2": last,
                  "model.layers.3": last, "model.norm": last, "model.rotary_emb": 0, "lm_head": last}
    spread, k_spread, devs = run(dispatch_model(model, device_map=device_map))
    assert devs == {"cuda:0", f"cuda:{last}"}
    assert k_spread == {"decode-mma" if heads == kv_heads else "decode-mma-gqa"}
    assert ops.BACKEND_USED["encode"] == "cuda"
    single = tiny_model(family, layers=4, heads=heads, kv_heads=kv_heads, head_dim=128).to("cuda:0", torch.bfloat16)
    one, k_one, devs = run(single)
    assert devs == {"cuda:0"} and k_one == k_spread
    assert rel_err(spread, one) < 1e-2
    monkeypatch.setattr(ops, "get_module", lambda: None)
    ref, _, _ = run(single)
    assert ops.BACKEND_USED["attention"] == "reference"
    assert rel_err(spread, ref) < 0.1


@pytest.mark.parametrize("kind", ["cq", "dynamic"])
def test_generate_bench_spread_over_gpus(kind):
    """`bench generate --gpus N`: the model's layers run on their GPUs, each layer's cache lives on its layer's GPU
    (so every GPU holds a share of the cache), and decoding gives the tokens of the same model on one GPU."""
    from cqtool.bench_kernels import (GenSetup, _decode, _make_cache, _synthetic_fill, layer_devices, random_codebook,
                                      random_llama, run_generation, spread_model)
    from cqtool.cache import prepare_model
    from cqtool.config import QuantSpec

    gpus = N_GPUS
    model = random_llama(layers=2 * gpus)  # Llama-2-7b's width, a few layers
    cb = random_codebook(model, QuantSpec.parse("8c8b"))
    prepare_model(model)
    one = GenSetup(model, cb, prompt=300, new_tokens=6)
    cache = _make_cache(kind, one)
    _synthetic_fill(kind, cache, one, 2, one.prompt)
    tok0 = torch.zeros(2, 1, dtype=torch.long, device="cuda")
    _, ref = _decode(model, cache, tok0, one.new_tokens)
    del cache

    model = spread_model(model, gpus)
    devs = layer_devices(model)
    assert [d.index for d in devs] == [i // 2 for i in range(2 * gpus)]
    spread = GenSetup(model, cb, prompt=300, new_tokens=6, gpus=gpus)
    cache = _make_cache(kind, spread)
    _synthetic_fill(kind, cache, spread, 2, spread.prompt)
    held = [(layer.k_codes if kind == "cq" else layer.keys).device for layer in cache.layers]
    assert held == devs
    _, toks = _decode(model, cache, tok0, spread.new_tokens, spread.sync)
    assert torch.equal(toks.cpu(), ref.cpu())
    del cache
    rec = run_generation(kind, spread, 2, real_prefill=False)
    assert len(rec["peak_gib_per_gpu"]) == gpus and min(rec["peak_gib_per_gpu"]) > 0.1  # weights and cache on each
    assert rec["peak_gib"] == max(rec["peak_gib_per_gpu"])


def _spread_tiny(kv_heads: int, rotary_last: bool = False):
    """A tiny Llama (head_dim 128, 4 layers) on one GPU, and the same weights dispatched over the first and the last
    GPU (layers 0-1 and 2-3; `rotary_last`: the rotary tables on the last GPU too, as some `auto` maps put them, so
    that a step crosses GPUs three times)."""
    from accelerate import dispatch_model
    from conftest import tiny_model

    last = N_GPUS - 1
    torch.manual_seed(0)
    model = tiny_model("llama", layers=4, heads=4, kv_heads=kv_heads, head_dim=128).to(torch.bfloat16).eval()
    single = tiny_model("llama", layers=4, heads=4, kv_heads=kv_heads, head_dim=128).to(torch.bfloat16).eval()
    single.load_state_dict(model.state_dict())
    device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 0, "model.layers.2": last,
                  "model.layers.3": last, "model.norm": last, "model.rotary_emb": last if rotary_last else 0,
                  "lm_head": last}
    return dispatch_model(model, device_map=device_map), single.to("cuda:0")


# (kind, kv_heads, window, sinks, rotary on the last GPU, sampled)
GRAPH_SPREAD_CASES = [("cq", 4, 0, 0, False, False), ("cq", 1, 16, 4, False, False), ("cq", 4, 48, 0, True, False),
                      ("cq", 1, 0, 0, False, True), ("static", 4, 0, 0, False, False), ("static", 1, 0, 0, True, False)]


@pytest.mark.parametrize("kind,kv_heads,window,sinks,rotary_last,sampled", GRAPH_SPREAD_CASES)
def test_graph_per_gpu_equals_eager_static_decode(kind, kv_heads, window, sinks, rotary_last, sampled):
    """A model spread over two GPUs, decode steps captured as one CUDA graph per run of blocks on one GPU and
    replayed (graphs._GraphPerDevice): the tokens of the same static decode run eagerly on the spread model, and of
    the same weights on one GPU with one graph per step; each cache layer on its layer's GPU; the CQ kernels ran."""
    from cqtool.config import QuantSpec
    from cqtool.graphs import StaticDecoder, static_cache
    from cqtool.models import ModelInfo
    from cqtool.sampling import GREEDY, Sampling
    from test_codebook import make_codebook

    spread, single = _spread_tiny(kv_heads, rotary_last)
    cb = make_codebook(ModelInfo.from_config(single.config, "tiny"), QuantSpec(8, 8))
    ids = torch.randint(0, 512, (3, 37), generator=torch.Generator().manual_seed(4)).to("cuda:0")
    sampling = Sampling(temperature=1.0, top_k=200, top_p=0.95) if sampled else GREEDY

    def run(model, graph):
        torch.manual_seed(9)
        cache = static_cache(model, kind, 64, cb, window, sinks)
        dec = StaticDecoder(model, cache, 64, graph=graph, sampling=sampling)
        first = dec.prefill(ids)
        out = torch.cat([first, dec.decode(first, 20)], 1)
        layers = [layer.k_codes if kind == "cq" else layer.keys for layer in cache.layers]
        return out, dec.timings, {str(t.device) for t in layers}

    ops.KERNELS_RUN.clear()
    got, tm, devs = run(spread, True)
    assert tm["graph"] and tm["steps"] == 18 and tm["gpus"] == 2, tm
    assert tm["graphs_per_step"] == (5 if rotary_last else 3), tm  # the last: the token, picked on the first GPU
    assert devs == {"cuda:0", f"cuda:{N_GPUS - 1}"}
    if kind == "cq":
        assert any(k.startswith("decode") for k in ops.KERNELS_RUN), ops.KERNELS_RUN
    eager, tm_e, _ = run(spread, False)
    assert not tm_e["graph"] and tm_e["steps"] == 20
    assert torch.equal(got, eager)
    one, tm_1, devs_1 = run(single, True)
    assert tm_1["graph"] and "graphs_per_step" not in tm_1 and devs_1 == {"cuda:0"}
    assert torch.equal(got, one)


def test_graph_bench_over_gpus():
    """`bench generate --graphs --gpus N`: the graph run of each cache on the spread model, one graph per GPU."""
    from cqtool.bench_kernels import GenSetup, random_codebook, random_llama, run_graph_generation, spread_model
    from cqtool.config import QuantSpec

    model = spread_model(random_llama(layers=2 * N_GPUS), N_GPUS)
    cb = random_codebook(model, QuantSpec.parse("8c8b"))
    setup = GenSetup(model, cb, prompt=300, new_tokens=8, gpus=N_GPUS, window=128)
    for kind in ("static", "cq"):
        rec = run_graph_generation(kind, setup, 2)
        assert rec["graph"] and rec["timed_steps"] == 6 and rec["graphs_per_step"] == N_GPUS + 1, rec
        assert rec["ms_per_step"] > 0


@pytest.mark.parametrize("kind,window", [("cq", 0), ("cq", 16), ("dynamic", 0)])
def test_micro_batches_pipelined_over_gpus(kind, window):
    """pipeline.MicroBatches on a tiny model spread over two GPUs: micro-batches decoded in turn, each on its own
    streams, give the tokens of each micro-batch decoded alone on the default streams; no decode step synchronises
    the host (a sync would stop the host from queueing the next micro-batch while the GPUs work)."""
    from transformers import DynamicCache
    from test_codebook import make_codebook

    from cqtool.cache import CQCache
    from cqtool.config import QuantSpec
    from cqtool.models import ModelInfo
    from cqtool.pipeline import MicroBatches, split_batch

    spread, single = _spread_tiny(kv_heads=2)
    cb = make_codebook(ModelInfo.from_config(single.config, "tiny"), QuantSpec(8, 8))
    ids = torch.randint(0, 512, (5, 300), generator=torch.Generator().manual_seed(3)).to("cuda:0")
    rows, key, steps = split_batch(5, 2), cache_kwarg(spread), 12

    def prefilled(pipe=None):  # with a pipeline: each micro-batch's cache filled on its streams, as it asks
        caches, toks = [], []
        for m, r in enumerate(rows):
            cache = CQCache(spread, cb, window=window) if kind == "cq" else DynamicCache()
            with torch.no_grad(), pipe.on(m) if pipe else contextlib.nullcontext():
                logits = spread(input_ids=ids[r], **{key: cache}, use_cache=True).logits
                toks.append(logits[:, -1:].argmax(-1))
            caches.append(cache)
        return caches, toks

    alone = []
    for cache, tok in zip(*prefilled()):
        seq = []
        with torch.no_grad():
            for _ in range(steps):
                tok = spread(input_ids=tok, **{key: cache}, use_cache=True).logits[:, -1:].argmax(-1)
                seq.append(tok.to("cuda:0"))
        alone.append(torch.cat(seq, 1))

    pipe = MicroBatches(spread, 2)
    seen = set()  # the current stream of each layer's GPU when the layer runs: the micro-batch streams only

    def on_stream(module, args):
        dev = next(module.parameters()).device
        seen.add(torch.cuda.current_stream(dev).cuda_stream)

    hooks = [spread.model.layers[i].register_forward_pre_hook(on_stream) for i in (0, 3)]
    pipe.fork()
    caches, toks = prefilled(pipe)
    assert pipe.devices == [torch.device("cuda:0"), torch.device(f"cuda:{N_GPUS - 1}")]
    ops.KERNELS_RUN.clear()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = pipe.decode(caches, toks, steps)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for d in pipe.devices:
        torch.cuda.synchronize(d)
    for h in hooks:
        h.remove()
    assert seen == {s.cuda_stream for per in pipe.streams for s in per.values()}  # 2 micro-batches x 2 GPUs
    if kind == "cq":
        assert any(k.startswith("decode") for k in ops.KERNELS_RUN), ops.KERNELS_RUN
        assert {str(layer.k_codes.device) for layer in caches[1].layers} == {"cuda:0", f"cuda:{N_GPUS - 1}"}
    assert [g.shape for g in got] == [(3, steps), (2, steps)]
    for g, a in zip(got, alone):
        assert torch.equal(g, a)



def test_bench_generate_micro_batches(tmp_path):
    """`bench generate --gpus N --micro-batches 2`: every eager run is pipelined (records say 2 micro-batches), the
    largest-batch part also times each cache's batch decoded as one, and prints the ratio; the CQ cache's bytes are
    those of both micro-batches' caches."""
    import json

    from typer.testing import CliRunner

    from cqtool.cli import app

    r = CliRunner().invoke(app, ["bench", "generate", "--layers", str(2 * N_GPUS), "--gpus", str(N_GPUS), "--batch", "5",
                                 "--prompt", "64", "--new-tokens", "4", "--repeats", "1", "--micro-batches", "2",
                                 "--max-batch", "12", "--json", str(tmp_path / "m.json")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "m.json").read_text())
    assert res["micro_batches"] == 2
    sb, mb = res["same_batch"], res["max_batch"]
    assert sb["cq"]["micro_batches"] == sb["dynamic"]["micro_batches"] == 2 and sb["cq"]["batch"] == 5
    assert mb["cq_batch"] == mb["dynamic_batch"] == 12  # the search limit: both fit on these GPUs
    for kind in ("cq", "dynamic"):
        base = mb["unpipelined"][kind]
        assert base["micro_batches"] == 1 and base["batch"] == 12
        assert mb["pipeline_speedup"][kind] == pytest.approx(mb[kind]["decode_tok_s"] / base["decode_tok_s"], rel=1e-3)
        assert base["cache_gib"] == pytest.approx(mb[kind]["cache_gib"], rel=0.05)
    out = " ".join(r.output.split())  # rich wraps long lines
    assert f"2 micro-batches pipelined over {N_GPUS} GPUs decode" in out and "the batch decoded as one" in out


def test_bench_pipeline_cli(tmp_path):
    """`bench pipeline`: the batch decoded as one and in 2 and 3 micro-batches over the GPUs, each timed with its
    speedup over the baseline of the same run, and the table printed."""
    import json

    from typer.testing import CliRunner

    from cqtool.cli import app

    r = CliRunner().invoke(app, ["bench", "pipeline", "--layers", str(2 * N_GPUS), "--gpus", str(N_GPUS), "--batch", "6",
                                 "--prompt", "64", "--new-tokens", "4", "--micro-batches", "2,3", "--repeats", "2",
                                 "--json", str(tmp_path / "p.json")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "p.json").read_text())
    rows = {x["micro_batches"]: x for x in res["rows"]}
    assert sorted(rows) == [1, 2, 3] and not any(x["oom"] for x in rows.values())
    assert [rec["micro_batches"] for rec in res["records"]] == [1, 2, 3] * 2 and {rec["batch"] for rec in res["records"]} == {6}
    assert rows[1]["speedup"] == 1.0
    for m in (2, 3):
        assert len(rows[m]["speedups"]) == 2 and rows[m]["speedup"] > 0 and len(rows[m]["peak_gib_per_gpu"]) == N_GPUS
    assert "vs as one" in r.output and "1.00x" in r.output and "(baseline)" in r.output  # the cell may wrap


@pytest.mark.parametrize("kind", ["cq", "full"])
def test_perplexity_micro_batches_over_gpus(kind, tokenizer, text_file):
    """`cqtool eval --micro-batches 2` on a model spread over two GPUs: every layer ran on a micro-batch stream of its
    GPU (two per GPU), no window's loss was read by the host inside the loop (no sync until the end), and the
    perplexity is that of the same micro-batches run one after the other on the default streams (batch_size 2)."""
    from test_codebook import make_codebook

    from cqtool.config import QuantSpec
    from cqtool.evaluate import perplexity
    from cqtool.methods import CQMethod, FullPrecision
    from cqtool.models import ModelInfo

    spread, single = _spread_tiny(kv_heads=2)
    method = CQMethod(make_codebook(ModelInfo.from_config(single.config, "tiny"), QuantSpec(8, 8))) if kind == "cq" \
        else FullPrecision()
    text = text_file.read_text()
    base = perplexity(spread, tokenizer, text, method, seqlen=128, limit=8, batch_size=2)
    seen = set()

    def on_stream(module, args):
        dev = next(module.parameters()).device
        seen.add((str(dev), torch.cuda.current_stream(dev).cuda_stream))

    def no_sync(batches, **kw):  # a host sync inside the loop raises
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield from batches
        finally:
            torch.cuda.set_sync_debug_mode("default")

    hooks = [spread.model.layers[i].register_forward_pre_hook(on_stream) for i in (0, 3)]
    ops.KERNELS_RUN.clear()
    try:
        got = perplexity(spread, tokenizer, text, method, seqlen=128, limit=8, batch_size=4, progress=no_sync,
                         micro_batches=2)
    finally:
        for h in hooks:
            h.remove()
    defaults = {torch.cuda.default_stream(d).cuda_stream for d in range(N_GPUS)}
    assert len(seen) == 4 and not {s for _, s in seen} & defaults, seen  # 2 micro-batches x 2 GPUs
    assert {d for d, _ in seen} == {"cuda:0", f"cuda:{N_GPUS - 1}"}
    if kind == "cq":
        assert any(k.startswith("prefill") or k.startswith("dequant") for k in ops.KERNELS_RUN), ops.KERNELS_RUN
    assert got["micro_batches"] == 2 and got["tokens"] == base["tokens"] and got["windows"] == 8
    assert got["nll_per_token"] == pytest.approx(base["nll_per_token"], rel=1e-9)


@pytest.mark.parametrize("workload", ["eval", "lmeval"])
def test_bench_pipeline_eval_workload(tmp_path, workload):
    """`bench pipeline --workload eval` (and lmeval: the same windows scored as lm-eval's requests): whole-window
    forwards as one and in 2 micro-batches; the same loss both ways (the same windows and weights), each setting's
    tokens/s and its ratio to the baseline."""
    import json

    from typer.testing import CliRunner

    from cqtool.cli import app

    r = CliRunner().invoke(app, ["bench", "pipeline", "--workload", workload, "--layers", str(2 * N_GPUS), "--gpus",
                                 str(N_GPUS), "--batch", "4", "--batches", "3", "--prompt", "64", "--micro-batches", "2",
                                 "--json", str(tmp_path / "e.json")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "e.json").read_text())
    recs = {x["micro_batches"]: x for x in res["records"]}
    assert sorted(recs) == [1, 2] and all(x["workload"] == workload and x["batches"] == 3 for x in recs.values())
    assert recs[2]["nll_per_token"] == pytest.approx(recs[1]["nll_per_token"], rel=1e-3)
    assert res["rows"][1]["speedup"] == pytest.approx(recs[2]["tok_s"] / recs[1]["tok_s"], rel=1e-3)  # JSON: 5 digits
    what = "eval forwards" if workload == "eval" else "lm-eval-style forwards (a host read per batch)"
    assert f"{what} (CQ-8c8b), 3 batches of 4 windows" in " ".join(r.output.split())


@pytest.mark.parametrize("kind", ["cq", "full"])
def test_lm_eval_forwards_in_micro_batches_over_gpus(kind, tokenizer, tmp_path):
    """`cqtool eval --tasks ... --micro-batches 2` on a model spread over two GPUs: a forward as lm-eval's HFLM makes
    it (input_ids only) runs as 2 micro-batches on their own streams of each GPU without a host sync, and its logits
    are those of the same rows run as one forward each; other calls run as one. Then through lm-eval itself (where
    installed): the same accuracies as without micro-batches."""
    from test_codebook import make_codebook

    from cqtool.config import QuantSpec
    from cqtool.lmeval import run_tasks, use_method
    from cqtool.methods import CQMethod, FullPrecision
    from cqtool.models import ModelInfo

    spread, single = _spread_tiny(kv_heads=2)
    method = CQMethod(make_codebook(ModelInfo.from_config(single.config, "tiny"), QuantSpec(8, 8))) if kind == "cq" \
        else FullPrecision()
    ids = torch.randint(0, spread.config.vocab_size, (5, 67), device="cuda:0")
    with torch.no_grad(), use_method(spread, method):
        ref = torch.cat([spread(ids[:3]).logits, spread(ids[3:]).logits]).float()  # the micro-batches' rows, as one each
    seen, stats, hooked = set(), {}, spread.__dict__.get("forward")  # accelerate's forward on the dispatched model
    hooks = [spread.model.layers[i].register_forward_pre_hook(
        lambda mod, args: seen.add(torch.cuda.current_stream(next(mod.parameters()).device).cuda_stream)) for i in (0, 3)]
    try:
        with torch.no_grad(), use_method(spread, method, 2, stats):
            torch.cuda.set_sync_debug_mode("error")
            try:
                got = spread(ids).logits.float()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            one_row = spread(ids[:1]).logits.float()  # run as one: a single row
    finally:
        for h in hooks:
            h.remove()
    defaults = {torch.cuda.default_stream(d).cuda_stream for d in range(N_GPUS)}
    assert len(seen - defaults) == 4, seen  # 2 micro-batches x 2 GPUs (plus the default streams of the one-row call)
    assert stats == {"forwards": 2, "micro_batched": 1}
    assert got.shape == ref.shape and torch.allclose(got, ref, rtol=0, atol=1e-3), (got - ref).abs().max()
    assert torch.allclose(one_row, ref[:1], rtol=0, atol=1e-3)
    assert spread.__dict__.get("forward") is hooked  # restored on exit
    if importlib.util.find_spec("lm_eval") is None:
        pytest.skip("lm-eval is not installed: its HFLM run was not checked")
    rows = []  # a small arc_easy file in llm-foundry's format (no shared data needed)
    g = torch.Generator().manual_seed(0)
    words = ["river", "stone", "cat", "light", "water", "tree", "sound", "heat"]
    for i in range(12):
        pick = torch.randint(0, len(words), (6,), generator=g).tolist()
        rows.append({"query": f"Question: Which {words[pick[0]]} is {words[pick[1]]}?",
                     "choices": [words[p] for p in pick[2:]], "gold": i % 4})
    (tmp_path / "arc_easy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = run_tasks(spread, tokenizer, ["arc_easy"], method, data_dir=str(tmp_path), batch_size=8)
    stats = {}
    piped = run_tasks(spread, tokenizer, ["arc_easy"], method, data_dir=str(tmp_path), batch_size=8, micro_batches=2,
                      stats=stats)
    assert stats["micro_batched"] >= 1 and stats["forwards"] >= stats["micro_batched"], stats
    for key in ("acc", "acc_norm"):
        assert piped["arc_easy"][key] == base["arc_easy"][key], (key, base, piped)
