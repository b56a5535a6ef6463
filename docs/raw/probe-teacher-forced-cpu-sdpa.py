"""CPU baseline for the teacher-forced comparison: how much SmolLM2's logits move when only the attention's
arithmetic changes (bf16 SDPA over full-precision K/V vs the CQ reference's fp32 attention with every token inside
the full-precision window, i.e. the same keys and values), bf16 model, same forced tokens."""
import json, sys, torch
from transformers import DynamicCache
from cqtool.cache import CQCache
from cqtool.codebook import Codebook
from cqtool.models import cache_kwarg, load_model

torch.set_num_threads(2)
model, tok, info = load_model("smollm2", "cpu", "bfloat16")
prompt = open(".dev/s7/prompt.txt").read()
ids = torch.tensor([tok(prompt)["input_ids"]])
kw = cache_kwarg(model)
cb = Codebook.load("/tmp/gen/calib/cq-8c8b.safetensors")
forced = json.load(open(".dev/s7/gen-cq-8c8b-reference.json"))["runs"][0]["token_ids"]
outs = {}
for name in ("sdpa-bf16", "cq-ref-window-all"):
    cache = DynamicCache() if name == "sdpa-bf16" else CQCache(model, cb, window=4096, max_length=ids.shape[1] + 80)
    with torch.no_grad():
        ls = [model(input_ids=ids, **{kw: cache}, use_cache=True, logits_to_keep=1).logits[0, -1].float()]
        for t in forced[:-1]:
            ls.append(model(input_ids=torch.tensor([[t]]), **{kw: cache}, use_cache=True).logits[0, -1].float())
    outs[name] = torch.stack(ls)
a, r = outs["sdpa-bf16"], outs["cq-ref-window-all"]
rel = (a - r).norm(dim=-1) / r.norm(dim=-1)
agree = (a.argmax(-1) == r.argmax(-1))
kl = torch.nn.functional.kl_div(a.log_softmax(-1), r.log_softmax(-1), log_target=True, reduction="none").sum(-1)
print(f"bf16 SmolLM2 on CPU, {len(forced)} forced steps: bf16 SDPA vs fp32 attention (same full-precision K/V): logits rel. diff "
      f"median {rel.median():.4f}, max {rel.max():.4f}; argmax equal at {int(agree.sum())}/{len(agree)}; KL median {kl.median():.2e}, max {kl.max():.2e}")
