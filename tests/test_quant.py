"""quant.py is the specification: check it against brute force."""
import math

import pytest
import torch

from cqtool import quant


@pytest.mark.parametrize("bits", list(range(1, 17)))
@pytest.mark.parametrize("groups", [1, 3, 8, 17])
def test_pack_unpack_roundtrip(bits, groups):
    g = torch.Generator().manual_seed(bits * 100 + groups)
    codes = torch.randint(0, 2**bits, (2, 3, 5, groups), generator=g)
    packed = quant.pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape[-1] == math.ceil(groups * bits / 8)
    assert torch.equal(quant.unpack(packed, bits, groups), codes)


def test_pack_is_little_endian_bitstream():
    # codes 1 and 2 with 3 bits: stream bits 0..2 = 1,0,0 and 3..5 = 0,1,0 -> byte 0b00010001 = 17
    assert quant.pack(torch.tensor([[1, 2]]), 3).tolist() == [[17]]


def test_encode_is_nearest_centroid():
    g = torch.Generator().manual_seed(0)
    H, G, K, c, D = 2, 4, 16, 4, 16
    cent = torch.randn(H, G, K, c, generator=g)
    x = torch.randn(3, H, 7, D, generator=g)
    codes = quant.encode(x, cent)
    xs = x.view(3, H, 7, G, c)
    for h in range(H):
        for j in range(G):
            d = ((xs[:, h, :, j, None, :] - cent[h, j]) ** 2).sum(-1)  # [3, 7, K]
            assert torch.equal(codes[:, h, :, j], d.argmin(-1))


def test_decode_inverts_encode_on_centroids():
    g = torch.Generator().manual_seed(1)
    H, G, K, c = 3, 2, 8, 8
    cent = torch.randn(H, G, K, c, generator=g)
    codes = torch.randint(0, K, (2, H, 5, G), generator=g)
    x = quant.decode(codes, cent)
    assert x.shape == (2, H, 5, G * c)
    assert torch.equal(quant.encode(x, cent), codes)


def test_rope_matches_transformers():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    g = torch.Generator().manual_seed(2)
    inv = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    pos = torch.tensor([[0, 1, 5, 100]])
    cos, sin = quant.rope_cos_sin(pos, inv)
    k = torch.randn(1, 2, 4, 16, generator=g)
    _, ref = apply_rotary_pos_emb(k, k, cos, sin)
    assert torch.allclose(quant.apply_rope(k, cos, sin), ref, atol=1e-6)
