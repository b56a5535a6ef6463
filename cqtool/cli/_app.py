"""The Typer application objects; each command lives in its own module of this package."""
from __future__ import annotations

import functools
import sys

import typer
from rich.console import Console

app = typer.Typer(
    name="cqtool",
    help="Coupled Quantization of the KV cache: calibrate, quantize, eval, generate, bench.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
bench_app = typer.Typer(help="Timings printed beside a baseline measured in the same run.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
console = Console(stderr=False)
# --device-map of calibrate, eval and generate (config.check_device_map)
DEVICE_MAP_HELP = ("auto (fills the first GPU first, then the next, then CPU) | balanced (layers evenly over the GPUs) | "
                   "balanced_low_0 | sequential: spread the model (accelerate); or one device, e.g. cuda:1")
err_console = Console(stderr=True)


def user_errors(fn):
    """Turn expected user mistakes into one red line and exit code 2, never a traceback."""
    from ..config import ConfigError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as e:
            err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            sys.exit(2)
        except KeyboardInterrupt:
            err_console.print("[bold red]interrupted[/]: no output was written")
            sys.exit(130)

    return wrapper
