"""Results table, results.json, report.md and the perplexity-vs-bits plot."""
from __future__ import annotations

import json
import math

from rich.console import Console

from cqtool.report import kind, markdown, print_table, task_columns, write_report

RESULTS = [
    {"method": "cq-8c8b", "bits_per_channel": 1.0, "perplexity": 30.5, "word_perplexity": 61.2, "arc_easy": 0.52,
     "arc_easy/acc_norm": 0.49, "key": "8c8b", "window": 0},
    {"method": "fp16", "bits_per_channel": 16.0, "perplexity": 21.62, "word_perplexity": 40.1, "arc_easy": 0.61},
    {"method": "kivi2", "bits_per_channel": 3.40625, "perplexity": 35.1, "word_perplexity": 70.3},
    {"method": "int2", "bits_per_channel": 2.1667, "perplexity": 28900.0, "word_perplexity": math.inf},
    {"method": "cq-4c8b-w128", "bits_per_channel": 2.875, "perplexity": 23.0, "mytask": 0.4, "mytask/acc_norm": 0.41},
]


def test_write_report_files(tmp_path):
    out = tmp_path / "rep"
    paths = write_report(RESULTS, out, title="tiny: KV cache methods")
    assert set(paths) == {"json", "markdown", "plot"}
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(
        {"title": "tiny: KV cache methods", "results": RESULTS}, default=str))
    png = (out / "ppl_vs_bits.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    md = (out / "report.md").read_text()
    assert md.startswith("# tiny: KV cache methods") and "![perplexity against bits per channel](ppl_vs_bits.png)" in md
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left behind


def test_markdown_is_sorted_by_bits_with_columns():
    md = markdown(RESULTS, "t")
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [r.split("|")[1].strip() for r in rows] == ["fp16", "kivi2", "cq-4c8b-w128", "int2", "cq-8c8b"]
    header = md.splitlines()[4]
    assert header == "| method | bits/channel | perplexity | word perplexity | arc_easy | mytask |"
    assert "| kivi2 | 3.406 | 35.10 | 70.30 | - | - |" in md
    assert "| int2 | 2.167 | 28900.00 | inf | - | - |" in md


def test_task_columns_and_kinds():
    assert task_columns(RESULTS) == ["arc_easy", "mytask"]
    assert [kind(r["method"]) for r in RESULTS] == ["cq", "full", "baseline", "baseline", "cq"]


def test_no_plot_without_perplexity(tmp_path):
    paths = write_report([{"method": "int4", "bits_per_channel": 4.2, "piqa": 0.6}], tmp_path, "t")
    assert "plot" not in paths and not (tmp_path / "ppl_vs_bits.png").exists()
    assert "| int4 | 4.200 | 0.6000 |" in (tmp_path / "report.md").read_text()


def test_print_table():
    console = Console(record=True, width=160)
    print_table(RESULTS, console, title="tiny")
    text = console.export_text()
    for r in RESULTS:
        assert r["method"] in text
    assert "3.406" in text and "28900.00" in text
    assert text.index("fp16") < text.index("kivi2") < text.index("cq-8c8b")
