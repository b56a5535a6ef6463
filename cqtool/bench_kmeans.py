"""k-means at calibration scale: batched torch k-means on a whole model's K/V problem, faiss on a subset.

One problem = one layer's keys or values: G = channels / c groups of N tokens. The torch backend is timed on
all 2 * layers problems (several layers batched per call); faiss (one run per group, the only way it works)
is timed on `faiss_groups` groups spread over the problems and its time scaled to all groups. Both run the
same number of Lloyd iterations with no early stop (both end a group early only at an exact fixed point, where
more iterations change nothing), and their objectives are compared on that same subset of groups.

Synthetic activations, seeded (generation is not timed), shaped like pre-RoPE keys and values of a Llama:
  * Student-t tokens (nu = 4 for keys, 6 for values): heavy tails;
  * channels mixed inside each group of c by a random matrix: coupled channels, what CQ exploits;
  * log-normal per-channel scales (sigma 0.5), and for keys ~2% outlier channels at 10-20x;
  * a log-normal per-token magnitude (sigma 0.3), and every 2048th token (a sequence start, an attention
    sink) 8x larger.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import platform
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import kmeans
from .config import FORMAT_VERSION, ConfigError, to_dict
from .models import pick_device

FULL = {"layers": 32, "channels": 4096, "tokens": 32768}  # Llama-2-7B, 16 x 2048 calibration tokens
CPU_SMALL = {"layers": 1, "channels": 256, "tokens": 4096}  # default on CPU: seconds, not hours
SEQ_LEN = 2048


@dataclass(frozen=True)
class KMeansBenchConfig:
    layers: int | None = None  # None: FULL on CUDA, CPU_SMALL on CPU
    channels: int | None = None  # K (or V) channels per layer: heads * head_dim
    tokens: int | None = None
    c: int = 8  # channels per group
    bits: int = 8  # code bits: k = 2**bits centroids per group
    iters: int = 100
    faiss_groups: int = 8
    device: str = "auto"
    seed: int = 0
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        for name in ("layers", "channels", "tokens"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{name} must be >= 1, got {v}")
        if self.c < 1 or (self.channels is not None and self.channels % self.c):
            raise ConfigError(f"c must be >= 1 and divide channels={self.channels}, got c={self.c}")
        if not 1 <= self.bits <= 16:
            raise ConfigError(f"bits (code bits, k = 2**bits) must be in [1, 16], got {self.bits}")
        if self.iters < 1 or self.faiss_groups < 0:
            raise ConfigError(f"need iters >= 1 and faiss_groups >= 0, got iters={self.iters} "
                              f"faiss_groups={self.faiss_groups}")
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")

    def resolved(self) -> "KMeansBenchConfig":
        """Sizes filled in for the device: the full Llama-2-7B problem on CUDA, a small one on CPU."""
        dev = pick_device(self.device)
        sizes = FULL if dev.type == "cuda" else CPU_SMALL
        return dataclasses.replace(self, device=str(dev), **{k: v for k, v in sizes.items() if getattr(self, k) is None})


def synthetic_problem(layer: int, kind: str, channels: int, tokens: int, c: int, seed: int,
                      device: torch.device) -> torch.Tensor:
    """One layer's keys or values as k-means input: [channels / c, tokens, c] fp32 (see the module docstring)."""
    gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + 2 * layer + (kind == "value"))
    G = channels // c
    nu = 4.0 if kind == "key" else 6.0

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    # Student-t = normal / sqrt(chi2_nu / nu); chi2_nu as a sum of nu squared normals (nu is an integer here)
    z = randn(G, tokens, c) / (randn(int(nu), G, tokens, 1).square().sum(0) / nu).sqrt()
    x = torch.bmm(z, randn(G, c, c) / math.sqrt(c) + torch.eye(c, device=device))
    scale = torch.exp(0.5 * randn(G, 1, c))
    if kind == "key":
        hot = torch.rand(G, 1, c, generator=gen, device=device) < 0.02
        scale = torch.where(hot, scale * (10 + 10 * torch.rand(G, 1, c, generator=gen, device=device)), scale)
    tok = torch.exp(0.3 * randn(1, tokens, 1))
    tok[:, ::SEQ_LEN] *= 8.0
    return x * scale * tok


def bench_kmeans(config: KMeansBenchConfig | None = None, progress: Callable[[str, int, int], None] | None = None,
                 **overrides: Any) -> dict[str, Any]:
    """Time torch k-means on the whole problem and faiss on a subset; JSON-ready results.

    config: a KMeansBenchConfig (default: all defaults); overrides: field values that replace its fields,
    e.g. bench_kmeans(layers=1, channels=256). progress(stage, done, total), stage "torch" or "faiss".
    """
    cfg = dataclasses.replace(config or KMeansBenchConfig(), **overrides).resolved()
    dev = torch.device(cfg.device)
    k, c, N = 2**cfg.bits, cfg.c, cfg.tokens
    G = cfg.channels // c
    problems = [(layer, kind) for layer in range(cfg.layers) for kind in ("key", "value")]
    P = len(problems)
    total = P * G
    picks = _faiss_subset(P, G, min(cfg.faiss_groups, total))
    per_call = _problems_per_call(dev, G, N, c)

    torch_s = torch_cpu = 0.0
    obj_sum = 0.0
    ran = 0
    sub_x, sub_torch = [], []
    for b0 in range(0, P, per_call):
        batch = problems[b0 : b0 + per_call]
        x = torch.cat([synthetic_problem(layer, kind, cfg.channels, N, c, cfg.seed, dev) for layer, kind in batch])
        report = None
        if progress is not None:
            report = lambda done, _, base=b0 * G: progress("torch", base * cfg.iters + done, total * cfg.iters)  # noqa: E731
        c0 = time.process_time()
        res = kmeans.fit(x, k, iters=cfg.iters, tol=0.0, seed=cfg.seed, backend="torch", device=dev, progress=report)
        torch_cpu += time.process_time() - c0
        torch_s += res.seconds
        ran = max(ran, res.iterations)
        obj_sum += float(res.objective.double().sum())
        for p, g in picks:
            if b0 <= p < b0 + len(batch):
                i = (p - b0) * G + g
                sub_x.append(x[i].cpu())
                sub_torch.append(res.centroids[i].cpu())
        del x, res

    out: dict[str, Any] = {
        "config": to_dict(cfg),
        "problem": {"problems": P, "groups_per_problem": G, "groups": total, "tokens": N, "c": c, "k": k,
                    "iters": cfg.iters, "problems_per_call": per_call,
                    "distance_flops": 2.0 * total * N * k * c * cfg.iters},
        "torch": {"device": _device_name(dev), "seconds": torch_s, "cpu_seconds": torch_cpu, "iterations": ran,
                  "objective_mean": obj_sum / total},
        "environment": _environment(),
    }
    if not picks or importlib.util.find_spec("faiss") is None:
        out["faiss_skipped"] = "faiss_groups=0" if not picks else "faiss is not installed (pip install faiss-cpu)"
        return out
    xs = torch.stack(sub_x)
    c0 = time.process_time()
    fres = kmeans.fit(xs, k, iters=cfg.iters, tol=0.0, seed=cfg.seed, backend="faiss",
                      progress=None if progress is None else (lambda d, t: progress("faiss", d, t)))
    faiss_cpu = time.process_time() - c0
    faiss_s = fres.seconds
    t_obj = float(kmeans.objective(xs, torch.stack(sub_torch)).double().mean())
    f_obj = float(fres.objective.double().mean())
    extrapolated = faiss_s * total / len(picks)
    out["faiss"] = {"backend": fres.backend, "threads": _faiss_threads(), "groups": len(picks), "seconds": faiss_s,
                    "cpu_seconds": faiss_cpu, "seconds_extrapolated": extrapolated, "iterations": fres.iterations}
    out["subset"] = {"groups": [list(pg) for pg in picks], "torch_objective": t_obj, "faiss_objective": f_obj,
                     "rel_diff": (t_obj - f_obj) / f_obj if f_obj else 0.0}
    out["speedup_vs_faiss"] = extrapolated / torch_s if torch_s else math.inf
    return out


def _faiss_subset(P: int, G: int, n: int) -> list[tuple[int, int]]:
    """n (problem, group) pairs spread over all problems and over the groups within them."""
    picks = []
    for i in range(n):
        p = i * P // n
        picks.append((p, (i * 7919 + p * 104729) % G))
    return sorted(set(picks))


def _problems_per_call(dev: torch.device, G: int, N: int, c: int) -> int:
    """Layers' problems batched per fit call: as many as keep the input under 1/8 of free GPU memory."""
    one = G * N * c * 4
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return max(1, free // 8 // one)
    return max(1, (256 << 20) // one)


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _faiss_threads() -> int | None:
    try:
        import faiss
    except ImportError:
        return None
    return faiss.omp_get_max_threads()


def _environment() -> dict[str, Any]:
    env = {"torch": torch.__version__, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if hasattr(os, "getloadavg"):
        env["load_average_1m"] = os.getloadavg()[0]  # other work on the machine skews CPU timings
    return env
