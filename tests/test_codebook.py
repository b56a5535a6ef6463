import os

import pytest
import torch

from cqtool.codebook import Codebook
from cqtool.config import CQConfig, ConfigError, QuantSpec
from cqtool.models import ModelInfo

from conftest import tiny_model


def make_codebook(info: ModelInfo, spec=QuantSpec(4, 6), seed=0) -> Codebook:
    g = torch.Generator().manual_seed(seed)
    shape = (info.num_kv_heads, info.head_dim // spec.channels, spec.num_centroids, spec.channels)
    k = [torch.randn(shape, generator=g) for _ in range(info.num_layers)]
    v = [torch.randn(shape, generator=g) for _ in range(info.num_layers)]
    return Codebook(CQConfig(spec, spec), info, k, v, {"fisher": True, "seed": seed, "data_hash": "x"})


def test_save_load_roundtrip(tmp_path):
    info = ModelInfo.from_config(tiny_model().config, "tiny")
    cb = make_codebook(info)
    cb.save(tmp_path / "cb.safetensors")
    back = Codebook.load(tmp_path / "cb.safetensors")
    assert back.config == cb.config and back.model == cb.model and back.meta["seed"] == 0
    for a, b in zip(cb.key_centroids + cb.value_centroids, back.key_centroids + back.value_centroids):
        assert torch.equal(a, b)
    h = back.header()
    for field in ("format_version", "model", "key", "value", "key_position", "fisher", "data_hash", "seed"):
        assert field in h


def test_refuses_other_model_and_names_field(tmp_path):
    cb = make_codebook(ModelInfo.from_config(tiny_model().config, "tiny"))
    other = tiny_model(kv_heads=4)
    with pytest.raises(ConfigError, match="num_kv_heads is 2 in the codebook .* but 4 in this model"):
        cb.validate_model(other)


def test_corrupted_file_is_one_clear_error(tmp_path):
    cb = make_codebook(ModelInfo.from_config(tiny_model().config, "tiny"))
    p = tmp_path / "cb.safetensors"
    cb.save(p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="corrupted"):
        Codebook.load(p)
    p.write_bytes(b"not a codebook at all")
    with pytest.raises(ConfigError, match="corrupted"):
        Codebook.load(p)


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    cb = make_codebook(ModelInfo.from_config(tiny_model().config, "tiny"))
    p = tmp_path / "cb.safetensors"
    cb.save(p)
    before = p.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        make_codebook(cb.model, seed=1).save(p)
    assert p.read_bytes() == before
    assert [f for f in os.listdir(tmp_path) if f != "cb.safetensors"] == []


def test_load_a_directory_names_its_codebooks(tmp_path):
    info = ModelInfo.from_config(tiny_model().config, "tiny")
    make_codebook(info).save(tmp_path / "cq-4c6b.safetensors")
    with pytest.raises(ConfigError, match=r"is a directory \(cq-4c6b.safetensors\); give one codebook file"):
        Codebook.load(tmp_path)


def test_pinned_copies_made_once_and_not_carried(monkeypatch):
    """Codebook.pinned: one page-locked copy per centroid tensor (asked again, the same copy; a replaced tensor gets
    its own), none where CUDA is absent, and copies or pickles of the codebook do not carry them. pin_memory needs
    CUDA, so a clone stands in for it here."""
    import copy
    import pickle

    cb = make_codebook(ModelInfo("tiny", "LlamaForCausalLM", 2, 4, 2, 16, 64), QuantSpec(4, 6))
    k = cb.key_centroids[0]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cb.pinned(k) is k and cb._pinned == {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    made = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: made.append(1) or self.clone())
    p = cb.pinned(k)
    assert p is not k and torch.equal(p, k) and cb.pinned(k) is p and len(made) == 1
    cb.key_centroids[0] = k.clone()
    assert cb.pinned(cb.key_centroids[0]) is not p and len(made) == 2
    for other in (copy.copy(cb), copy.deepcopy(cb), pickle.loads(pickle.dumps(cb))):
        assert other._pinned == {} and torch.equal(other.key_centroids[1], cb.key_centroids[1])
    assert len(cb._pinned) == 2
