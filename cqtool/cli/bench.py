"""cqtool bench ... : the benchmark commands live in their own modules; importing them registers them."""
from __future__ import annotations

import importlib

for _mod in ("bench_kmeans", "bench_kernels"):
    try:
        importlib.import_module(f"{__package__}.{_mod}")
    except ModuleNotFoundError as e:  # a bench module missing from this checkout: the others still work
        if e.name != f"{__package__}.{_mod}":
            raise
