"""Side-by-side results: a rich table, results.json, report.md and a perplexity-vs-bits PNG.

A result is a dict with at least "method", "bits_per_channel" and "perplexity"; "word_perplexity" and task
accuracies ("arc_easy": 0.61, with lm-eval's other metrics as "arc_easy/acc_norm") are shown when present.
Every file is written atomically; matplotlib is imported only when the plot is drawn.
"""
from __future__ import annotations

import re

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


def family(method: str) -> str:
    """Series a method is drawn in: CQ Fisher / uniform, with or without a window, each baseline family."""
    m = method.lower()
    if kind(m) == "cq":
        fam = "CQ uniform" if "uniform" in m else "CQ Fisher"
        return fam + (" + window" if re.search(r"-w\d+", m) else "")
    if kind(m) == "full":
        return "full precision"
    return re.sub(r"\d.*", "", m).upper() + " (baseline)"


def plot(results: list[dict[str, Any]], path: str | Path, title: str) -> bool:
    """Perplexity (log) against bits per channel (log2), one line per method family. False: nothing to draw.

    Methods far worse than full precision (> 8x its perplexity) would squeeze every other point into one
    band: they are drawn at the top edge with their value written next to them.
    """
    pts = [r for r in results if _finite(r.get("perplexity")) and _finite(r.get("bits_per_channel"))]
    if not pts:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    full = [r["perplexity"] for r in pts if kind(r["method"]) == "full"]
    best = min(full) if full else min(r["perplexity"] for r in pts)
    top = min(max(r["perplexity"] for r in pts), 8 * best)
    fig, ax = plt.subplots(figsize=(8, 5))
    markers = {"CQ Fisher": "o", "CQ uniform": "o", "CQ Fisher + window": "D", "CQ uniform + window": "D"}
    fams = sorted({family(r["method"]) for r in pts}, key=lambda f: (not f.startswith("CQ"), f))
    for i, fam in enumerate(fams):
        sel = sorted((r for r in pts if family(r["method"]) == fam), key=lambda r: r["bits_per_channel"])
        xs = [r["bits_per_channel"] for r in sel]
        ys = [min(r["perplexity"], top) for r in sel]
        hollow = "uniform" in fam
        color = "black" if fam == "full precision" else f"C{i}"
        ax.plot(xs, ys, linestyle="-" if len(sel) > 1 and fam != "full precision" else "none",
                marker="*" if fam == "full precision" else markers.get(fam, "s"), markersize=8, color=color,
                markerfacecolor="none" if hollow else color, label=fam, zorder=3)
        for r, y in zip(sel, ys):
            if fam.startswith("CQ") and fam != "CQ Fisher" and r["perplexity"] <= top:
                continue  # same configurations as the CQ Fisher labels, at the same or nearby bits
            label = r["method"] if r["perplexity"] <= top else f"{r['method']} ({r['perplexity']:.3g}, off scale)"
            ax.annotate(label, (r["bits_per_channel"], y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                        color=color)
    ax.axhline(best, color="black", linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.set_yscale("log")
    ax.set_ylim(best * 0.9, top * 1.15)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.set_xlabel("bits per channel (scales and full-precision windows included)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=130)
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
