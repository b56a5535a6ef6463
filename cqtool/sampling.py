"""The next token from a step's logits: greedy, or sampled with a temperature, top-k and top-p (nucleus).

    s = Sampling(temperature=0.8, top_p=0.95)
    nxt = next_token(logits[:, -1], s)  # [B, 1]

Everything stays on the logits' device with no host synchronisation (no .item(), no torch.multinomial), so a decode step
that samples can be captured as a CUDA graph (graphs.StaticDecoder). The draw is the Gumbel-max trick in its
exponential form: argmax_i p_i / E_i with E_i ~ Exp(1) independent picks i with probability p_i; the E_i come from torch's
default generator (on CUDA its Philox state, which graph replays advance like eager steps), so torch.manual_seed(seed)
makes a run repeatable.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import ConfigError


@dataclass(frozen=True)
class Sampling:
    """temperature 0: greedy (argmax; top_k and top_p unused). top_k 0 and top_p 1: no filtering. seed: the seed a
    run sets before generating (None: the caller picks one and reports it)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        t, k, p = self.temperature, self.top_k, self.top_p
        if not (isinstance(t, (int, float)) and math.isfinite(t) and t >= 0):
            raise ConfigError(f"--temperature {t}: must be a finite number >= 0 (0: greedy)")
        if not (isinstance(k, int) and k >= 0):
            raise ConfigError(f"--top-k {k}: must be an integer >= 0 (0: no top-k filter)")
        if not (isinstance(p, (int, float)) and 0 < p <= 1):
            raise ConfigError(f"--top-p {p}: must be in (0, 1] (1: no top-p filter)")
        if t == 0 and (k or p < 1):
            raise ConfigError(f"--top-k {k} / --top-p {p} filter a sample: give --temperature > 0 with them "
                              "(temperature 0 is greedy)")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
            raise ConfigError(f"--seed {self.seed}: must be an integer in [0, 2**63)")

    @property
    def greedy(self) -> bool:
        """True when the choice is the argmax (temperature 0, or top-k 1)."""
        return self.temperature == 0 or self.top_k == 1

    def describe(self) -> str:
        if self.temperature == 0:
            return "greedy"
        parts = [f"temperature {self.temperature:g}"]
        if self.top_k:
            parts.append(f"top-k {self.top_k}")
        if self.top_p < 1:
            parts.append(f"top-p {self.top_p:g}")
        if self.seed is not None:
            parts.append(f"seed {self.seed}")
        return "sampled (" + ", ".join(parts) + ")"


GREEDY = Sampling()


def filtered_logits(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """logits [..., V] divided by the temperature (fp32), -inf outside the top-k and outside the top-p nucleus (the
    fewest most likely tokens whose probabilities reach top_p; the most likely token always stays)."""
    x = logits.float() / s.temperature
    V = x.shape[-1]
    if s.top_k and s.top_k < V:
        kth = torch.topk(x, s.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if s.top_p < 1:
        srt, idx = torch.sort(x, dim=-1, descending=True)
        p = torch.softmax(srt, dim=-1)
        drop = (torch.cumsum(p, dim=-1) - p) >= s.top_p  # the mass before this token already reaches top_p
        x = x.scatter(-1, idx, srt.masked_fill(drop, float("-inf")))
    return x


def next_token(logits: torch.Tensor, s: Sampling = GREEDY) -> torch.Tensor:
    """The next token ids [B, 1] from logits [B, V] (or [B, 1, V]): argmax when greedy, else one sample from
    softmax(filtered_logits)."""
    if logits.dim() == 3:
        logits = logits[:, -1]
    if s.greedy:
        return logits.argmax(-1, keepdim=True)
    p = torch.softmax(filtered_logits(logits, s), dim=-1)
    e = torch.empty_like(p).exponential_().clamp_min_(torch.finfo(p.dtype).tiny)  # never 0: p = 0 stays 0
    return (p / e).argmax(-1, keepdim=True)
