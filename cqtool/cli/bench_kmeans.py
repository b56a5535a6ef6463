"""cqtool bench kmeans: batched torch k-means on a whole model's K/V problem vs faiss on a subset of groups."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from ._app import bench_app, console, user_errors


@bench_app.command("kmeans")
@user_errors
def kmeans_cmd(
    layers: Annotated[Optional[int], typer.Option(help="Layers (K and V each) [32 on CUDA, 1 on CPU]")] = None,
    channels: Annotated[Optional[int], typer.Option(help="K (or V) channels per layer [4096 on CUDA, 256 on CPU]")] = None,
    tokens: Annotated[Optional[int], typer.Option(help="Calibration tokens per group [32768 on CUDA, 4096 on CPU]")] = None,
    c: Annotated[int, typer.Option("--c", help="Channels per group")] = 8,
    bits: Annotated[int, typer.Option(help="Code bits b: k = 2**b centroids (CQ-8c8b: --c 8 --bits 8)")] = 8,
    iters: Annotated[int, typer.Option(help="Lloyd iterations, both backends, no early stop")] = 100,
    faiss_groups: Annotated[int, typer.Option(help="Groups faiss runs on; its time is scaled to all groups (0: skip)")] = 8,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:N], for the torch backend")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of the synthetic activations and of k-means")] = 0,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Save results as JSON")] = None,
):
    """Time k-means at calibration scale on synthetic LLM-like keys/values (default: Llama-2-7B, CQ-8c8b)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.table import Table

    from ..bench_kmeans import KMeansBenchConfig, bench_kmeans
    from ..io import write_json

    cfg = KMeansBenchConfig(layers=layers, channels=channels, tokens=tokens, c=c, bits=bits, iters=iters,
                            faiss_groups=faiss_groups, device=device, seed=seed).resolved()
    console.print(f"[dim]{2 * cfg.layers} problems x {cfg.channels // cfg.c} groups x {cfg.tokens} tokens, c={cfg.c}, "
                  f"k={2 ** cfg.bits}, {cfg.iters} iterations, torch on {cfg.device}[/]")
    cols = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn())
    with Progress(*cols, console=console, transient=False) as prog:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = prog.add_task(f"{stage} k-means (group-iterations)", total=total)
            prog.update(tasks[stage], completed=done)

        res = bench_kmeans(cfg, progress=progress)

    p, tr = res["problem"], res["torch"]
    t = Table(title=f"k-means, {p['problems']} x {p['groups_per_problem']} groups x {p['tokens']} tokens, c={p['c']}, "
                    f"k={p['k']}, {p['iters']} iterations; torch on {tr['device']}")
    for col in ("torch s", "faiss s (extrapolated)", "speed ratio", "torch objective", "faiss objective", "rel diff"):
        t.add_column(col, justify="right")
    if "faiss" in res:
        f, s = res["faiss"], res["subset"]
        t.add_row(f"{tr['seconds']:.2f}", f"{f['seconds_extrapolated']:.2f} ({f['backend']}, {f['groups']} groups)",
                  f"{res['speedup_vs_faiss']:.2f}x", f"{s['torch_objective']:.5g}", f"{s['faiss_objective']:.5g}",
                  f"{100 * s['rel_diff']:+.2f}%")
    else:
        t.add_row(f"{tr['seconds']:.2f}", "-", "-", f"{tr['objective_mean']:.5g}", "-", "-")
    console.print(t)
    if "faiss_skipped" in res:
        console.print(f"[dim]faiss not run: {res['faiss_skipped']}[/]")
    if "faiss" in res:
        console.print("[dim]objectives: mean over the faiss subset of groups, same data and iterations; "
                      "rel diff > 0 means torch is worse[/]")
    if json_out:
        write_json(json_out, res)
        console.print(f"wrote {json_out}")
