"""CPU: how far SmolLM2's logits move (teacher-forced, CQ-8c8b codes, bf16 model) when the CQ reference attention
rounds the dequantized, rotated keys and the values to bf16 (the 'PyTorch reference at the same dtype' that each kernel
is held to within 2x of, against fp64) instead of keeping them in fp32."""
import json, torch
from cqtool import attention, quant
from cqtool.cache import CQCache
from cqtool.codebook import Codebook
from cqtool.models import cache_kwarg, load_model

torch.set_num_threads(2)
model, tok, info = load_model("smollm2", "cpu", "bfloat16")
ids = torch.tensor([tok(open(".dev/s7/prompt.txt").read())["input_ids"]])
kw = cache_kwarg(model)
orig_apply_rope, orig_decode = quant.apply_rope, quant.decode
def rope16(*a, **k):
    return orig_apply_rope(*a, **k).to(torch.bfloat16).float()
def decode16(*a, **k):
    return orig_decode(*a, **k).to(torch.bfloat16).float()
for c in ("cq-8c8b", "cq-4c8b"):
    cb = Codebook.load(f"/tmp/gen/calib/{c}.safetensors")
    forced = json.load(open(f".dev/s7/gen-{c}-reference.json"))["runs"][0]["token_ids"]
    outs = {}
    for name in ("fp32", "bf16"):
        quant.apply_rope, quant.decode = (orig_apply_rope, orig_decode) if name == "fp32" else (rope16, decode16)
        cache = CQCache(model, cb, max_length=ids.shape[1] + 80)
        with torch.no_grad():
            ls = [model(input_ids=ids, **{kw: cache}, use_cache=True, logits_to_keep=1).logits[0, -1].float()]
            for t in forced[:-1]:
                ls.append(model(input_ids=torch.tensor([[t]]), **{kw: cache}, use_cache=True).logits[0, -1].float())
        outs[name] = torch.stack(ls)
    quant.apply_rope, quant.decode = orig_apply_rope, orig_decode
    a, r = outs["bf16"], outs["fp32"]
    rel = (a - r).norm(dim=-1) / r.norm(dim=-1)
    kl = torch.nn.functional.kl_div(a.log_softmax(-1), r.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    print(f"{c}: reference attention with bf16-rounded K/V vs fp32 K/V: logits rel. diff step0 {rel[0]:.4f}, median "
          f"{rel.median():.4f}, max {rel.max():.4f}; argmax equal {int((a.argmax(-1) == r.argmax(-1)).sum())}/64; "
          f"KL median {kl.median():.2e}, max {kl.max():.2e}")
