"""Timings of the CQ kernels against transformers/PyTorch baselines measured in the same run.

attention_bench: one layer of decode attention (Llama-2-7b shapes) from codes vs torch SDPA in bf16 over the same
    (dequantized, rotated) keys and values; CUDA-event medians after warm-up; the fraction of the memory floor
    (bytes of codes + centroids + q + out over the device-to-device copy bandwidth measured in the run). Every
    decode kernel choice (ops.DECODE_KERNELS) is timed on the same data in the same run; "cq_ms" is the current one.
prefill_bench: causal attention over a whole sequence from codes (prefill / evaluation), every ops.PREFILL_KERNELS
    choice, vs torch SDPA in bf16 with is_causal=True over the same dequantized, rotated keys and values (and the
    dequantization kernel alone); CUDA-event medians.
generate_bench: greedy generation with a Llama-2-7b-shaped model with random weights, CQ cache vs DynamicCache
    (bf16): the same batch with a real 2K prefill, and each cache at the largest batch that fits the memory cap; with
    gpus > 1 the model's layers are spread over that many GPUs (accelerate's dispatch, as `device_map` does) and each
    layer's cache lives on its layer's GPU; with micro_batches > 1 the eager decode's batch is cut into micro-batches
    pipelined over those GPUs (pipeline.MicroBatches), so that the second GPU adds throughput, not only memory.
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from . import ops, quant
from .config import ConfigError, QuantSpec
from .models import cache_kwarg
from .pipeline import MicroBatches, shared_pipeline, split_batch, sync_all

DEFAULT_SHAPES = ((8, 32768), (1, 4096), (1, 32768), (32, 8192))
DEFAULT_SPECS = ("8c8b", "4c8b")


def device_info() -> dict:
    p = torch.cuda.get_device_properties(0)
    return {"device": p.name, "sms": p.multi_processor_count, "memory_gib": round(p.total_memory / 2**30, 1),
            "torch": torch.__version__, "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def cuda_times(fn, warmup: int = 5, reps: int = 30) -> list[float]:
    """Milliseconds of each of `reps` calls (CUDA events around each call, after `warmup` calls)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in ev:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in ev]


def graph_times(fn, calls: int = 20, reps: int = 10) -> list[float]:
    """Milliseconds per call of `calls` calls of `fn` captured as one CUDA graph (after 3 calls on a side stream, as
    capture asks), for each of `reps` timed replays: the GPU's own time per call without the host's launch gaps
    that event timings of short calls include (decode steps run this way with --cuda-graphs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()  # untimed
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b) / calls)
    del graph
    return out


def gpu_time_us(fn, warmup: int = 5, reps: int = 20) -> float:
    """Microseconds of GPU time per call: the device time of every kernel that `reps` calls launch (torch.profiler,
    after `warmup` calls), without the host time that event timings of small calls measure."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return sum(e.device_time_total for e in prof.key_averages()
               if e.device_type == torch.autograd.DeviceType.CUDA) / reps


def copy_bandwidth(nbytes: int = 1 << 31) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = statistics.median(cuda_times(lambda: dst.copy_(src), warmup=3, reps=10))
    del src, dst
    return 2 * nbytes / (ms * 1e-3)


# ---------------------------------------------------------------- attention


def _require_kernels(what: str) -> None:
    if not torch.cuda.is_available():
        raise ConfigError(f"bench {what} needs a CUDA GPU (the reference path on CPU is not what is measured)")
    st = ops.kernel_status()
    if not st["available"]:
        raise ConfigError(f"the CUDA kernels are not available: {st['reason']}")


def _each_choice(setting: str, choices, call, ref: torch.Tensor, t_base: float, reps: int, warmup: int = 5) -> dict:
    """`call()` under every value of ops.<setting> (restored afterwards) on the same data: the kernel that ran, the
    median time, the speed against t_base and the relative difference to ref ([B, H, Q, D], call's output is
    [B, Q, H, D])."""
    kernels, keep = {}, getattr(ops, setting)
    try:
        for choice in choices:
            setattr(ops, setting, choice)
            out = call()
            ran = ops.KERNEL_USED.get("attention") if ops.BACKEND_USED.get("attention") == "cuda" else "reference"
            err = float((out.transpose(1, 2).float() - ref.float()).norm() / ref.float().norm())
            t = statistics.median(cuda_times(call, warmup=warmup, reps=reps))
            kernels[choice] = {"ran": ran, "ms": t, "speedup": t_base / t, "rel_err_vs_sdpa": err}
            del out
    finally:
        setattr(ops, setting, keep)
    return kernels


def _check_window(window: int) -> None:
    if window < 0:
        raise ConfigError(f"--window {window}: must be >= 0 (0: every cached token held as codes)")


def _check_positive(**values) -> None:
    """One error line for the first option below 1 (given as --option-name=value)."""
    for name, v in values.items():
        if v < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {v}: must be at least 1")


def synthetic_layer(B: int, S: int, H: int, D: int, spec: QuantSpec, dtype=torch.bfloat16, seed: int = 0,
                    dense: bool = True, q_heads: int | None = None, window: int = 0):
    """A decode step's view of one CQ layer with S random tokens and H kv heads (Q = 1; q_heads query heads, default
    H), and, when `dense`, the same keys (dequantized, RoPE applied) and values as dense [B, H, S, D] tensors for the
    baseline. window > 0 (needs `dense`): the last `window` tokens are also held in full precision, as the CQ cache
    keeps them (the dense tokens themselves, so that the baseline sees the same data)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    G, K = D // spec.channels, spec.num_centroids
    k_cent = torch.randn(H, G, K, spec.channels, generator=g, device="cuda").to(dtype)
    v_cent = torch.randn(H, G, K, spec.channels, generator=g, device="cuda").to(dtype)
    R = quant.row_bytes(G, spec.code_bits)
    k_codes = torch.empty(B, H, S, R, dtype=torch.uint8, device="cuda")
    v_codes = torch.empty_like(k_codes)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    positions = torch.arange(S, device="cuda").unsqueeze(0).expand(B, S)
    kd = vd = None
    if dense:
        kd = torch.empty(B, H, S, D, dtype=dtype, device="cuda")
        vd = torch.empty_like(kd)
    for b in range(B):  # a row at a time keeps the int64 code tensors small
        for codes_buf, cent, out in ((k_codes, k_cent, kd), (v_codes, v_cent, vd)):
            c = torch.randint(0, K, (1, H, S, G), generator=g, device="cuda")
            codes_buf[b : b + 1] = quant.pack(c, spec.code_bits)
            if dense:
                x = quant.decode(c, cent)
                if out is kd:
                    cos, sin = quant.rope_cos_sin(positions[b : b + 1], inv_freq.cuda())
                    x = quant.apply_rope(x.float(), cos, sin).to(dtype)
                out[b : b + 1] = x
            del c
    cache = SimpleNamespace(positions=positions, inv_freq=inv_freq, rope_scale=1.0)
    memo: dict = {}

    def cos_sin(n: int, device):  # memoised, as CQCache.cos_sin is within a step (all layers share it)
        key = (n, str(device))
        if key not in memo:
            memo[key] = quant.rope_cos_sin(positions[:, :n].to(device), inv_freq.to(device))
        return memo[key]

    cache.cos_sin = cos_sin
    layer = SimpleNamespace(k_codes=k_codes, v_codes=v_codes, k_centroids=k_cent, v_centroids=v_cent,
                            k_bits=spec.code_bits, v_bits=spec.code_bits, k_groups=G, v_groups=G,
                            config=SimpleNamespace(window=window, sinks=0), parent=cache, sink_k=None, sink_v=None,
                            length=S)
    layer.valid_codes = lambda: (k_codes[:, :, :S], v_codes[:, :, :S])
    new = torch.randn(B, H, 1, D, generator=g, device="cuda").to(dtype)
    view = SimpleNamespace(layer=layer, new_k=new, new_v=new, start=S - 1, win_k=None, win_v=None, length=S, rows=None)
    if window:
        if not dense:
            raise ValueError("synthetic_layer: a full-precision window needs dense=True")
        w = min(window, S - 1)  # the window kept from earlier steps; the new token comes as new_k / new_v
        view.win_k, view.win_v = kd[:, :, S - 1 - w : S - 1], vd[:, :, S - 1 - w : S - 1]
        view.new_k, view.new_v = kd[:, :, S - 1 :], vd[:, :, S - 1 :]
    query = torch.randn(B, q_heads or H, 1, D, generator=g, device="cuda").to(dtype)
    return query, view, kd, vd


def attention_bench(shapes=DEFAULT_SHAPES, specs=DEFAULT_SPECS, heads: int = 32, head_dim: int = 128,
                    reps: int = 30, progress=None, kv_heads: int | None = None, window: int = 0) -> dict:
    """Decode attention per layer: CQ kernel vs SDPA bf16 on the same data, each timed with CUDA events around every
    call (medians) and, as the GPU's own time without host launch gaps, per call of 20 calls replayed from one CUDA
    graph (sdpa_graph_ms, cq_graph_ms, graph_speedup). Returns {"device", "rows", ...}.
    kv_heads < heads: grouped-query attention (SDPA with enable_gqa on the kv heads' dense K/V). window: the CQ layer
    also holds its last `window` tokens in full precision (the paper's 128), read from there instead of the codes."""
    _check_positive(reps=reps)
    kv_heads = kv_heads or heads
    if kv_heads < 1 or heads % kv_heads:
        raise ConfigError(f"--kv-heads {kv_heads}: must divide --heads {heads}")
    _check_window(window)
    _require_kernels("attention")
    info = device_info()
    bw = copy_bandwidth()
    rows = []
    say = progress or (lambda *_: None)
    for spec_name in specs:
        spec = QuantSpec.parse(spec_name)
        for B, S in shapes:
            say(f"{spec.name} {B}x{S}")
            query, view, kd, vd = synthetic_layer(B, S, kv_heads, head_dim, spec, q_heads=heads, window=window)
            scaling = head_dim**-0.5
            gqa = heads != kv_heads

            def sdpa():
                return torch.nn.functional.scaled_dot_product_attention(query, kd, vd, scale=scaling, enable_gqa=gqa)

            ref = sdpa()
            t_sdpa = statistics.median(cuda_times(sdpa, reps=reps))
            # every decode kernel choice on the same data ("ran": the kernel a choice ran for this shape)
            kernels = _each_choice("DECODE_KERNEL", ops.DECODE_KERNELS, lambda: ops.cq_attention(query, view, None, scaling),
                                   ref, t_sdpa, reps)
            keep = ops.DECODE_KERNEL
            t_cq, err = kernels[keep]["ms"], kernels[keep]["rel_err_vs_sdpa"]
            # the same calls replayed from a CUDA graph: short calls' event times above include the host's launch
            # gaps (CQ launches more than one kernel per call from Python, SDPA one)
            graph: dict = {}
            try:
                graph["sdpa_graph_ms"] = statistics.median(graph_times(sdpa))
                graph["cq_graph_ms"] = statistics.median(graph_times(lambda: ops.cq_attention(query, view, None, scaling)))
                graph["graph_speedup"] = graph["sdpa_graph_ms"] / graph["cq_graph_ms"]
            except RuntimeError as e:  # reported, not hidden: the row then has no graph times
                graph = {"graph_error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
                say(f"  CUDA graph timing failed: {graph['graph_error']}")
            layer = view.layer
            code_bytes = layer.k_codes.numel() + layer.v_codes.numel()
            floor_bytes = code_bytes + 2 * layer.k_centroids.numel() * 2 + 2 * query.numel() * 2
            dense_bytes = (kd.numel() + vd.numel()) * 2 + 2 * query.numel() * 2
            floor_ms = floor_bytes / bw * 1e3
            rows.append({"quant": f"CQ-{spec.name}", "bits_per_channel": spec.bits_per_channel, "batch": B, "context": S,
                         "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "window": window,
                         "cq_kernel": kernels[keep]["ran"],
                         "sdpa_ms": t_sdpa,
                         "cq_ms": t_cq, "speedup": t_sdpa / t_cq, "kernels": kernels, **graph,
                         "cq_floor_ms": floor_ms, "cq_floor_fraction": floor_ms / t_cq,
                         "sdpa_floor_fraction": dense_bytes / bw * 1e3 / t_sdpa, "rel_err_vs_sdpa": err,
                         "code_bytes": code_bytes})
            times = ", ".join(f"{c} ({k['ran']}) {k['ms']:.3f} ms" for c, k in kernels.items())
            say(f"  {times}, SDPA {t_sdpa:.3f} ms" + (f"; as CUDA graphs: CQ {graph['cq_graph_ms']:.3f}, SDPA "
                                                      f"{graph['sdpa_graph_ms']:.3f} ms" if "cq_graph_ms" in graph else ""))
            del query, view, kd, vd, ref
            gc.collect()
            torch.cuda.empty_cache()
    return {**info, "copy_bandwidth_tbs": bw / 1e12, "reps": reps, "rows": rows, "kernels": ops.kernel_status()}


DEFAULT_PREFILL_SHAPES = ((1, 2048), (1, 8192), (8, 2048))


def prefill_bench(shapes=DEFAULT_PREFILL_SHAPES, specs=("8c8b",), heads: int = 32, head_dim: int = 128,
                  reps: int = 10, progress=None) -> dict:
    """Causal attention of S queries over S cached tokens (one layer, Llama-2-7b shapes): the CQ prefill kernel vs
    SDPA bf16 (is_causal) on the same data. Returns {"device", "rows", ...}."""
    _check_positive(reps=reps)
    _require_kernels("prefill")
    info = device_info()
    rows = []
    say = progress or (lambda *_: None)
    for spec_name in specs:
        spec = QuantSpec.parse(spec_name)
        for B, S in shapes:
            say(f"{spec.name} prefill {B}x{S}")
            _, view, kd, vd = synthetic_layer(B, S, heads, head_dim, spec)
            view.start = 0  # all S tokens are queries (causal), all of them held as codes
            g = torch.Generator(device="cuda").manual_seed(2)
            query = torch.randn(B, heads, S, head_dim, generator=g, device="cuda").to(torch.bfloat16)
            scaling = head_dim**-0.5

            def sdpa():
                return torch.nn.functional.scaled_dot_product_attention(query, kd, vd, is_causal=True, scale=scaling)

            ref = sdpa()
            t_sdpa = statistics.median(cuda_times(sdpa, warmup=3, reps=reps))
            flop = 4.0 * B * heads * head_dim * S * (S + 1) / 2  # QK^T and PV over the causal half
            # every prefill choice on the same data
            kernels = _each_choice("PREFILL_KERNEL", ops.PREFILL_KERNELS,
                                   lambda: ops.cq_attention(query, view, None, scaling), ref, t_sdpa, reps, warmup=3)
            for k in kernels.values():
                k["tflops"] = flop / k["ms"] / 1e9
            keep = ops.PREFILL_KERNEL
            layer = view.layer
            cos, sin = layer.parent.cos_sin(S, "cuda")
            mod = ops.get_module()
            t_dq = statistics.median(cuda_times(lambda: mod.dequant(
                layer.k_codes, layer.v_codes, layer.k_centroids, layer.v_centroids, int(layer.k_bits),
                int(layer.v_bits), cos, sin, int(S)), warmup=3, reps=reps))
            k = kernels[keep]
            rows.append({"quant": f"CQ-{spec.name}", "batch": B, "context": S, "heads": heads, "head_dim": head_dim,
                         "cq_kernel": k["ran"], "sdpa_ms": t_sdpa, "cq_ms": k["ms"], "speedup": k["speedup"],
                         "sdpa_tflops": flop / t_sdpa / 1e9, "cq_tflops": k["tflops"], "rel_err_vs_sdpa": k["rel_err_vs_sdpa"],
                         "dequant_ms": t_dq, "kernels": kernels})
            times = ", ".join(f"{c} ({v['ran']}) {v['ms']:.3f} ms" for c, v in kernels.items())
            say(f"  {times}, dequant alone {t_dq:.3f} ms, SDPA {t_sdpa:.3f} ms")
            del query, view, kd, vd, ref
            gc.collect()
            torch.cuda.empty_cache()
    return {**info, "reps": reps, "rows": rows, "kernels": ops.kernel_status()}


# ---------------------------------------------------------------- encode


DEFAULT_ENCODE_SHAPES = ((1, 1), (8, 1), (64, 1), (512, 1), (733, 1), (8, 2048))  # (batch, new tokens per sequence)


def encode_bench(shapes=DEFAULT_ENCODE_SHAPES, specs=DEFAULT_SPECS, heads: int = 32, head_dim: int = 128,
                 reps: int = 30, progress=None) -> dict:
    """One layer's encode of new keys and values (B sequences x Q new tokens, `heads` kv heads): the PyTorch reference
    (quant.encode + quant.pack, what --backend reference runs) against the encode kernels on the same data, one
    launch for K and V (ops.encode_kv_into) under each choice of ops.ENCODE_TILED_MIN / ENCODE_MMA: the row kernel,
    the tiled kernel and the tensor-core kernel (each wherever it applies, else the next one down) and the default
    rule. Checks that the row and tiled kernels write the same codes, and how many codes of the tensor-core kernel
    and of the default rule agree with the row kernel's and the reference's (near-ties may go another way)."""
    _check_positive(reps=reps, heads=heads, head_dim=head_dim)
    parsed = [QuantSpec.parse(name) for name in specs]  # bad options fail before the GPU is asked for
    for spec in parsed:
        if head_dim % spec.channels:
            raise ConfigError(f"--spec {spec.name}: {spec.channels} channels per group do not divide --head-dim "
                              f"{head_dim}")
    for B, Q in shapes:
        if B < 1 or Q < 1:
            raise ConfigError(f"--shape {B}x{Q}: batch and new tokens must be at least 1")
    _require_kernels("encode")
    info = device_info()
    rows = []
    say = progress or (lambda *_: None)
    keep, keep_mma = ops.ENCODE_TILED_MIN, ops.ENCODE_MMA
    for spec in parsed:
        G, K, c = head_dim // spec.channels, spec.num_centroids, spec.channels
        R = quant.row_bytes(G, spec.code_bits)
        for B, Q in shapes:
            say(f"{spec.name} encode {B} x {Q} new tokens")
            g = torch.Generator(device="cuda").manual_seed(3)
            k = torch.randn(B, Q, heads, head_dim, generator=g, device="cuda").to(torch.bfloat16).transpose(1, 2)
            v = torch.randn(B, heads, Q, head_dim, generator=g, device="cuda").to(torch.bfloat16)
            kc = torch.randn(heads, G, K, c, generator=g, device="cuda").to(torch.bfloat16)
            vc = torch.randn(heads, G, K, c, generator=g, device="cuda").to(torch.bfloat16)
            kcodes = torch.zeros(B, heads, Q, R, dtype=torch.uint8, device="cuda")
            vcodes = torch.zeros_like(kcodes)

            def reference():
                return (quant.pack(quant.encode(k, kc), spec.code_bits), quant.pack(quant.encode(v, vc), spec.code_bits))

            def kernel():
                ops.encode_kv_into(k, kc, spec.code_bits, kcodes, v, vc, spec.code_bits, vcodes, 0)

            ref_k, ref_v = reference()
            t_ref = statistics.median(cuda_times(reference, warmup=2, reps=max(3, reps // 5)))
            choices, codes = {}, {}
            try:
                for name, tmin, mma in (("row", 0, False), ("tiled", 1, False), ("mma", 1, True),
                                        ("auto", keep, keep_mma)):
                    ops.ENCODE_TILED_MIN, ops.ENCODE_MMA = tmin, mma
                    kcodes.zero_()
                    vcodes.zero_()
                    kernel()
                    torch.cuda.synchronize()
                    if ops.BACKEND_USED.get("encode") != "cuda":
                        raise ConfigError(f"the encode kernel did not run: {ops.kernel_status()}")
                    ran = ops.KERNEL_USED["encode"]
                    codes[name] = (kcodes.clone(), vcodes.clone())
                    t = statistics.median(cuda_times(kernel, warmup=3, reps=reps))
                    choices[name] = {"ran": ran, "ms": t, "speedup_vs_reference": t_ref / t}
            finally:
                ops.ENCODE_TILED_MIN, ops.ENCODE_MMA = keep, keep_mma
            same = all(torch.equal(codes["row"][i], codes["tiled"][i]) for i in (0, 1))

            def agree(a_codes, b_codes):
                a_ = [quant.unpack(x, spec.code_bits, G) for x in a_codes]
                b_ = [quant.unpack(x, spec.code_bits, G) for x in b_codes]
                return float(sum((x == y).sum() for x, y in zip(a_, b_)) / sum(x.numel() for x in a_))
            a = choices["auto"]
            rows.append({"quant": f"CQ-{spec.name}", "batch": B, "tokens": Q, "rows": B * Q, "heads": heads,
                         "head_dim": head_dim, "reference_ms": t_ref, "cq_kernel": a["ran"], "cq_ms": a["ms"],
                         "speedup": a["speedup_vs_reference"], "row_ms": choices["row"]["ms"],
                         "tiled_ms": choices["tiled"]["ms"], "tiled_ran": choices["tiled"]["ran"],
                         "mma_ms": choices["mma"]["ms"], "mma_ran": choices["mma"]["ran"],
                         "kernels_same_codes": same, "mma_agree_with_row": agree(codes["mma"], codes["row"]),
                         "agree_with_reference": agree(codes["auto"], (ref_k, ref_v)), "kernels": choices})
            say(f"  reference {t_ref:.4f} ms, " + ", ".join(f"{n} ({v['ran']}) {v['ms']:.4f} ms"
                                                       for n, v in choices.items()))
            del k, v, kc, vc, kcodes, vcodes, ref_k, ref_v, codes
            gc.collect()
            torch.cuda.empty_cache()
    return {**info, "reps": reps, "encode_tiled_min": keep, "encode_mma": keep_mma, "rows": rows,
            "kernels": ops.kernel_status()}


# ---------------------------------------------------------------- generation


def llama2_7b_config(layers: int = 32, kv_heads: int = 32):
    """Llama-2-7b's shape; kv_heads < 32 gives grouped-query attention (8: the attention shape of Llama-3-8b)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                       rms_norm_eps=1e-5)


def _no_init():
    for mod, name in (("transformers.initialization", "no_init_weights"), ("transformers.modeling_utils", "no_init_weights")):
        try:
            return getattr(__import__(mod, fromlist=[name]), name)()
        except (ImportError, AttributeError):
            continue
    return contextlib.nullcontext()


def random_llama(layers: int = 32, dtype=torch.bfloat16, kv_heads: int = 32):
    """Llama-2-7b-shaped model with N(0, 0.02) weights, built directly on the GPU (no CPU init)."""
    from transformers import LlamaForCausalLM

    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda"), _no_init():
            model = LlamaForCausalLM(llama2_7b_config(layers, kv_heads))
    finally:
        torch.set_default_dtype(prev)
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=g)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
    return model.eval()


def layer_device_map(layers: int, gpus: int) -> dict:
    """An accelerate device_map that spreads the decoder layers over `gpus` GPUs in contiguous runs of near-equal
    length (layer i on GPU i * gpus // layers); embeddings and rotary tables on the first GPU, the final norm and the
    LM head on the last."""
    if gpus < 1 or gpus > layers:
        raise ConfigError(f"--gpus {gpus}: must be between 1 and the model's {layers} layers")
    dm = {"model.embed_tokens": 0, "model.rotary_emb": 0}
    dm.update({f"model.layers.{i}": i * gpus // layers for i in range(layers)})
    dm.update({"model.norm": gpus - 1, "lm_head": gpus - 1})
    return dm


def spread_model(model, gpus: int):
    """The model dispatched over `gpus` GPUs by layer_device_map (unchanged for one GPU)."""
    if gpus == 1:
        return model
    from accelerate import dispatch_model

    dm = layer_device_map(model.config.num_hidden_layers, gpus)
    return dispatch_model(model, device_map=dm, skip_keys=getattr(model, "_skip_keys_device_placement", None))


def layer_devices(model) -> list[torch.device]:
    """The device of each decoder layer (where its cache lives)."""
    return [layer.self_attn.k_proj.weight.device for layer in model.model.layers]


def random_codebook(model, spec: QuantSpec, seed: int = 0):
    from .codebook import Codebook
    from .config import CQConfig
    from .models import ModelInfo

    info = ModelInfo.from_config(model.config, "llama-2-7b-shaped-random")
    g = torch.Generator().manual_seed(seed)
    shape = (info.num_kv_heads, info.head_dim // spec.channels, spec.num_centroids, spec.channels)
    keys = [torch.randn(shape, generator=g) for _ in range(info.num_layers)]
    values = [torch.randn(shape, generator=g) for _ in range(info.num_layers)]
    return Codebook(CQConfig(spec, spec), info, keys, values, {"fisher": False, "seed": seed})


@dataclass
class GenSetup:
    model: object
    codebook: object
    prompt: int = 2048
    new_tokens: int = 256
    chunk: int = 256  # prefill chunk (tokens): keeps activations small at large batch
    window: int = 0  # CQ: most recent tokens also kept in full precision
    records: list = field(default_factory=list)
    gpus: int = 1  # the model's layers spread over cuda:0 .. cuda:gpus-1
    micro: int = 1  # eager decode: micro-batches pipelined over the GPUs (pipeline.MicroBatches), each with its cache

    def sync(self) -> None:
        for d in range(self.gpus):
            torch.cuda.synchronize(d)

    def pipeline(self) -> MicroBatches | None:
        """The micro-batch streams for `micro` (None for one batch), the same for every run: the kernels keep a
        workspace per stream they run on."""
        return shared_pipeline(self.model, self.micro) if self.micro > 1 else None

    def reset_peak(self) -> None:
        for d in range(self.gpus):
            torch.cuda.reset_peak_memory_stats(d)

    def peaks(self) -> list[int]:
        """Peak allocated bytes of each GPU since reset_peak."""
        return [torch.cuda.max_memory_allocated(d) for d in range(self.gpus)]


def _make_cache(kind: str, setup: GenSetup):
    from transformers import DynamicCache

    if kind == "dynamic":
        return DynamicCache()
    from .cache import CQCache

    return CQCache(setup.model, setup.codebook, window=setup.window)


def _release() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def _drop_taps(model) -> None:
    """After a run: the pre-RoPE keys a failed forward left in the model's tap, then the freed memory."""
    tap = getattr(model, "_cq_tap", None)
    if tap is not None:
        tap.keys.clear()
    _release()


def _pregrow(cache, total: int) -> None:
    """CQ: size the code buffers for the whole generation once (as a static cache would), not by doubling."""
    for layer in getattr(cache, "layers", []):
        if hasattr(layer, "_grow") and getattr(layer, "is_initialized", False):
            layer._grow(total)


def _synthetic_fill(kind: str, cache, setup: GenSetup, B: int, n: int) -> None:
    """Put n random tokens into every layer of the cache through its public update path (no model forward)."""
    cfg = setup.model.config
    H, D, L = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads, cfg.num_hidden_layers
    g = torch.Generator(device="cuda").manual_seed(1)
    step = setup.chunk
    kblock = torch.randn(B, H, step, D, generator=g, device="cuda", dtype=torch.bfloat16)
    vblock = torch.randn(B, H, step, D, generator=g, device="cuda", dtype=torch.bfloat16)
    devs = layer_devices(setup.model)
    blocks = {d: (kblock.to(d), vblock.to(d)) for d in set(devs)}  # each layer's K/V on its layer's GPU
    for s in range(0, n, step):
        q = min(step, n - s)
        if kind != "dynamic":
            cache.tap.positions = torch.arange(s, s + q, device="cuda").unsqueeze(0)
        for i in range(L):
            k, v = (t[:, :, :q] for t in blocks[devs[i]])
            if kind != "dynamic":
                cache.tap.keys[i] = k
            cache.update(k, v, i)
    if kind != "dynamic":
        cache.tap.positions = None


@torch.no_grad()
def _decode(model, cache, tok: torch.Tensor, steps: int, sync=torch.cuda.synchronize) -> tuple[float, torch.Tensor]:
    """`steps` greedy decode steps; returns (seconds, last tokens). `sync` waits for every GPU the model uses."""
    kw = {cache_kwarg(model): cache, "use_cache": True}  # inspected once, outside the timed loop
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        logits = model(input_ids=tok, **kw).logits
        tok = logits[:, -1:].argmax(-1)
    sync()
    return time.perf_counter() - t0, tok


@torch.no_grad()
def _decode_micro(pipe: MicroBatches, caches: list, toks: list, steps: int, setup: GenSetup) -> tuple[float, list]:
    """_decode for micro-batches pipelined over the GPUs (pipeline.MicroBatches): (seconds, tokens of each)."""
    setup.sync()
    t0 = time.perf_counter()
    toks = pipe.decode(caches, toks, steps)
    setup.sync()
    return time.perf_counter() - t0, toks


@torch.no_grad()
def run_generation(kind: str, setup: GenSetup, B: int, real_prefill: bool = True, steps: int | None = None) -> dict:
    """Prefill `prompt` tokens (real forward in chunks, or synthetic random K/V) then greedy decode."""
    from .cache import held_bytes

    model = setup.model
    steps = setup.new_tokens if steps is None else steps
    setup.reset_peak()
    rows = split_batch(B, setup.micro) if setup.micro > 1 else [slice(0, B)]
    pipe = setup.pipeline()
    caches = [_make_cache(kind, setup) for _ in rows]  # one per micro-batch
    cache = kw = None

    def on(m):  # micro-batch m's cache is filled on its own streams (pipeline.MicroBatches)
        return pipe.on(m) if pipe else contextlib.nullcontext()

    try:
        setup.sync()
        t0 = time.perf_counter()
        if real_prefill:
            g = torch.Generator(device="cuda").manual_seed(2)
            ids = torch.randint(0, model.config.vocab_size, (B, setup.prompt), generator=g, device="cuda")
        if pipe:
            pipe.fork()  # the micro-batch streams wait for the prompt (and all else queued so far)
        toks = []
        if real_prefill:
            for m, (cache, r) in enumerate(zip(caches, rows)):  # micro-batches one after the other
                with on(m):
                    kw = {cache_kwarg(model): cache, "use_cache": True}
                    for s in range(0, setup.prompt, setup.chunk):
                        logits = model(input_ids=ids[r, s : s + setup.chunk], **kw, logits_to_keep=1).logits
                    toks.append(logits[:, -1:].argmax(-1))
            setup.sync()  # before `ids` is freed: the micro-batch streams read it
            del ids, logits
        else:
            for m, (cache, r) in enumerate(zip(caches, rows)):
                with on(m):
                    _synthetic_fill(kind, cache, setup, r.stop - r.start, setup.prompt)
                    toks.append(torch.zeros(r.stop - r.start, 1, dtype=torch.long, device="cuda"))
        if kind != "dynamic":
            for m, cache in enumerate(caches):
                with on(m):
                    _pregrow(cache, setup.prompt + steps + 1)
        setup.sync()
        t_prefill = time.perf_counter() - t0
        if pipe:
            t_dec, _ = _decode_micro(pipe, caches, toks, steps, setup)
        else:
            t_dec, _ = _decode(model, caches[0], toks[0], steps, setup.sync)
        peaks = setup.peaks()
        rec = {"cache": kind, "batch": B, "micro_batches": setup.micro, "prompt": setup.prompt, "new_tokens": steps,
               "real_prefill": real_prefill,
               "prefill_s": t_prefill, "decode_s": t_dec, "decode_tok_s": B * steps / t_dec,
               "end_to_end_tok_s": B * steps / (t_prefill + t_dec) if real_prefill else None,
               "peak_gib": max(peaks) / 2**30,  # of the fullest GPU
               **({"peak_gib_per_gpu": [b / 2**30 for b in peaks]} if setup.gpus > 1 else {}),
               "cache_gib": sum(held_bytes(c) for c in caches) / 2**30}
        setup.records.append(rec)
        return rec
    finally:
        del caches, cache, kw  # the loops' last cache too, before the memory is released
        _drop_taps(model)


def peak_bytes(kind: str, setup: GenSetup, B: int, probe_steps: int = 2) -> int:
    """Peak memory of batch B with the cache at its final length (synthetic prefill, then decode steps); with several
    GPUs, that of the fullest one."""
    keep = setup.prompt
    try:
        setup.prompt = setup.prompt + setup.new_tokens - probe_steps
        run_generation(kind, setup, B, real_prefill=False, steps=probe_steps)
        setup.records.pop()
        return max(setup.peaks())
    finally:
        setup.prompt = keep
        _release()


def run_at_max_batch(kind: str, setup: GenSetup, cap_bytes: float, limit: int, say=None) -> tuple[int, dict | None]:
    """Largest batch that fits: per-sequence memory from two probes (16 and 32 sequences: at 4 and 8 the allocator's
    rounding made CQ's 40 MiB per sequence read 55 on two GPUs, and the prediction 20% low) predicts it, then an
    untimed and a timed run start there and step down 4% at a time on out-of-memory until both complete (with
    micro-batches, a batch has at least one row per micro-batch)."""
    say = say or (lambda *_: None)
    b1 = max(16, setup.micro)
    while True:  # smaller probes where 32 sequences do not fit (a long prompt, a low --memory-gb)
        try:
            p1, p2 = peak_bytes(kind, setup, b1), peak_bytes(kind, setup, 2 * b1)
            break
        except torch.OutOfMemoryError:
            _release()
            if b1 <= max(1, setup.micro):
                say(f"{kind}: {2 * b1} sequences do not fit")
                return 0, None
            b1 = max(1, setup.micro, b1 // 2)
    per_seq = max(1.0, (p2 - p1) / b1)
    fixed = p1 - b1 * per_seq
    b = max(setup.micro, min(limit, int((0.97 * cap_bytes - fixed) / per_seq)))
    say(f"{kind}: {per_seq / 2**20:.1f} MiB per sequence, predicted max batch {b}")
    while b >= setup.micro:
        try:
            rec = _timed_after_untimed(kind, setup, b)
            rec["per_sequence_mib"] = per_seq / 2**20
            return b, rec
        except torch.OutOfMemoryError:
            say(f"{kind}: batch {b} OOM")
            _release()
            b = int(b * 0.96)
    return 0, None


def _timed_after_untimed(kind: str, setup: GenSetup, B: int) -> dict:
    """A synthetic-prefill run of batch B after an untimed one (a first run at a new size is slow); its record."""
    run_generation(kind, setup, B, real_prefill=False)
    setup.records.pop()
    return run_generation(kind, setup, B, real_prefill=False)


def _unpipelined(kind: str, setup: GenSetup, B: int, say) -> dict | None:
    """The baseline of pipelining: batch B decoded as one (no micro-batches), an untimed then a timed run."""
    keep = setup.micro
    try:
        setup.micro = 1
        say(f"{kind}: batch {B} without micro-batches (the pipelining baseline)")
        return _timed_after_untimed(kind, setup, B)
    except torch.OutOfMemoryError:
        say(f"{kind}: batch {B} without micro-batches OOM")
        _release()
        return None
    finally:
        setup.micro = keep


@torch.no_grad()
def gpu_ms_per_step(kind: str, setup: GenSetup, B: int, steps: int = 8) -> float:
    """GPU time of one decode step (ms): the device time of every kernel and copy that `steps` greedy decode steps
    launch, summed (torch.profiler; over all GPUs with gpus > 1, whose layers run one after the other), at batch B
    over a synthetic cache of prompt + new_tokens / 2 tokens (the mean length of the timed decode), after two
    untimed steps. Where the wall time of a step is bound by the host (Python and launches, at small batches), this
    is what the GPU itself spends on it."""
    cache = _make_cache(kind, setup)
    try:
        _synthetic_fill(kind, cache, setup, B, setup.prompt + setup.new_tokens // 2)
        if kind != "dynamic":
            _pregrow(cache, setup.prompt + setup.new_tokens // 2 + steps + 3)
        tok = torch.zeros(B, 1, dtype=torch.long, device="cuda")
        return gpu_time_us(lambda: _decode(setup.model, cache, tok, 1, setup.sync), warmup=2, reps=steps) / 1e3
    finally:
        del cache
        _drop_taps(setup.model)


def _paired(run, base: str, setup: GenSetup, batch: int, repeats: int, say, label: str) -> dict:
    """An untimed run of each cache, then `repeats` paired timed runs (`base`, then "cq") at one batch through `run`
    (kind, setup, batch) -> record; the speedup is the median of the paired ratios of decode tokens/s and the pair
    reported is the median one."""
    for kind in (base, "cq"):
        say(f"{label}: untimed run of {kind}")
        run(kind, setup, batch)
    setup.records.clear()
    runs = []
    for i in range(repeats):
        say(f"{label}, run {i + 1}/{repeats}: {base}, cq")
        runs.append((run(base, setup, batch), run("cq", setup, batch)))
    ratios = [cq["decode_tok_s"] / b["decode_tok_s"] for b, cq in runs]
    mid = sorted(range(repeats), key=ratios.__getitem__)[(repeats - 1) // 2]  # the run of the (lower) median ratio
    return {base: runs[mid][0], "cq": runs[mid][1], "decode_speedup": statistics.median(ratios),
            "decode_speedup_runs": ratios, "repeats": repeats, "runs": [{base: b, "cq": c} for b, c in runs]}


def _same_batch(setup: GenSetup, batch: int, repeats: int, say) -> dict:
    """Paired runs of DynamicCache and CQ at one batch with a real prefill (_paired), then each cache's GPU time per
    decode step (gpu_ms_per_step), which tells whether the wall time of that batch is the GPU's or the host's."""
    out = _paired(run_generation, "dynamic", setup, batch, repeats, say, f"same batch {batch}")
    gpu = {}
    for kind in ("dynamic", "cq"):
        say(f"same batch {batch}: GPU time per decode step of {kind} (torch.profiler)")
        gpu[kind] = gpu_ms_per_step(kind, setup, batch)
    return {**out, "gpu_ms_per_step": gpu, "gpu_time_ratio": gpu["dynamic"] / gpu["cq"]}


@torch.no_grad()
def run_graph_generation(kind: str, setup: GenSetup, B: int) -> dict:
    """Real prefill of `prompt` random tokens, then `new_tokens` greedy steps of which all but the first two (the
    warm-up CUDA graphs ask for) are replays of one captured step (graphs.StaticDecoder); `kind`: "static"
    (transformers' StaticCache, bf16) or "cq" (CQCache in static mode). Timed: the replays."""
    from .cache import held_bytes
    from .graphs import StaticDecoder, static_cache

    model, cap = setup.model, setup.prompt + setup.new_tokens
    setup.reset_peak()
    cache = static_cache(model, kind, cap, setup.codebook, window=setup.window)
    try:
        g = torch.Generator(device="cuda").manual_seed(2)
        ids = torch.randint(0, model.config.vocab_size, (B, setup.prompt), generator=g, device="cuda")
        dec = StaticDecoder(model, cache, cap, graph=True, chunk=setup.chunk)
        setup.sync()
        t0 = time.perf_counter()
        first = dec.prefill(ids)
        setup.sync()
        t_prefill = time.perf_counter() - t0
        dec.decode(first, setup.new_tokens)
        tm = dec.timings
        rec = {"cache": kind, "batch": B, "prompt": setup.prompt, "new_tokens": setup.new_tokens, "graph": tm["graph"],
               "timed_steps": tm["steps"], "graphs_per_step": tm.get("graphs_per_step", 1), "prefill_s": t_prefill,
               "decode_s": tm["seconds"],
               "decode_tok_s": B * tm["steps"] / tm["seconds"], "ms_per_step": 1e3 * tm["seconds"] / tm["steps"],
               "peak_gib": max(setup.peaks()) / 2**30, "cache_gib": held_bytes(cache) / 2**30}
        setup.records.append(rec)
        return rec
    finally:
        del cache
        _drop_taps(model)


def _graph_same_batch(setup: GenSetup, batch: int, repeats: int, say) -> dict:
    """CUDA graphs at one batch: paired runs of StaticCache and CQ (_paired over run_graph_generation)."""
    return _paired(run_graph_generation, "static", setup, batch, repeats, say, f"CUDA graphs, batch {batch}")


def _check_model_args(kv_heads: int, memory_gb: float, window: int, layers: int, gpus: int) -> None:
    """The settings of _bench_model's model and of its caches, checked before a GPU is looked for."""
    if kv_heads < 1 or 32 % kv_heads:
        raise ConfigError(f"--kv-heads {kv_heads}: must divide the 32 query heads")
    if memory_gb <= 0:
        raise ConfigError(f"--memory-gb {memory_gb}: must be above 0")
    _check_window(window)
    layer_device_map(layers, gpus)  # checks gpus against the layers


def _bench_model(command: str, layers: int, kv_heads: int, gpus: int, memory_gb: float, spec: str, say):
    """The Llama-2-7b-shaped model with random weights, its layers spread over `gpus` GPUs, each GPU capped at
    memory_gb, and a random codebook: (model, codebook, device info, the cap in bytes)."""
    if not torch.cuda.is_available():
        raise ConfigError(f"{command} needs a CUDA GPU")
    if gpus > torch.cuda.device_count():
        raise ConfigError(f"--gpus {gpus}: only {torch.cuda.device_count()} CUDA GPU(s) visible")
    # DynamicCache regrows every layer's tensors by one token per step (torch.cat); without expandable segments
    # the caching allocator fragments and, near the memory cap, frees and re-maps memory every step. Both caches
    # run with the same allocator setting (it must be set before CUDA allocates anything).
    if not torch.cuda.is_initialized():
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    total = min(torch.cuda.get_device_properties(d).total_memory for d in range(gpus))
    frac = min(1.0, memory_gb * 1e9 / total)
    for d in range(gpus):
        torch.cuda.set_per_process_memory_fraction(frac, d)
    info = device_info()
    if gpus > 1:
        info["gpus"] = gpus
        info["devices"] = [torch.cuda.get_device_name(d) for d in range(gpus)]
    say("building the model" + (f" (layers spread over {gpus} GPUs)" if gpus > 1 else ""))
    model = spread_model(random_llama(layers, kv_heads=kv_heads), gpus)
    codebook = random_codebook(model, QuantSpec.parse(spec))
    from .cache import prepare_model

    prepare_model(model)  # both caches run under the "cq" attention (SDPA for dense K/V)
    return model, codebook, info, frac * total


def generate_bench(batch: int = 8, prompt: int = 2048, new_tokens: int = 256, spec: str = "8c8b", layers: int = 32,
                   memory_gb: float = 80.0, search: bool = True, max_search: int = 2048, progress=None,
                   kv_heads: int = 32, repeats: int = 3, window: int = 0, gpus: int = 1,
                   same_batch: bool = True, graphs: bool = False, micro_batches: int = 1) -> dict:
    """Every timed run is preceded by an untimed run of the same cache at the same batch and length: the first run at
    a new size is slow (DynamicCache, whose tensors grow by torch.cat at every step, ran 3x slower in its first run on
    the H100, cause not found; not the allocator). Same batch: `repeats` paired timed runs (DynamicCache then
    CQ), the speedup is the median of the paired ratios (at a small batch decode is bound by the host's Python and
    launch overhead, which varies from run to run); same_batch=False skips that part. graphs: also the same batch
    with every decode step but two replayed as a CUDA graph, transformers' StaticCache against the CQ cache in static
    mode (_graph_same_batch). Largest batch (search): one
    timed run per cache, after an untimed one. gpus > 1: the
    layers spread over cuda:0 .. cuda:gpus-1 (spread_model), memory_gb is the cap of each GPU and a batch fits when
    the fullest GPU stays under it. micro_batches > 1 (with gpus > 1): every timed eager decode (not the graph runs,
    nor the GPU time per step, which is summed over kernels) cuts its batch into that many micro-batches pipelined over the GPUs (pipeline.MicroBatches), and the largest-batch
    part also times each cache's batch decoded as one, in the same run (the pipelining's baseline)."""
    _check_positive(batch=batch, prompt=prompt, new_tokens=new_tokens, layers=layers, repeats=repeats,
                    max_batch=max_search)
    _check_model_args(kv_heads, memory_gb, window, layers, gpus)
    if micro_batches < 1:
        raise ConfigError(f"--micro-batches {micro_batches}: must be at least 1")
    if micro_batches > 1 and gpus < 2:
        raise ConfigError(f"--micro-batches {micro_batches}: micro-batches are pipelined over the GPUs of a model "
                          f"split by layers; needs --gpus 2 or more (got {gpus})")
    if same_batch and micro_batches > batch:
        raise ConfigError(f"--micro-batches {micro_batches}: at most --batch ({batch}), one row per micro-batch")
    if search and micro_batches > max_search:
        raise ConfigError(f"--micro-batches {micro_batches}: at most --max-batch ({max_search}), one row per micro-batch")
    if micro_batches > 1 and not (same_batch or search):
        raise ConfigError(f"--micro-batches {micro_batches}: pipelines eager decoding; with --no-same-batch and "
                          f"--no-search only the --graphs runs are left")
    if not (same_batch or search or graphs):
        raise ConfigError("--no-same-batch with --no-search and no --graphs: nothing to measure")
    if graphs and new_tokens < 3:
        raise ConfigError(f"--graphs with --new-tokens {new_tokens}: at least 3 (two warm-up steps, then replays)")
    say = progress or (lambda *_: None)
    model, codebook, info, cap = _bench_model("bench generate", layers, kv_heads, gpus, memory_gb, spec, say)
    setup = GenSetup(model, codebook, prompt, new_tokens, window=window, gpus=gpus, micro=micro_batches)
    out: dict = {**info, "memory_cap_gb": memory_gb, "micro_batches": micro_batches, "spec": spec, "window": window, "layers": layers, "kv_heads": kv_heads,
                 "prompt": prompt,
                 "new_tokens": new_tokens, "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")}
    say("warm-up (kernel build, cuBLAS handles, allocator)")
    warm = GenSetup(model, setup.codebook, prompt=min(prompt, 256), new_tokens=4, chunk=setup.chunk, window=window,
                    gpus=gpus, micro=micro_batches)
    for kind in ("dynamic", "cq"):
        run_generation(kind, warm, max(2, micro_batches))
        run_generation(kind, warm, max(2, micro_batches), real_prefill=False)
    if same_batch:
        out["same_batch"] = _same_batch(setup, batch, repeats, say)
    if graphs:
        out["graphs"] = _graph_same_batch(setup, batch, repeats, say)
    if search:
        bd, mdyn = run_at_max_batch("dynamic", setup, cap, max_search, say)
        bc, mcq = run_at_max_batch("cq", setup, cap, max_search, say)
        out["max_batch"] = {"dynamic": mdyn, "cq": mcq, "dynamic_batch": bd, "cq_batch": bc,
                            "search_limit": max_search,
                            "throughput_ratio": (mcq["decode_tok_s"] / mdyn["decode_tok_s"]) if mdyn and mcq else None}
        if micro_batches > 1:
            base = {k: _unpipelined(k, setup, b, say) for k, b, rec in (("dynamic", bd, mdyn), ("cq", bc, mcq)) if rec}
            out["max_batch"]["unpipelined"] = base
            out["max_batch"]["pipeline_speedup"] = {
                k: out["max_batch"][k]["decode_tok_s"] / r["decode_tok_s"] for k, r in base.items() if r}
    out["kernels"] = ops.kernel_status()
    out["records"] = setup.records
    return out


PIPELINE_WORKLOADS = ("decode", "eval", "lmeval")


@torch.no_grad()
def _lmeval_like(model, ids: torch.Tensor, method, batch: int, micro_batches: int) -> tuple[float, int, float]:
    """(summed NLL, tokens, seconds) of `ids` scored the way lm-eval's HFLM scores loglikelihood requests through
    `cqtool eval` (lmeval.use_method, with `micro_batches`): one forward per batch of `batch` rows given only
    input_ids, the log-softmax over the vocabulary, the targets' log-probabilities read on the host batch by batch
    (every position scored: a stand-in for HFLM's continuation-only scores of shorter, padded requests)."""
    from .lmeval import use_method
    from .models import model_device

    dev = model_device(model)
    nll = 0.0
    sync_all()
    t0 = time.perf_counter()
    with use_method(model, method, micro_batches):
        for rows in ids.split(batch):
            x = rows.to(dev)
            logp = torch.log_softmax(model(x).logits.float(), dim=-1)
            nll -= float(logp[:, :-1].gather(-1, x[:, 1:, None].to(logp.device)).sum())  # a host read per batch
    sync_all()
    return nll, ids[:, 1:].numel(), time.perf_counter() - t0


def pipeline_bench(batch: int = 512, micro_batches=(1, 2, 3, 4), cache: str = "cq", prompt: int = 2048,
                   new_tokens: int = 64, spec: str = "8c8b", layers: int = 32, kv_heads: int = 32, gpus: int = 2,
                   memory_gb: float = 80.0, window: int = 0, repeats: int = 1, progress=None,
                   workload: str = "decode", batches: int = 8) -> dict:
    """Micro-batches pipelined over the GPUs of a model spread over `gpus` GPUs (pipeline.MicroBatches), one
    setting per number of micro-batches in `micro_batches`; 1 = the batch run as one, the baseline, always timed.
    workload "decode": greedy decode of `new_tokens` steps of `batch` sequences over a synthetic prefill of `prompt`
    tokens (as the largest-batch part of generate_bench), each timed run after an untimed one of the same size.
    workload "eval": what `cqtool eval --micro-batches` runs (evaluate.windows_nll): `batches` forwards of `batch`
    random windows of `prompt` tokens, each from an empty cache (CQ, or none for "dynamic": full precision), and
    their loss; an untimed pass over two batches first. workload "lmeval": lm-eval-shaped forwards of the same windows
    (input_ids only, through lmeval.use_method as `cqtool eval --tasks ... --micro-batches` runs them; _lmeval_like:
    the log-softmax over every position, read on the host after each batch as lm-eval's HFLM reads its scores; real
    requests are shorter, padded, and scored on their continuation only). `repeats` rounds over all the counts; each count's speedup
    is the median over the rounds of its tokens/s over the baseline's in the same round. A count that runs out of
    memory is reported as such."""
    micro = sorted(set(micro_batches) | {1})
    if workload not in PIPELINE_WORKLOADS:
        raise ConfigError(f"--workload {workload!r}: must be one of {', '.join(PIPELINE_WORKLOADS)}")
    if cache not in ("cq", "dynamic"):
        raise ConfigError(f"--cache {cache!r}: must be 'cq' or 'dynamic'")
    _check_positive(batch=batch, prompt=prompt, new_tokens=new_tokens, layers=layers, repeats=repeats, batches=batches)
    if gpus < 2:
        raise ConfigError(f"--gpus {gpus}: micro-batches are pipelined over the GPUs of a model split by layers; "
                          f"needs 2 or more")
    _check_model_args(kv_heads, memory_gb, window, layers, gpus)
    bad = [m for m in micro if m < 1 or m > batch]
    if bad:
        raise ConfigError(f"--micro-batches {bad[0]}: must be between 1 and --batch ({batch}), one row per micro-batch")
    say = progress or (lambda *_: None)
    model, codebook, info, _ = _bench_model("bench pipeline", layers, kv_heads, gpus, memory_gb, spec, say)
    setup = GenSetup(model, codebook, prompt, new_tokens, window=window, gpus=gpus)
    if workload == "decode":
        say("warm-up (kernel build, cuBLAS handles, allocator, the micro-batch streams)")
        for m in micro:
            warm = GenSetup(model, codebook, prompt=min(prompt, 256), new_tokens=4, window=window, gpus=gpus, micro=m)
            run_generation(cache, warm, max(2, m), real_prefill=False)

        def timed(m: int) -> dict:
            setup.micro = m
            rec = _timed_after_untimed(cache, setup, batch)
            return {**rec, "tok_s": rec["decode_tok_s"], "ms": 1e3 * rec["decode_s"] / new_tokens}
    else:
        from .evaluate import windows_nll
        from .methods import CQMethod, FullPrecision

        method = CQMethod(codebook, window=window or None) if cache == "cq" else FullPrecision()
        ids = torch.randint(0, model.config.vocab_size, (batches * batch, prompt), generator=torch.Generator().manual_seed(2))

        score = windows_nll if workload == "eval" else _lmeval_like

        def timed(m: int) -> dict:
            score(model, ids[: 2 * batch], method, batch, m)  # untimed
            setup.reset_peak()
            nll, count, secs = score(model, ids, method, batch, m)
            rec = {"workload": workload, "cache": cache, "batch": batch, "micro_batches": m, "batches": batches,
                   "window_tokens": prompt, "seconds": secs, "tok_s": ids.numel() / secs, "ms": 1e3 * secs / batches,
                   "nll_per_token": nll / count, "peak_gib_per_gpu": [b / 2**30 for b in setup.peaks()]}
            setup.records.append(rec)
            _release()
            return rec
    rounds: list[dict] = []
    for r in range(repeats):
        runs: dict = {}
        for m in micro:
            say(f"round {r + 1}/{repeats}: {workload}, {cache}, batch {batch} in {m} micro-batch{'es' if m > 1 else ''}")
            try:
                runs[m] = timed(m)
            except torch.OutOfMemoryError:
                say(f"{cache}: batch {batch} in {m} micro-batches OOM")
                _release()
                runs[m] = None
        rounds.append(runs)
    rows = []
    for m in micro:
        ok = [rd[m] for rd in rounds if rd[m]]
        ratios = [rd[m]["tok_s"] / rd[1]["tok_s"] for rd in rounds if rd[m] and rd[1]]
        rows.append({"micro_batches": m, "oom": not ok,
                     "tok_s": statistics.median(x["tok_s"] for x in ok) if ok else None,
                     "ms": statistics.median(x["ms"] for x in ok) if ok else None,
                     "peak_gib_per_gpu": ok[-1]["peak_gib_per_gpu"] if ok else None,
                     "speedup": statistics.median(ratios) if ratios else None, "speedups": ratios})
    return {**info, "workload": workload, "cache": cache, "batch": batch, "prompt": prompt, "new_tokens": new_tokens,
            "batches": batches, "spec": spec, "layers": layers, "kv_heads": kv_heads, "window": window,
            "memory_cap_gb": memory_gb, "repeats": repeats, "rows": rows, "kernels": ops.kernel_status(),
            "records": setup.records}


def fmt_ms(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def round_floats(obj, nd: int = 5):
    if isinstance(obj, float):
        return float(f"{obj:.{nd}g}") if math.isfinite(obj) else obj
    if isinstance(obj, dict):
        return {k: round_floats(v, nd) for k, v in obj.items()}
    if isinstance(obj, list):
        return [round_floats(v, nd) for v in obj]
    return obj
