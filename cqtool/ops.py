"""One entry point per CQ operation: the CUDA kernel when the tensors are on a GPU and the extension
loads, the PyTorch reference otherwise. The first fallback is announced once (never silently)."""
from __future__ import annotations

import logging

import torch

from . import quant

log = logging.getLogger("cqtool")
_ANNOUNCED: set[str] = set()
BACKEND_USED: dict[str, str] = {}


def _note(op: str, backend: str, why: str = "") -> None:
    BACKEND_USED[op] = backend
    if (op, backend) not in _ANNOUNCED:
        _ANNOUNCED.add((op, backend))
        log.warning("cqtool: %s runs on the %s path%s", op, backend, f" ({why})" if why else "")


def encode_into(x: torch.Tensor, centroids: torch.Tensor, bits: int, codes: torch.Tensor, start: int) -> None:
    """Encode x [B, H_kv, Q, D] and write packed codes into codes[:, :, start:start+Q] ([B, H_kv, cap, R] uint8)."""
    _note("encode", "reference", "no CUDA kernel for this op yet" if x.is_cuda else "tensors on CPU")
    Q = x.shape[2]
    codes[:, :, start : start + Q] = quant.pack(quant.encode(x, centroids), bits)


def cq_attention(query: torch.Tensor, view, attention_mask, scaling: float) -> torch.Tensor:
    """Attention from codes for the new queries of one layer. query [B, H_q, Q, D] -> [B, Q, H_q, D]."""
    from .attention import attend_codes_reference

    _note("attention", "reference", "no CUDA kernel for this op yet" if query.is_cuda else "tensors on CPU")
    return attend_codes_reference(query, view, attention_mask, scaling)
