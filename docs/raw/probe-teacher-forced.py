"""Teacher-forced decode on SmolLM2: the same tokens fed through the CQ cache with the kernels and with the PyTorch
reference; per-step logits compared (no free-running divergence)."""
import json, sys, torch
from cqtool import attention
from cqtool.cache import CQCache
from cqtool.codebook import Codebook
from cqtool.models import cache_kwarg, load_model

model, tok, info = load_model(sys.argv[1], "cuda", "auto")
# the prompt: WikiText-2 raw test from " = Robert Boulter = " on, first 2400 characters cut after the last full stop
prompt = open(".dev/s7/prompt.txt").read()
ids = torch.tensor([tok(prompt)["input_ids"]], device="cuda")
kw = cache_kwarg(model)
for c in ("cq-8c8b", "cq-4c8b"):
    cb = Codebook.load(f"/root/m/cb/{c}.safetensors")
    forced = json.load(open(f".dev/s7/gen-{c}-reference.json"))["runs"][0]["token_ids"]
    outs = {}
    for b in ("auto", "reference"):
        attention.FORCE_REFERENCE = b == "reference"
        cache = CQCache(model, cb, max_length=ids.shape[1] + 80)
        with torch.no_grad():
            ls = [model(input_ids=ids, **{kw: cache}, use_cache=True, logits_to_keep=1).logits[0, -1].float()]
            for t in forced[:-1]:
                ls.append(model(input_ids=torch.tensor([[t]], device="cuda"), **{kw: cache}, use_cache=True).logits[0, -1].float())
        outs[b] = torch.stack(ls)
    a, r = outs["auto"], outs["reference"]
    rel = ((a - r).norm(dim=-1) / r.norm(dim=-1)).cpu()
    top2 = r.topk(2, dim=-1).values
    gap = (top2[:, 0] - top2[:, 1]).cpu()
    agree = (a.argmax(-1) == r.argmax(-1)).cpu()
    kl = torch.nn.functional.kl_div(a.log_softmax(-1), r.log_softmax(-1), log_target=True, reduction="none").sum(-1).cpu()
    print(f"{c}: {len(forced)} steps (prefill + {len(forced) - 1} decode), logits rel. diff kernels vs reference: "
          f"median {rel.median():.4f}, max {rel.max():.4f}; argmax equal at {int(agree.sum())}/{len(agree)} steps; "
          f"KL(ref||kernels) median {kl.median():.2e}, max {kl.max():.2e}")
    for i in (~agree).nonzero().flatten().tolist():
        print(f"   step {i}: reference top-2 logit gap {gap[i]:.3f}, rel diff {rel[i]:.4f}")
