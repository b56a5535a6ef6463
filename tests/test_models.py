import pytest

from cqtool.config import ConfigError
from cqtool.models import ALIASES, byte_tokenizer, load_config, pick_dtype, pick_device, resolve


def test_aliases_resolve_to_hub_ids():
    assert resolve("llama-2-7b") == ("meta-llama/Llama-2-7b-hf", None)
    assert resolve("mistralai/Mistral-7B-v0.1") == ("mistralai/Mistral-7B-v0.1", None)
    assert all(v.count("/") == 1 for v in ALIASES.values())


@pytest.mark.parametrize("bad,msg", [("nonsense", "unknown model 'nonsense'"), ("missing.gguf", "does not exist")])
def test_bad_model_names(bad, msg):
    with pytest.raises(ConfigError, match=msg):
        resolve(bad)


def test_local_dir_without_config(tmp_path):
    with pytest.raises(ConfigError, match="has no config.json"):
        resolve(str(tmp_path))


def test_random_shapes_have_the_real_kv_shape():
    _, _, _, info = load_config("random:llama-2-7b")
    assert (info.num_layers, info.num_kv_heads, info.head_dim) == (32, 32, 128)
    _, _, _, info = load_config("random:llama-3-8b")
    assert (info.num_kv_heads, info.head_dim) == (8, 128)
    with pytest.raises(ConfigError, match="unknown random model shape"):
        load_config("random:gpt-5")


def test_byte_tokenizer_roundtrip():
    tok = byte_tokenizer()
    ids = tok("héllo wörld", add_special_tokens=False).input_ids
    assert len(ids) == len("héllo wörld".encode()) and max(ids) < 259
    assert tok.decode(ids) == "héllo wörld"


def test_byte_tokenizer_ids_do_not_depend_on_the_process():
    """The same text gives the same ids in every process, whatever Python's string-hash salt (the random-weight
    models' calibration data, and so their codebooks, follow from these ids)."""
    import os
    import subprocess
    import sys

    code = "from cqtool.models import byte_tokenizer; print(byte_tokenizer()('The river, 1895.').input_ids)"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in (1, 2, 3)}
    assert len(outs) == 1, outs


def test_dtype_and_device_errors():
    with pytest.raises(ConfigError, match="--dtype 'int3' is not allowed"):
        pick_dtype("int3", pick_device("cpu"))
    with pytest.raises(ConfigError, match="not a device"):
        pick_device("tpu7")
