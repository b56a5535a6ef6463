import pytest

from cqtool.config import BITS_PRESETS, CQConfig, ConfigError, QuantSpec


@pytest.mark.parametrize("bits,name", [(4, "2c8b"), (2, "4c8b"), (1, "8c8b"), (1.25, "8c10b"), (0.75, "16c12b")])
def test_paper_presets(bits, name):
    s = QuantSpec.from_bits(bits)
    assert s.name == name and s.bits_per_channel == bits
    assert QuantSpec.parse(str(bits)) == s and QuantSpec.parse("cq-" + name) == s


def test_bits_without_config_names_allowed_values():
    with pytest.raises(ConfigError, match=r"--bits 3 has no CQ configuration; allowed: 4, 2, 1, 1.25, 0.75"):
        QuantSpec.from_bits(3)


def test_channels_must_divide_head_dim():
    with pytest.raises(ConfigError, match="channels=16 does not divide head_dim=24"):
        QuantSpec(16, 8).check_head_dim(24)


@pytest.mark.parametrize("c,b", [(3, 8), (8, 0), (8, 17)])
def test_bad_specs(c, b):
    with pytest.raises(ConfigError):
        QuantSpec(c, b)


def test_cq_config_name_and_bits():
    cfg = CQConfig(QuantSpec(8, 10), QuantSpec(8, 8), window=128)
    assert cfg.name == "cq-k8c10b-v8c8b-w128"
    assert cfg.bits_per_channel == pytest.approx(1.125)
    assert len(BITS_PRESETS) == 5
