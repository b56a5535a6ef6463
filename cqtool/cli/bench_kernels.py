"""cqtool bench attention | prefill | encode | generate | pipeline: the CUDA kernels against baselines measured in the same run."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..config import ConfigError
from ._app import bench_app, console, user_errors


def _shapes(items: list[str] | None, default=None, form: str = "BATCHxCONTEXT", example: str = "e.g. 8x32768"):
    """--shape values as (int, int) pairs ("8x32768"), or `default` (the attention shapes) when none are given."""
    from ..bench_kernels import DEFAULT_SHAPES

    if not items:
        return DEFAULT_SHAPES if default is None else default
    out = []
    for it in items:
        try:
            b, s = it.lower().split("x")
            out.append((int(b), int(s)))
        except ValueError:
            raise ConfigError(f"--shape {it!r}: expected {form}, {example}") from None
    return tuple(out)


@bench_app.command("attention")
@user_errors
def attention_cmd(
    shape: Annotated[Optional[list[str]], typer.Option(help="BATCHxCONTEXT, repeatable [8x32768 1x4096 1x32768 32x8192]")] = None,
    spec: Annotated[Optional[list[str]], typer.Option(help="CQ quantizer for K and V, repeatable [8c8b 4c8b]")] = None,
    heads: Annotated[int, typer.Option(help="Query heads (32: Llama-2-7b)")] = 32,
    kv_heads: Annotated[Optional[int], typer.Option(help="KV heads, dividing --heads [= heads, MHA; 8: Llama-3-8b]")] = None,
    head_dim: Annotated[int, typer.Option(help="64 or 128")] = 128,
    window: Annotated[int, typer.Option(help="Recent tokens also held in full precision (paper: 128)")] = 0,
    reps: Annotated[int, typer.Option(help="Timed calls per measurement (median)")] = 30,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Save results as JSON")] = None,
):
    """One layer of decode attention from CQ codes vs torch SDPA bf16 on the same (dequantized) data."""
    from rich.table import Table

    from ..bench_kernels import DEFAULT_SPECS, attention_bench, round_floats
    from ..io import write_json

    res = attention_bench(_shapes(shape), tuple(spec or DEFAULT_SPECS), heads, head_dim, reps,
                          progress=lambda m: console.print(f"[dim]{m}[/]"), kv_heads=kv_heads, window=window)
    kv = f" ({kv_heads} kv heads)" if kv_heads and kv_heads != heads else ""
    kv += f", {window}-token full-precision window" if window else ""
    t = Table(title=f"decode attention per layer, {heads} heads{kv} x {head_dim}, {res['device']} "
                    f"(copy bandwidth {res['copy_bandwidth_tbs']:.2f} TB/s)")
    for col in ("quant", "batch x ctx", "SDPA bf16 ms", "CQ ms", "speedup", "as CUDA graphs: SDPA / CQ ms", "speedup",
                "CQ floor ms", "% of floor", "rel err"):
        t.add_column(col, justify="right")
    for r in res["rows"]:
        g = (f"{r['sdpa_graph_ms']:.3f} / {r['cq_graph_ms']:.3f}", f"{r['graph_speedup']:.1f}x") if "cq_graph_ms" in r \
            else ("failed", "-")
        t.add_row(r["quant"], f"{r['batch']}x{r['context']}", f"{r['sdpa_ms']:.3f}", f"{r['cq_ms']:.3f}",
                  f"{r['speedup']:.1f}x", *g, f"{r['cq_floor_ms']:.3f}", f"{100 * r['cq_floor_fraction']:.0f}%",
                  f"{r['rel_err_vs_sdpa']:.1e}")
    console.print(t)
    console.print("ms: medians of CUDA-event times around each call; as CUDA graphs: per call of 20 calls replayed from "
                  "one graph, the GPU's time without the host's launch gaps (how decode steps run with --cuda-graphs)")
    if json_out:
        write_json(json_out, round_floats(res))
        console.print(f"wrote {json_out}")


@bench_app.command("encode")
@user_errors
def encode_cmd(
    shape: Annotated[Optional[list[str]], typer.Option(help="BATCHxNEW_TOKENS, repeatable [1x1 8x1 64x1 512x1 733x1 8x2048]")] = None,
    spec: Annotated[Optional[list[str]], typer.Option(help="CQ quantizer for K and V, repeatable [8c8b 4c8b]")] = None,
    heads: Annotated[int, typer.Option(help="KV heads (32: Llama-2-7b)")] = 32,
    head_dim: Annotated[int, typer.Option(help="Channels per head")] = 128,
    reps: Annotated[int, typer.Option(help="Timed calls per measurement (median)")] = 30,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Save results as JSON")] = None,
):
    """One layer's encode of new K and V: the CUDA kernels (row, tiled, tensor-core, default) vs the PyTorch reference."""
    from rich.table import Table

    from ..bench_kernels import DEFAULT_ENCODE_SHAPES, DEFAULT_SPECS, encode_bench, round_floats
    from ..io import write_json

    shapes = _shapes(shape, DEFAULT_ENCODE_SHAPES, "BATCHxNEW_TOKENS", "e.g. 733x1 (a decode step) or 8x2048")
    res = encode_bench(shapes, tuple(spec or DEFAULT_SPECS), heads, head_dim, reps,
                       progress=lambda m: console.print(f"[dim]{m}[/]"))
    t = Table(title=f"encode of one layer's new K and V, {heads} kv heads x {head_dim}, bf16, {res['device']}; "
                    "(row): that kernel does not apply there, the next one ran; default: the kernel the default rule "
                    "ran; codes: row = tiled kernel, tensor-core codes equal to the row kernel's, default's equal to "
                    "the reference's")
    for col in ("quant", "batch x new", "reference ms", "row ms", "tiled ms", "tensor-core ms", "default ms", "vs ref",
                "codes"):
        t.add_column(col, justify="right")
    for r in res["rows"]:
        t.add_row(r["quant"], f"{r['batch']}x{r['tokens']}", f"{r['reference_ms']:.3f}", f"{r['row_ms']:.4f}",
                  f"{r['tiled_ms']:.4f}" + ("" if r["tiled_ran"] == "encode-tiled" else " (row)"),
                  f"{r['mma_ms']:.4f}" + ("" if r["mma_ran"] == "encode-mma" else f" ({r['mma_ran'][7:]})"),
                  f"{r['cq_ms']:.4f} {r['cq_kernel'][7:]}", f"{r['speedup']:.1f}x",
                  f"{'same' if r['kernels_same_codes'] else 'DIFFER'}, {100 * r['mma_agree_with_row']:.2f}%, "
                  f"{100 * r['agree_with_reference']:.2f}%")
    console.print(t)
    if json_out:
        write_json(json_out, round_floats(res))
        console.print(f"wrote {json_out}")


@bench_app.command("prefill")
@user_errors
def prefill_cmd(
    shape: Annotated[Optional[list[str]], typer.Option(help="BATCHxCONTEXT, repeatable [1x2048 1x8192 8x2048]")] = None,
    spec: Annotated[Optional[list[str]], typer.Option(help="CQ quantizer for K and V, repeatable [8c8b]")] = None,
    heads: Annotated[int, typer.Option(help="Query = kv heads (MHA, Llama-2-7b)")] = 32,
    head_dim: Annotated[int, typer.Option(help="64 or 128")] = 128,
    reps: Annotated[int, typer.Option(help="Timed calls per measurement (median)")] = 10,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Save results as JSON")] = None,
):
    """Causal attention of a whole sequence from CQ codes (prefill / eval kernel) vs torch SDPA bf16 (is_causal)."""
    from rich.table import Table

    from ..bench_kernels import DEFAULT_PREFILL_SHAPES, prefill_bench, round_floats
    from ..io import write_json

    res = prefill_bench(_shapes(shape, DEFAULT_PREFILL_SHAPES), tuple(spec or ("8c8b",)), heads, head_dim,
                        reps, progress=lambda m: console.print(f"[dim]{m}[/]"))
    t = Table(title=f"causal prefill attention per layer, {heads} heads x {head_dim}, {res['device']}")
    choices = list(res["rows"][0]["kernels"]) if res["rows"] else []
    for col in ["quant", "batch x ctx", "SDPA bf16 ms"] + [f"CQ {c} ms" for c in choices] + ["dequant ms", "rel err"]:
        t.add_column(col, justify="right")
    for r in res["rows"]:
        ks = r["kernels"]
        t.add_row(r["quant"], f"{r['batch']}x{r['context']}", f"{r['sdpa_ms']:.3f}",
                  *[f"{ks[c]['ms']:.3f} ({ks[c]['speedup']:.2f}x)" for c in choices], f"{r['dequant_ms']:.3f}",
                  f"{r['rel_err_vs_sdpa']:.1e}")
    console.print(t)
    console.print("(x) = SDPA time / CQ time: above 1 is faster than SDPA on dense bf16 K/V")
    if json_out:
        write_json(json_out, round_floats(res))
        console.print(f"wrote {json_out}")


def _spread(part: dict) -> str:
    """' (median of N paired runs: lo-hi x)' for a part of bench generate's result (bench_kernels._paired); '' for one run."""
    if part["repeats"] == 1:
        return ""
    r = part["decode_speedup_runs"]
    return f" (median of {part['repeats']} paired runs: {min(r):.2f}-{max(r):.2f}x)"


@bench_app.command("generate")
@user_errors
def generate_cmd(
    batch: Annotated[int, typer.Option(help="Batch of the same-batch comparison")] = 8,
    prompt: Annotated[int, typer.Option(help="Prompt tokens")] = 2048,
    new_tokens: Annotated[int, typer.Option(help="Generated tokens (greedy)")] = 256,
    spec: Annotated[str, typer.Option(help="CQ quantizer for K and V (random codebook)")] = "8c8b",
    layers: Annotated[int, typer.Option(help="Decoder layers of the Llama-2-7b-shaped model")] = 32,
    kv_heads: Annotated[int, typer.Option(help="KV heads (32: Llama-2-7b; 8: grouped-query, Llama-3-8b's attention)")] = 32,
    memory_gb: Annotated[float, typer.Option(help="GPU memory cap for the largest-batch search (GB)")] = 80.0,
    search: Annotated[bool, typer.Option(help="Also run each cache at its largest batch")] = True,
    same_batch: Annotated[bool, typer.Option(help="Run both caches at --batch (with a real prefill)")] = True,
    max_batch: Annotated[int, typer.Option(help="Upper bound of the largest-batch search")] = 1024,
    repeats: Annotated[int, typer.Option(help="Paired runs at the same batch (the speedup is their median)")] = 3,
    window: Annotated[int, typer.Option(help="CQ: recent tokens also kept in full precision (paper: 128)")] = 0,
    gpus: Annotated[int, typer.Option(help="Spread the model's layers over this many GPUs (each layer's cache on its "
                                           "GPU); --memory-gb is then the cap of each GPU")] = 1,
    graphs: Annotated[bool, typer.Option(help="Also at --batch with decode steps replayed as CUDA graphs: CQ vs "
                                              "transformers' StaticCache (with --window and --gpus too: one graph per GPU)")] = False,
    micro_batches: Annotated[int, typer.Option(help="With --gpus 2+: cut each eager decode's batch into this many "
                                                    "micro-batches pipelined over the GPUs (the largest-batch part also "
                                                    "times the batch decoded as one)")] = 1,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Save results as JSON")] = None,
):
    """Generation with a random Llama-2-7b-shaped model: CQ cache vs DynamicCache bf16 (tokens/s, peak memory)."""
    from rich.table import Table

    from ..bench_kernels import generate_bench, round_floats
    from ..io import write_json

    res = generate_bench(batch, prompt, new_tokens, spec, layers, memory_gb, search, max_batch,
                         progress=lambda m: console.print(f"[dim]{m}[/]"), kv_heads=kv_heads, repeats=repeats,
                         window=window, gpus=gpus, same_batch=same_batch, graphs=graphs, micro_batches=micro_batches)
    kv = f", {kv_heads} kv heads" if kv_heads != 32 else ""
    kv += f", CQ window {window}" if window else ""
    kv += f", {micro_batches} micro-batches pipelined" if micro_batches > 1 else ""
    t = Table(title=f"generation, Llama-2-7b shape ({layers} layers{kv}, random weights), {prompt}+{new_tokens} tokens, "
                    f"CQ-{spec}, {res['device']}" + (f" x {gpus}" if gpus > 1 else ""))
    peak_col = "peak GiB" if gpus == 1 else "peak GiB (fullest GPU)"
    for col in ("run", "cache", "batch", "prefill s", "decode tok/s", "end-to-end tok/s", peak_col, "cache GiB"):
        t.add_column(col, justify="right")
    sb = res.get("same_batch")
    rows = []
    for i, r in enumerate(sb["runs"] if sb else []):
        run = "same batch" if sb["repeats"] == 1 else f"same batch, run {i + 1}"
        rows += [(run, r["dynamic"]), (run, r["cq"])]
    gr = res.get("graphs")
    for i, r in enumerate(gr["runs"] if gr else []):
        run = "CUDA graphs" if gr["repeats"] == 1 else f"CUDA graphs, run {i + 1}"
        rows += [(run, r["static"]), (run, r["cq"])]
    if "max_batch" in res:
        rows += [("largest batch", res["max_batch"]["dynamic"]), ("largest batch", res["max_batch"]["cq"])]
        for kind, r in res["max_batch"].get("unpipelined", {}).items():
            rows.append(("largest batch, as one", r))  # the pipelining baseline: no micro-batches
    for run, r in rows:
        if r is None:
            continue
        e2e = r.get("end_to_end_tok_s")
        t.add_row(run, r["cache"], str(r["batch"]), f"{r['prefill_s']:.2f}" + ("" if r.get("real_prefill", True) else " (synthetic)"),
                  f"{r['decode_tok_s']:.0f}", "-" if e2e is None else f"{e2e:.0f}", f"{r['peak_gib']:.1f}", f"{r['cache_gib']:.2f}")
    console.print(t)
    if sb:
        console.print(f"same batch {batch}: CQ decode {sb['decode_speedup']:.2f}x DynamicCache{_spread(sb)}")
        g = sb["gpu_ms_per_step"]
        wall = {k: 1e3 * sb[k]["batch"] / sb[k]["decode_tok_s"] for k in ("dynamic", "cq")}
        over = " summed over the GPUs" if gpus > 1 else ""
        console.print(f"same batch {batch}, per decode step: wall {wall['dynamic']:.2f} ms (DynamicCache) vs "
                      f"{wall['cq']:.2f} ms (CQ); GPU time{over} {g['dynamic']:.2f} vs {g['cq']:.2f} ms = "
                      f"{sb['gpu_time_ratio']:.2f}x less for CQ (where the wall time is well above the GPU time, the "
                      f"step is bound by the host's Python and launches)")
    if gr:
        console.print(f"same batch {batch}, CUDA graphs ({gr['cq']['timed_steps']} replayed steps timed): "
                      f"{gr['static']['ms_per_step']:.2f} ms per step (StaticCache) vs {gr['cq']['ms_per_step']:.2f} ms "
                      f"(CQ): CQ decode {gr['decode_speedup']:.2f}x StaticCache{_spread(gr)}")
    if "max_batch" in res and res["max_batch"]["throughput_ratio"]:
        mb = res["max_batch"]
        cap = f"{memory_gb:g} GB" if gpus == 1 else f"{gpus} x {memory_gb:g} GB"
        console.print(f"largest batch within {cap}: DynamicCache {mb['dynamic_batch']}, CQ {mb['cq_batch']}"
                      f" (search limit {mb['search_limit']}); decode throughput {mb['throughput_ratio']:.2f}x")
    for kind, x in res.get("max_batch", {}).get("pipeline_speedup", {}).items():
        name = "CQ" if kind == "cq" else "DynamicCache"
        console.print(f"{name} at batch {res['max_batch'][kind]['batch']}: {micro_batches} micro-batches pipelined over "
                      f"{gpus} GPUs decode {x:.2f}x the tokens/s of the batch decoded as one (same run)")
    if json_out:
        write_json(json_out, round_floats(res))
        console.print(f"wrote {json_out}")


def _counts(text: str) -> tuple[int, ...]:
    """--micro-batches "1,2,4" -> (1, 2, 4)."""
    try:
        out = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        out = ()
    if not out:
        raise ConfigError(f"--micro-batches {text!r}: expected counts separated by commas, e.g. 1,2,3,4")
    return out


@bench_app.command("pipeline")
@user_errors
def pipeline_cmd(
    batch: Annotated[int, typer.Option(help="Sequences decoded, or windows per forward with --workload eval / lmeval "
                                            "(in every setting)")] = 512,
    micro_batches: Annotated[str, typer.Option(help="Micro-batch counts to time, comma-separated (1, the batch decoded "
                                                    "as one, is always timed: the baseline)")] = "1,2,3,4",
    workload: Annotated[str, typer.Option(help="decode: greedy decode steps | eval: forwards of whole windows and their "
                                               "loss, as `cqtool eval --micro-batches` runs perplexity | lmeval: the "
                                               "same windows scored as lm-eval's requests are (a host read per "
                                               "batch)")] = "decode",
    cache: Annotated[str, typer.Option(help="cq | dynamic (decode: transformers' DynamicCache, bf16; eval, lmeval: "
                                            "full precision)")] = "cq",
    gpus: Annotated[int, typer.Option(help="Spread the model's layers over this many GPUs")] = 2,
    prompt: Annotated[int, typer.Option(help="Cached tokens before decoding (synthetic prefill); eval, lmeval: tokens "
                                             "per window")] = 2048,
    new_tokens: Annotated[int, typer.Option(help="Greedy decode steps timed")] = 64,
    batches: Annotated[int, typer.Option(help="eval, lmeval: forwards of --batch windows timed")] = 8,
    spec: Annotated[str, typer.Option(help="CQ quantizer for K and V (random codebook)")] = "8c8b",
    layers: Annotated[int, typer.Option(help="Decoder layers of the Llama-2-7b-shaped model")] = 32,
    kv_heads: Annotated[int, typer.Option(help="KV heads (32: Llama-2-7b; 8: grouped-query)")] = 32,
    memory_gb: Annotated[float, typer.Option(help="Memory cap of each GPU (GB)")] = 80.0,
    window: Annotated[int, typer.Option(help="CQ: recent tokens also kept in full precision")] = 0,
    repeats: Annotated[int, typer.Option(help="Rounds over all the counts (speedups are medians over rounds)")] = 1,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Save results as JSON")] = None,
):
    """Micro-batches pipelined over the GPUs of a layer-split model (Llama-2-7b shape, random weights): tokens/s of
    one batch (decode steps, or --workload eval / lmeval: whole-window forwards and their loss) for each micro-batch count,
    against the batch run as one in the same run ("vs as one": the median over --repeats rounds of each round's
    ratio; tokens/s: the median over rounds)."""
    from rich.table import Table

    from ..bench_kernels import pipeline_bench, round_floats
    from ..io import write_json

    res = pipeline_bench(batch, _counts(micro_batches), cache, prompt, new_tokens, spec, layers, kv_heads, gpus,
                         memory_gb, window, repeats, progress=lambda m: console.print(f"[dim]{m}[/]"),
                         workload=workload, batches=batches)
    shape = (f"Llama-2-7b shape ({layers} layers{f', {kv_heads} kv heads' if kv_heads != 32 else ''}, random "
             f"weights), {res['device']} x {gpus}")
    if workload == "decode":
        name = "CQ-" + spec if cache == "cq" else "DynamicCache bf16"
        t = Table(title=f"{name} decode, batch {batch}, {prompt}+{new_tokens} tokens, {shape}")
        cols = ("micro-batches", "decode tok/s", "ms per step", "vs as one", "peak GiB per GPU")
    else:
        name = "CQ-" + spec if cache == "cq" else "full precision"
        what = "eval forwards" if workload == "eval" else "lm-eval-style forwards (a host read per batch)"
        t = Table(title=f"{what} ({name}), {batches} batches of {batch} windows of {prompt} tokens, {shape}")
        cols = ("micro-batches", "tokens/s", "ms per batch", "vs as one", "peak GiB per GPU")
    for col in cols:
        t.add_column(col, justify="right")
    for r in res["rows"]:
        if r["oom"]:
            t.add_row(str(r["micro_batches"]), "out of memory", "-", "-", "-")
            continue
        sp = "-" if r["speedup"] is None else ("1.00x (baseline)" if r["micro_batches"] == 1 else f"{r['speedup']:.2f}x")
        if r["micro_batches"] > 1 and len(r["speedups"]) > 1:
            sp += f" ({min(r['speedups']):.2f}-{max(r['speedups']):.2f})"
        t.add_row(str(r["micro_batches"]), f"{r['tok_s']:.0f}", f"{r['ms']:.1f}", sp,
                  " / ".join(f"{x:.1f}" for x in r["peak_gib_per_gpu"]))
    console.print(t)
    best = max((r for r in res["rows"] if r["speedup"]), key=lambda r: r["speedup"], default=None)
    if best and best["micro_batches"] > 1:
        console.print(f"best: {best['micro_batches']} micro-batches, {best['speedup']:.2f}x the tokens/s of the batch "
                      f"run as one (at most {gpus}x with {gpus} GPUs of equal work)")
    if json_out:
        write_json(json_out, round_floats(res))
        console.print(f"wrote {json_out}")
