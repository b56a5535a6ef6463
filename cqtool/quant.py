"""Reference coupled quantization: nearest-centroid encode, decode and bit packing.

This file is the specification the CUDA kernels are tested against. Layouts:

    x:          [..., D]             one head's channels (keys pre-RoPE, or values)
    centroids:  [H_kv, G_h, K, c]    per head h and group j (channels j*c .. j*c+c-1), K = 2**b centroids
    codes:      [B, H_kv, S, G_h]    int64, one code per group and token
    packed:     [B, H_kv, S, R]      uint8, R = ceil(G_h * b / 8) bytes per token and head

Packing is a little-endian bit stream per (token, head) row: code j occupies stream bits j*b .. j*b+b-1,
stream bit i is bit (i % 8) of byte i // 8. A b=8 row is therefore just the codes as bytes, and a
1-bit-per-channel configuration costs exactly one bit per channel in memory (plus row padding when
G_h * b is not a multiple of 8).
"""
from __future__ import annotations

import math

import torch


def row_bytes(groups_per_head: int, bits: int) -> int:
    return math.ceil(groups_per_head * bits / 8)


def encode(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """Nearest centroid (squared L2) for every group.

    x: [B, H_kv, S, D]; centroids: [H_kv, G_h, K, c] -> codes [B, H_kv, S, G_h] int64.
    Computed in fp32; chunked over tokens so that 12-bit codebooks fit in memory.
    """
    B, H, S, D = x.shape
    Hc, G, K, c = centroids.shape
    if Hc != H or G * c != D:
        raise ValueError(f"x {tuple(x.shape)} does not match centroids {tuple(centroids.shape)}")
    cent = centroids.float()
    c2 = (cent * cent).sum(-1)  # [H, G, K]
    xs = x.float().reshape(B, H, S, G, c).permute(1, 3, 0, 2, 4).reshape(H, G, B * S, c)
    out = torch.empty(H, G, B * S, dtype=torch.int64, device=x.device)
    step = max(1, chunk // max(1, K // 256))
    for s in range(0, B * S, step):
        xc = xs[:, :, s : s + step]  # [H, G, n, c]
        # ||x||^2 is the same for every centroid, so argmin needs only ||C||^2 - 2 x.C
        d = c2.unsqueeze(2) - 2 * torch.einsum("hgnc,hgkc->hgnk", xc, cent)
        out[:, :, s : s + step] = d.argmin(-1)
    return out.reshape(H, G, B, S).permute(2, 0, 3, 1).contiguous()


def decode(codes: torch.Tensor, centroids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """codes [B, H_kv, S, G_h] -> [B, H_kv, S, D] in `dtype` (default: the centroids' dtype)."""
    B, H, S, G = codes.shape
    Hc, Gc, K, c = centroids.shape
    if (Hc, Gc) != (H, G):
        raise ValueError(f"codes {tuple(codes.shape)} do not match centroids {tuple(centroids.shape)}")
    # flatten (h, j, code) into one index into a [H*G*K, c] table
    base = (torch.arange(H, device=codes.device).view(1, H, 1, 1) * G + torch.arange(G, device=codes.device)) * K
    flat = centroids.reshape(H * G * K, c)
    out = flat[(codes + base).reshape(-1)].reshape(B, H, S, G * c)
    return out if dtype is None else out.to(dtype)


def _bit_weights(device: torch.device) -> torch.Tensor:
    return 2 ** torch.arange(8, device=device, dtype=torch.int64)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [..., G_h] (values < 2**bits) -> packed uint8 [..., ceil(G_h*bits/8)]."""
    *lead, G = codes.shape
    if bits == 8:
        return codes.to(torch.uint8)
    shifts = torch.arange(bits, device=codes.device, dtype=torch.int64)
    stream = ((codes.to(torch.int64).unsqueeze(-1) >> shifts) & 1).reshape(*lead, G * bits)
    nbytes = row_bytes(G, bits)
    pad = nbytes * 8 - G * bits
    if pad:
        stream = torch.nn.functional.pad(stream, (0, pad))
    byte_vals = (stream.reshape(*lead, nbytes, 8) * _bit_weights(codes.device)).sum(-1)
    return byte_vals.to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, groups: int) -> torch.Tensor:
    """packed uint8 [..., R] -> codes int64 [..., groups]."""
    *lead, R = packed.shape
    if bits == 8:
        return packed[..., :groups].to(torch.int64)
    stream = ((packed.to(torch.int64).unsqueeze(-1) >> torch.arange(8, device=packed.device)) & 1).reshape(*lead, R * 8)
    stream = stream[..., : groups * bits].reshape(*lead, groups, bits)
    weights = 2 ** torch.arange(bits, device=packed.device, dtype=torch.int64)
    return (stream * weights).sum(-1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, D]; cos, sin [B, S, D] (Hugging Face's half-split convention)."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, S] -> cos, sin [B, S, D] in fp32, as transformers' rotary embeddings compute them."""
    freqs = positions.float().unsqueeze(-1) * inv_freq.float().to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scale, emb.sin() * scale
