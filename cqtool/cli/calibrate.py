"""cqtool calibrate"""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..config import CalibConfig, ConfigError, QuantSpec
from ._app import DEVICE_MAP_HELP, app, console, user_errors

CALIB_KEYS = {"deterministic", "device_map", "model", "bits", "key_spec", "value_spec", "channels", "code_bits", "data", "nsamples", "seqlen", "seed",
              "fisher", "kmeans_backend", "iters", "tol", "max_tokens", "device", "dtype", "output"}


def parse_specs(bits: str | None, channels: int | None, code_bits: int | None, key_spec: str | None,
                value_spec: str | None) -> tuple[tuple[QuantSpec, QuantSpec], ...]:
    """All ways of naming configurations -> ((key, value), ...)."""
    if (channels is None) != (code_bits is None):
        raise ConfigError("--channels and --code-bits go together")
    if channels is not None:
        if bits:
            raise ConfigError("give either --bits or --channels/--code-bits, not both")
        s = QuantSpec(channels, code_bits)
        return ((QuantSpec.parse(key_spec) if key_spec else s, QuantSpec.parse(value_spec) if value_spec else s),)
    if bits:
        out = []
        for b in str(bits).split(","):
            s = QuantSpec.parse(b.strip())
            out.append((QuantSpec.parse(key_spec) if key_spec else s, QuantSpec.parse(value_spec) if value_spec else s))
        return tuple(out)
    if key_spec and value_spec:
        return ((QuantSpec.parse(key_spec), QuantSpec.parse(value_spec)),)
    raise ConfigError("say what to fit: --bits 1[,2,4] (0.75, 1, 1.25, 2, 4), --channels C --code-bits B, or --key-spec/--value-spec")


@app.command()
@user_errors
def calibrate(
    model: Annotated[Optional[str], typer.Option(help="Hub id, alias (llama-2-7b, smollm2), local dir or .gguf file")] = None,
    bits: Annotated[Optional[str], typer.Option(help="Bits per channel, comma list: 4, 2, 1, 1.25, 0.75 (or 8c8b names)")] = None,
    channels: Annotated[Optional[int], typer.Option(help="Channels per group c (with --code-bits)")] = None,
    code_bits: Annotated[Optional[int], typer.Option(help="Bits per code b (with --channels)")] = None,
    key_spec: Annotated[Optional[str], typer.Option(help="Keys only, e.g. 8c10b (overrides --bits for keys)")] = None,
    value_spec: Annotated[Optional[str], typer.Option(help="Values only, e.g. 8c8b")] = None,
    data: Annotated[Optional[str], typer.Option(help="wikitext2 (hub, train split), a text file or a folder")] = None,
    nsamples: Annotated[Optional[int], typer.Option(help="Calibration sequences [16]")] = None,
    seqlen: Annotated[Optional[int], typer.Option(help="Tokens per sequence [2048]")] = None,
    fisher: Annotated[Optional[bool], typer.Option("--fisher/--no-fisher", help="Fisher-weighted centroids [on]")] = None,
    kmeans_backend: Annotated[Optional[str], typer.Option(help="torch | faiss | auto")] = None,
    iters: Annotated[Optional[int], typer.Option(help="Lloyd iterations [100]")] = None,
    tol: Annotated[Optional[float], typer.Option(help="Early stop on relative objective change [1e-4]; 0 = never")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help="Subsample tokens per group for k-means")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for data windows and k-means [0]")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda[:N]")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="auto | float32 | float16 | bfloat16")] = None,
    device_map: Annotated[Optional[str], typer.Option(help=DEVICE_MAP_HELP)] = None,
    deterministic: Annotated[Optional[bool], typer.Option("--deterministic/--no-deterministic", help="Same codebook every run on GPU (eager attention in the Fisher pass: more memory) [off]")] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Calibration directory to write")] = None,
    recipe: Annotated[Optional[str], typer.Option(help="YAML recipe with defaults for these options")] = None,
):
    """Gather pre-RoPE keys and values (and Fisher weights), fit CQ centroids with k-means, write a calibration dir."""
    from ..calibrate import calibrate as run
    from ..progress import progress_bar
    from ..recipes import load_recipe, pick

    r = load_recipe(recipe, CALIB_KEYS)
    model = pick(model, r, "model", None)
    output = pick(output, r, "output", None)
    if not model or not output:
        raise ConfigError("--model and --output are required (or give them in --recipe)")
    specs = parse_specs(pick(bits, r, "bits", None), pick(channels, r, "channels", None), pick(code_bits, r, "code_bits", None),
                        pick(key_spec, r, "key_spec", None), pick(value_spec, r, "value_spec", None))
    cfg = CalibConfig(
        model=model, specs=specs, data=pick(data, r, "data", "wikitext2"), nsamples=pick(nsamples, r, "nsamples", 16),
        seqlen=pick(seqlen, r, "seqlen", 2048), seed=pick(seed, r, "seed", 0), fisher=pick(fisher, r, "fisher", True),
        kmeans_backend=pick(kmeans_backend, r, "kmeans_backend", "auto"), kmeans_iters=pick(iters, r, "iters", 100),
        kmeans_tol=pick(tol, r, "tol", 1e-4), max_tokens=pick(max_tokens, r, "max_tokens", None),
        device=pick(device, r, "device", "auto"), dtype=pick(dtype, r, "dtype", "auto"), device_map=pick(device_map, r, "device_map", None),
        deterministic=pick(deterministic, r, "deterministic", False),
    )
    with progress_bar() as track:
        summary = run(cfg, output, progress=track)
    from rich.table import Table

    t = Table(title=f"calibrated {model} -> {output}")
    for col in ("config", "bits/channel", "key rel. error", "value rel. error"):
        t.add_column(col, justify="right")
    for name, s in summary["configs"].items():
        t.add_row(name, f"{s['bits_per_channel']:g}", f"{s['key_rel_error']:.4f}", f"{s['value_rel_error']:.4f}")
    console.print(t)
    sec = summary["seconds"]
    console.print(f"load {sec['load']:.1f}s, gather {sec['gather']:.1f}s, total {sec['total']:.1f}s")
    for w in summary["warnings"]:
        console.print(f"[yellow]warning:[/] {w}", soft_wrap=True)
