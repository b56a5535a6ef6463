"""`cqtool` command line: thin commands that build a config and call one library function."""
from __future__ import annotations

from ._app import app, bench_app  # noqa: F401
from . import calibrate, quantize, evaluate, generate, bench  # noqa: F401,E402  (each registers its commands)


def main() -> None:
    app()
