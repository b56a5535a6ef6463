"""cqtool eval"""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..config import ConfigError, EvalConfig
from ._app import DEVICE_MAP_HELP, app, console, user_errors

EVAL_KEYS = {"device_map", "model", "codebook", "methods", "tasks", "window", "sinks", "seqlen", "limit", "batch_size", "data_dir",
             "device", "dtype", "seed", "micro_batches", "calib_dir", "calib_data", "calib_nsamples", "calib_seqlen", "json", "report_dir"}


def _split(s):
    if s is None:
        return None
    return tuple(x.strip() for x in (s if isinstance(s, (list, tuple)) else str(s).split(",")) if str(x).strip())


@app.command("eval")
@user_errors
def eval_cmd(
    model: Annotated[Optional[str], typer.Option(help="Hub id, alias, local dir or .gguf file")] = None,
    codebook: Annotated[Optional[str], typer.Option(help="CQ codebook file(s), comma list; omit for the fp16/bf16 baseline")] = None,
    methods: Annotated[Optional[str], typer.Option(help="Comma list: fp16,int2,kivi2,cq-4c8b,cq-8c8b-w128,cq-8c8b-uniform")] = None,
    tasks: Annotated[Optional[str], typer.Option(help="wikitext[,arc_easy,arc_challenge,piqa,winogrande,hellaswag,lambada_openai]")] = None,
    window: Annotated[Optional[int], typer.Option(help="Full-precision window of recent tokens")] = None,
    sinks: Annotated[Optional[int], typer.Option(help="Full-precision first tokens")] = None,
    seqlen: Annotated[Optional[int], typer.Option(help="Perplexity window length [2048]")] = None,
    limit: Annotated[Optional[int], typer.Option(help="First N windows / items per task")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Sequences per forward [1]")] = None,
    data_dir: Annotated[Optional[str], typer.Option(help="Local data (wikitext-2-raw/wiki.test.raw, multiple-choice/*.jsonl)")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda[:N]")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="auto | float32 | float16 | bfloat16")] = None,
    device_map: Annotated[Optional[str], typer.Option(help=DEVICE_MAP_HELP)] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    micro_batches: Annotated[Optional[int], typer.Option(help="On GPUs: cut each batch (perplexity windows, "
                                                         "lm-eval requests) into this many micro-batches on their own "
                                                         "CUDA streams, pipelined over the GPUs of a model spread by "
                                                         "--device-map [1]")] = None,
    calib_dir: Annotated[Optional[str], typer.Option(help="Where CQ codebooks for --methods live / are calibrated")] = None,
    calib_data: Annotated[Optional[str], typer.Option(help="Calibration text when a CQ method must be calibrated")] = None,
    calib_nsamples: Annotated[Optional[int], typer.Option()] = None,
    calib_seqlen: Annotated[Optional[int], typer.Option()] = None,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Save results as JSON")] = None,
    report_dir: Annotated[Optional[str], typer.Option(help="Write results.json, report.md and a PNG plot here")] = None,
    backend: Annotated[str, typer.Option(help="auto: CUDA kernels where they apply | reference: PyTorch reference only")] = "auto",
    recipe: Annotated[Optional[str], typer.Option(help="YAML recipe with defaults for these options")] = None,
):
    """Perplexity (WikiText-2) and lm-eval tasks through a CQ cache (or baselines), one table for all methods."""
    from ..evaluate import run_eval
    from ..io import write_json
    from ..progress import progress_bar
    from ..recipes import load_recipe, pick

    from .. import attention

    r = load_recipe(recipe, EVAL_KEYS)
    model = pick(model, r, "model", None)
    if not model:
        raise ConfigError("--model is required (or give it in --recipe)")
    cfg = EvalConfig(
        model=model, tasks=_split(pick(tasks, r, "tasks", "wikitext")), methods=_split(pick(methods, r, "methods", "")) or (),
        codebook=pick(codebook, r, "codebook", None), window=pick(window, r, "window", None), sinks=pick(sinks, r, "sinks", None),
        seqlen=pick(seqlen, r, "seqlen", 2048), limit=pick(limit, r, "limit", None), batch_size=pick(batch_size, r, "batch_size", 1),
        data_dir=pick(data_dir, r, "data_dir", None), device=pick(device, r, "device", "auto"), dtype=pick(dtype, r, "dtype", "auto"), device_map=pick(device_map, r, "device_map", None),
        seed=pick(seed, r, "seed", 0), micro_batches=pick(micro_batches, r, "micro_batches", 1),
    )
    calib = {k: v for k, v in {"dir": pick(calib_dir, r, "calib_dir", None), "data": pick(calib_data, r, "calib_data", None),
                               "nsamples": pick(calib_nsamples, r, "calib_nsamples", None),
                               "seqlen": pick(calib_seqlen, r, "calib_seqlen", None)}.items() if v is not None}
    with attention.backend(backend), progress_bar() as track:
        out = run_eval(cfg, calib, progress=track)
    _print(out)
    if len(out["devices"]) > 1:
        console.print(f"model spread over {', '.join(out['devices'])} (--device-map {cfg.device_map})")
    json_out = pick(json_out, r, "json", None)
    if json_out:
        write_json(json_out, out)
    report_dir = pick(report_dir, r, "report_dir", None)
    if report_dir:
        from ..report import write_report

        write_report(out["results"], report_dir, title=f"{model}: KV cache methods")
        console.print(f"report written to {report_dir}")


def _print(out) -> None:
    try:
        from ..report import print_table

        print_table(out["results"], console)
        return
    except ImportError:
        pass
    from rich.table import Table

    t = Table(title=f"{out['model']['model_id']}")
    keys = [k for k in ("perplexity", "word_perplexity") if any(k in r for r in out["results"])]
    extra = sorted({k for r in out["results"] for k in r if "/" not in k and k in ("arc_easy", "arc_challenge", "piqa", "winogrande", "hellaswag", "lambada_openai")})
    for col in ["method", "bits/channel", *keys, *extra]:
        t.add_column(col, justify="right")
    for r in out["results"]:
        t.add_row(r["method"], f"{r['bits_per_channel']:.3f}", *[f"{r[k]:.3f}" for k in keys], *[f"{r.get(k, float('nan')):.4f}" for k in extra])
    console.print(t)
