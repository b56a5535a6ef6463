"""Shared fixtures: tiny random models of each supported family, an offline tokenizer, the shared data."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def shared_file(rel: str) -> Path:
    p = SHARED_DATA / rel
    if not p.exists():
        pytest.skip(f"shared data {p} is not here")
    return p


def tiny_config(family: str = "llama", layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 16,
                vocab: int = 512):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[family]
    kw = dict(vocab_size=vocab, hidden_size=heads * head_dim, intermediate_size=2 * heads * head_dim,
              num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
              max_position_embeddings=4096)
    if family == "mistral":
        kw["sliding_window"] = None
    return cls(**kw)


def tiny_model(family: str = "llama", seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(family, **kw)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    # larger weights than the default init so that attention is not uniform and quantization error shows
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "proj" in name:
                p.mul_(4.0)
    return model


def _train_tokenizer(vocab: int = 512):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(300)] + ["the", "a", "of", "and", "to", "in", "is", "cat", "dog", "river"]
    g = torch.Generator().manual_seed(0)
    text = [" ".join(words[i] for i in torch.randint(0, len(words), (40,), generator=g).tolist()) for _ in range(200)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                                      initial_alphabet=sorted(pre_tokenizers.ByteLevel.alphabet())))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


@pytest.fixture(scope="session")
def tokenizer():
    return _train_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny Llama model saved as a local model directory (config.json + weights + tokenizer)."""
    d = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2, head_dim=16, vocab=len(tokenizer))
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """Synthetic text (no shared data copied into the project): repeated sentences with structure."""
    d = tmp_path_factory.mktemp("text")
    g = torch.Generator().manual_seed(1)
    words = [f"w{i}" for i in range(300)] + ["the", "a", "of", "and", "to", "in", "is", "cat", "dog", "river"]
    lines = [" ".join(words[i] for i in torch.randint(0, len(words), (30,), generator=g).tolist()) for _ in range(400)]
    p = d / "text.txt"
    p.write_text("\n".join(lines))
    return p
