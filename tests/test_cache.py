"""The CQ cache inside real transformers models (tiny random weights, CPU fp32)."""
import pytest
import torch

from cqtool.models import cache_kwarg
from cqtool.cache import CQCache
from cqtool.codebook import Codebook
from cqtool.collect import KVCollector
from cqtool.config import CQConfig, QuantSpec
from cqtool.models import ModelInfo

from conftest import tiny_model
from test_codebook import make_codebook

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


def grid_codebook(model, ids, bits=10) -> Codebook:
    """c=1 with a uniform grid of 2**bits levels over each layer's observed range: near-lossless."""
    info = ModelInfo.from_config(model.config, "tiny")
    coll = KVCollector(model, ids.numel(), fisher=False)
    coll.add_batch(ids)
    coll.close()
    spec = QuantSpec(1, bits)

    def grid(acts):
        lo, hi = acts.min() * 1.01, acts.max() * 1.01
        levels = torch.linspace(float(lo), float(hi), 2**bits)
        return levels.view(1, 1, -1, 1).expand(info.num_kv_heads, info.head_dim, -1, 1).clone()

    k = [grid(coll.keys[i]) for i in range(info.num_layers)]
    v = [grid(coll.values[i]) for i in range(info.num_layers)]
    return Codebook(CQConfig(spec, spec), info, k, v, {"fisher": False})


def logits(model, ids, cache=None):
    with torch.no_grad():
        if cache is None:
            return model(ids).logits
        return model(ids, **{cache_kwarg(model): cache}, use_cache=True).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_window_covering_everything_is_exact(family):
    model = tiny_model(family)
    ids = torch.randint(0, 512, (2, 33))
    cb = make_codebook(ModelInfo.from_config(model.config, "tiny"))
    torch.testing.assert_close(logits(model, ids, CQCache(model, cb, window=64)), logits(model, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_near_lossless_codebook_reproduces_logits(family):
    model = tiny_model(family)
    ids = torch.randint(0, 512, (1, 48))
    cb = grid_codebook(model, ids, bits=12)
    ref = logits(model, ids)
    got = logits(model, ids, CQCache(model, cb))
    rel = (got - ref).norm() / ref.norm()
    assert rel < 5e-3, rel
    # and a coarse codebook really changes them, so the cache is not bypassed
    coarse = grid_codebook(model, ids, bits=2)
    assert (logits(model, ids, CQCache(model, coarse)) - ref).norm() / ref.norm() > 20 * rel


@pytest.mark.parametrize("window,sinks", [(0, 0), (5, 0), (0, 3), (7, 2)])
def test_prefill_equals_token_by_token(window, sinks):
    model = tiny_model("llama")
    ids = torch.randint(0, 512, (2, 30))
    cb = make_codebook(ModelInfo.from_config(model.config, "tiny"))
    full = logits(model, ids, CQCache(model, cb, window=window, sinks=sinks))
    cache = CQCache(model, cb, window=window, sinks=sinks)
    steps = [logits(model, ids[:, :11], cache)] + [logits(model, ids[:, t : t + 1], cache) for t in range(11, 30)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)


def test_quantized_prefill_differs_from_fp():
    """Every token outside the window attends through codes in prefill too (no fp shortcut)."""
    model = tiny_model("llama")
    ids = torch.randint(0, 512, (1, 40))
    cb = make_codebook(ModelInfo.from_config(model.config, "tiny"))
    ref = logits(model, ids)
    got = logits(model, ids, CQCache(model, cb, window=4))
    # the first tokens only see keys inside the window: identical; later ones see codes: different
    torch.testing.assert_close(got[:, :4], ref[:, :4], rtol=1e-4, atol=1e-4)
    assert (got[:, 10:] - ref[:, 10:]).abs().max() > 1e-2


@pytest.mark.parametrize("spec,bits", [(QuantSpec(8, 8), 1.0), (QuantSpec(4, 8), 2.0), (QuantSpec(8, 10), 1.25), (QuantSpec(16, 12), 0.75)])
def test_memory_is_the_advertised_bits(spec, bits):
    model = tiny_model("llama", head_dim=64, heads=2, kv_heads=1)
    info = ModelInfo.from_config(model.config, "tiny")
    cb = make_codebook(info, spec)
    cache = CQCache(model, cb)
    logits(model, torch.randint(0, 512, (3, 50)), cache)
    channels = 2 * info.num_layers * 3 * 50 * info.kv_dim  # K and V, all layers, batch 3, 50 tokens
    assert cache.memory_bytes() * 8 == pytest.approx(channels * bits)


def test_generate_with_cq_cache_left_padding(tokenizer):
    model = tiny_model("llama", vocab=len(tokenizer))
    cb = make_codebook(ModelInfo.from_config(model.config, "tiny"))
    tokenizer.padding_side = "left"
    enc = tokenizer(["the cat is in the river", "a dog"], return_tensors="pt", padding=True)
    out = model.generate(**enc, **{cache_kwarg(model): CQCache(model, cb, window=2)}, max_new_tokens=6, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    assert out.shape == (2, enc.input_ids.shape[1] + 6)
    # the padded row must give what it gives alone (padding is masked, positions are right)
    alone = model.generate(**tokenizer(["a dog"], return_tensors="pt"), **{cache_kwarg(model): CQCache(model, cb, window=2)},
                           max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(out[1, -6:], alone[0, -6:])
