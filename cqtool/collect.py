"""Collect, then solve: hooks gather every layer's pre-RoPE keys and values, and with Fisher on, the
squared gradient of the LM loss with respect to them (summed over `fisher_group` channels).

Shapes: keys[l], values[l]: [N, H_kv * D] (N = tokens seen); key_fisher[l], value_fisher[l]:
[N, H_kv * D / fisher_group] float32.
"""
from __future__ import annotations

import torch

from .cache import attention_modules, pre_rope_key_module


class KVCollector:
    def __init__(self, model, total_tokens: int, fisher: bool = True, fisher_group: int = 1,
                 store_dtype: torch.dtype = torch.float32, store_device: str | torch.device = "cpu"):
        self.model, self.fisher, self.g = model, fisher, fisher_group
        self.attn = attention_modules(model)
        L = len(self.attn)
        kv_dim = self.attn[0].k_proj.out_features
        self.kv_dim, self.n, self.total = kv_dim, 0, total_tokens
        mk = lambda d, dt: torch.empty(L, total_tokens, d, dtype=dt, device=store_device)  # noqa: E731
        self.keys, self.values = mk(kv_dim, store_dtype), mk(kv_dim, store_dtype)
        if fisher:
            self.key_fisher = mk(kv_dim // fisher_group, torch.float32)
            self.value_fisher = mk(kv_dim // fisher_group, torch.float32)
        self._leaves: dict[tuple[str, int], torch.Tensor] = {}
        self._handles = []
        for a in self.attn:
            self._handles.append(pre_rope_key_module(a).register_forward_hook(self._hook("k", a.layer_idx)))
            self._handles.append(a.v_proj.register_forward_hook(self._hook("v", a.layer_idx)))

    def _hook(self, kind: str, layer: int):
        def hook(module, args, output):
            if self.fisher:
                # a fresh leaf, so its .grad is dL/d(activation) with no parameter gradients kept
                output = output.detach().requires_grad_(True)
            self._leaves[(kind, layer)] = output
            return output

        return hook

    def add_batch(self, input_ids: torch.Tensor) -> float:
        """input_ids [B, T]; returns the LM loss of the batch."""
        B, T = input_ids.shape
        if self.n + B * T > self.total:
            raise ValueError(f"collector holds {self.total} tokens; batch would bring it to {self.n + B * T}")
        self._leaves.clear()
        with torch.enable_grad() if self.fisher else torch.no_grad():
            out = self.model(input_ids=input_ids, labels=input_ids, use_cache=False)
            if self.fisher:
                out.loss.backward()
        for (kind, layer), leaf in self._leaves.items():
            act = leaf.detach().reshape(B * T, -1)
            self._store_at(self.keys if kind == "k" else self.values, layer, act)
            if self.fisher:
                g2 = leaf.grad.float().reshape(B * T, -1, self.g).pow(2).sum(-1)
                self._store_at(self.key_fisher if kind == "k" else self.value_fisher, layer, g2)
        self._leaves.clear()
        self.n += B * T
        return float(out.loss.detach())

    def _store_at(self, dst: torch.Tensor, layer: int, t: torch.Tensor) -> None:
        dst[layer, self.n : self.n + t.shape[0]] = t.to(dst.device, dst.dtype)

    def close(self) -> None:
        """Remove the hooks and let go of the model (the gathered tensors stay)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.model = None
