"""Text sources -> token windows. Calibration draws seeded, non-overlapping windows; evaluation walks
consecutive non-overlapping windows (the last partial window is dropped)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from .config import ConfigError

# hub data sets users can name; (path, config, split, text field)
HUB_SOURCES = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", "text"),
    "wikitext2-test": ("wikitext", "wikitext-2-raw-v1", "test", "text"),
    "wikitext2-valid": ("wikitext", "wikitext-2-raw-v1", "validation", "text"),
}


def load_text(source: str, local_hint: str = "pass a local text file with --data") -> str:
    """A hub data set name (see HUB_SOURCES), a text file, or a folder of .txt files (sorted, concatenated).
    local_hint: what the error says to do when the hub cannot be reached."""
    p = Path(source).expanduser()
    if p.is_file():
        text = p.read_text(encoding="utf-8", errors="replace")
    elif p.is_dir():
        files = sorted(p.rglob("*.txt")) + sorted(p.rglob("*.raw"))
        if not files:
            raise ConfigError(f"data folder {source!r} has no .txt or .raw files")
        text = "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    elif source in HUB_SOURCES:
        path, name, split, field = HUB_SOURCES[source]
        try:
            from datasets import load_dataset

            ds = load_dataset(path, name, split=split)
        except Exception as e:  # no network, no cache: say so in one line
            raise ConfigError(f"cannot load hub data set {source!r} ({type(e).__name__}); {local_hint}") from None
        text = "\n\n".join(ds[field])
    else:
        raise ConfigError(f"data {source!r} is not a file, a folder or a known data set ({', '.join(HUB_SOURCES)})")
    if not text.strip():
        raise ConfigError(f"data {source!r} is empty")
    return text


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """-> [N] int64 token ids of the whole text (no special tokens added)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Seeded choice of `nsamples` distinct non-overlapping windows -> [nsamples, seqlen]."""
    slots = tokens.numel() // seqlen
    if nsamples > slots:
        raise ConfigError(
            f"asked for {nsamples} samples of {seqlen} tokens but the data has {tokens.numel()} tokens "
            f"({slots} windows); lower --nsamples or --seqlen, or give more data"
        )
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(slots, generator=g)[:nsamples].sort().values
    return torch.stack([tokens[i * seqlen : (i + 1) * seqlen] for i in pick.tolist()])


def eval_windows(tokens: torch.Tensor, seqlen: int, limit: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows -> [n, seqlen] (first `limit` if given)."""
    n = tokens.numel() // seqlen
    if n == 0:
        raise ConfigError(f"the evaluation text has {tokens.numel()} tokens, fewer than one window of {seqlen}")
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"--limit must be >= 1, got {limit}")
        n = min(n, limit)
    return tokens[: n * seqlen].view(n, seqlen)
