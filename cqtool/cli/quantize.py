"""cqtool quantize"""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from ._app import app, console, user_errors


@app.command()
@user_errors
def quantize(
    calib_dir: Annotated[str, typer.Argument(help="Directory written by cqtool calibrate")],
    output: Annotated[str, typer.Option("--output", "-o", help="Codebook file to write (.safetensors)")],
    config: Annotated[Optional[str], typer.Option(help="Which configuration, e.g. cq-8c8b (needed if several)")] = None,
    dtype: Annotated[str, typer.Option(help="Centroid dtype: float16 | bfloat16 | float32")] = "float16",
    json_out: Annotated[Optional[str], typer.Option("--json", help="Save the report as JSON")] = None,
):
    """Export a deployable codebook file and report its size and per-layer reconstruction error."""
    from ..quantize import export

    rep = export(calib_dir, output, config, dtype, json_out)
    from rich.table import Table

    console.print(f"[bold]{rep['config']}[/]: {rep['bits_per_channel']:g} bits per channel; codebook "
                  f"{rep['codebook_bytes'] / 2**20:.2f} MiB = {rep['percent_of_model']:.3f}% of the model's weights; "
                  f"written to {output}")
    t = Table(title="per-layer relative reconstruction error (calibration data)")
    for col in ("layer", "key", "value", "k-means iters K/V"):
        t.add_column(col, justify="right")
    for row in rep["layers"]:
        t.add_row(str(row["layer"]), f"{row['key_rel_error']:.4f}", f"{row['value_rel_error']:.4f}",
                  f"{row['key_iterations']}/{row['value_iterations']}")
    console.print(t)
