"""Side-by-side results: a rich table, results.json, report.md and a perplexity-vs-bits PNG.

A result is a dict with at least "method", "bits_per_channel" and "perplexity"; "word_perplexity" and task
accuracies ("arc_easy": 0.61, with lm-eval's other metrics as "arc_easy/acc_norm") are shown when present.
Every file is written atomically; matplotlib is imported only when the plot is drawn.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .io import atomic_path, write_json

KNOWN_TASKS = ("arc_easy", "arc_challenge", "piqa", "winogrande", "hellaswag", "lambada_openai", "boolq", "openbookqa")
PLOT_NAME = "ppl_vs_bits.png"


def kind(method: str) -> str:
    """'cq', 'full' (fp16/bf16/fp32) or 'baseline': how a method is drawn."""
    m = method.lower()
    if m.startswith("cq-"):
        return "cq"
    if m in ("fp16", "bf16", "fp32"):
        return "full"
    return "baseline"


def task_columns(results: list[dict[str, Any]]) -> list[str]:
    """Accuracy keys present in any result: known task names, and any key X with lm-eval metrics 'X/...'."""
    keys = {k for r in results for k in r}
    prefixed = {k.split("/", 1)[0] for k in keys if "/" in k}
    tasks = [t for t in KNOWN_TASKS if t in keys]
    return tasks + sorted(t for t in prefixed - set(tasks) if t in keys)


def sorted_results(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Most bits first (full precision on top), ties by perplexity."""
    def key(r):
        ppl = r.get("perplexity")
        return (-float(r["bits_per_channel"]), float(ppl) if _finite(ppl) else math.inf, r["method"])

    return sorted(results, key=key)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _fmt(x, digits: int) -> str:
    if x is None:
        return "-"
    if isinstance(x, (int, float)) and not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}f}"


def table_rows(results: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """(header, rows of strings) shared by the rich table and the markdown report."""
    tasks = task_columns(results)
    cols = [c for c in ("perplexity", "word_perplexity") if any(c in r for r in results)]
    header = ["method", "bits/channel", *[c.replace("_", " ") for c in cols], *tasks]
    rows = []
    for r in sorted_results(results):
        rows.append([r["method"], _fmt(r["bits_per_channel"], 3), *[_fmt(r.get(c), 2) for c in cols],
                     *[_fmt(r.get(t), 4) for t in tasks]])
    return header, rows


def print_table(results: list[dict[str, Any]], console, title: str | None = None) -> None:
    from rich.table import Table

    header, rows = table_rows(results)
    t = Table(title=title)
    for i, h in enumerate(header):
        t.add_column(h, justify="left" if i == 0 else "right")
    for row in rows:
        t.add_row(*row)
    console.print(t)


def markdown(results: list[dict[str, Any]], title: str, plot: str | None = None) -> str:
    header, rows = table_rows(results)
    lines = [f"# {title}", "",
             "Bits per channel are what each method stores per key/value channel per token, averaged over the "
             "evaluation context: codes, fp16 scales and zero points, and full-precision windows included.", "",
             "| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if plot:
        lines += ["", f"![perplexity against bits per channel]({plot})"]
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], path: str | Path, title: str) -> bool:
    """Perplexity (log) against bits per channel (log2), CQ / baselines / full precision apart. False: nothing to draw."""
    pts = [r for r in results if _finite(r.get("perplexity")) and _finite(r.get("bits_per_channel"))]
    if not pts:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    style = {"cq": dict(marker="o", color="tab:blue", label="CQ"),
             "baseline": dict(marker="s", color="tab:orange", label="baselines"),
             "full": dict(marker="*", color="black", label="full precision")}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, st in style.items():
        sel = [r for r in pts if kind(r["method"]) == k]
        if sel:
            ax.scatter([r["bits_per_channel"] for r in sel], [r["perplexity"] for r in sel], s=60, zorder=3, **st)
    for r in pts:
        ax.annotate(r["method"], (r["bits_per_channel"], r["perplexity"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    full = [r["perplexity"] for r in pts if kind(r["method"]) == "full"]
    if full:
        ax.axhline(min(full), color="black", linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.set_yscale("log")
    ax.set_xlabel("bits per channel (scales and full-precision windows included)")
    ax.set_ylabel("perplexity")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return True


def write_report(results: list[dict[str, Any]], out_dir: str | Path, title: str) -> dict[str, Path]:
    """Write results.json, report.md and ppl_vs_bits.png (when any result has a perplexity) into out_dir."""
    out = Path(out_dir)
    paths = {"json": out / "results.json", "markdown": out / "report.md"}
    write_json(paths["json"], {"title": title, "results": results})
    if plot(results, out / PLOT_NAME, title):
        paths["plot"] = out / PLOT_NAME
    with atomic_path(paths["markdown"]) as tmp:
        tmp.write_text(markdown(results, title, PLOT_NAME if "plot" in paths else None))
    return paths
