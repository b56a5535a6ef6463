"""cqtool generate (cqtool/generate.py) through its command: a tiny model on the CPU in seconds, and its errors."""
import json

from test_cli import assert_user_error, run, tiny_calib  # noqa: F401  (tiny_calib: a module fixture)


def test_generate_cq_beside_full_precision(tiny_calib, tiny_model_dir, tmp_path):
    """cqtool generate: both caches' greedy texts, where they agree, cache sizes, the backend that ran."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cb, js, prompt = tiny_calib / "cq-8c8b.safetensors", tmp_path / "g.json", "w1 w2 the cat of w7 and a dog"
    res = run("generate", "--model", tiny_model_dir, "--codebook", cb, "--prompt", prompt, "--max-new-tokens", 12,
              "--device", "cpu", "--json", js)
    assert res.exit_code == 0, res.output
    out = json.loads(js.read_text())
    cq, fp = out["runs"]
    assert out["device"] == "cpu" and out["devices"] == ["cpu"]
    assert cq["cache"] == "cq-8c8b" and cq["bits_per_channel"] == 1.0 and fp["bits_per_channel"] == 32
    assert 1 <= cq["new_tokens"] <= 12 and 0 <= cq["tokens_agreeing"] <= min(cq["new_tokens"], fp["new_tokens"])
    assert cq["cache_bytes"] < fp["cache_bytes"] and cq["backends"] == {"encode": "reference", "attention": "reference"}
    m = out["model"]  # DynamicCache holds K and V (fp32 here) of the prompt and every new token but the last
    assert fp["cache_bytes"] == 2 * m["num_layers"] * m["num_kv_heads"] * m["head_dim"] * 4 * (out["prompt_tokens"] + fp["new_tokens"] - 1)
    assert "attention ran on the PyTorch reference (backends: encode reference, attention reference)" in res.output
    assert f"first {cq['tokens_agreeing']} of {cq['new_tokens']} new tokens equal" in res.output
    # the full-precision run is transformers' own greedy decode
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.tensor([tok(prompt)["input_ids"]])
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                         pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
    assert fp["token_ids"] == ref[: len(fp["token_ids"])] and fp["text"] == tok.decode(fp["token_ids"], skip_special_tokens=True)
    # every token inside the full-precision window: the CQ cache gives the full-precision tokens
    res = run("generate", "--model", tiny_model_dir, "--codebook", cb, "--prompt", prompt, "--max-new-tokens", 12,
              "--window", 4096, "--device", "cpu", "--json", js)
    assert res.exit_code == 0, res.output
    cq, fp = json.loads(js.read_text())["runs"]
    assert cq["cache"] == "cq-8c8b-w4096" and cq["token_ids"] == fp["token_ids"] and cq["tokens_agreeing"] == fp["new_tokens"]


def test_generate_prompts_as_one_batch(tiny_calib, tiny_model_dir, tmp_path):
    """--prompts: several prompts decoded as one left-padded batch give, prompt by prompt, the tokens each gives alone
    (padding masked, positions counted per row), with both caches; totals and per-prompt agreement in the JSON."""
    cb, js = tiny_calib / "cq-8c8b.safetensors", tmp_path / "g.json"
    prompts = ["w1 w2 the cat of w7 and a dog", "a dog", "the cat w3 w4"]
    f = tmp_path / "prompts.txt"
    f.write_text(prompts[0] + "\n\n" + "\n".join(prompts[1:]) + "\n")
    common = ("--codebook", cb, "--max-new-tokens", 8, "--window", 3, "--device", "cpu", "--json", js)
    res = run("generate", "--model", tiny_model_dir, "--prompts", f, *common)
    assert res.exit_code == 0, res.output
    out = json.loads(js.read_text())
    assert out["prompts"] == prompts and len(set(out["prompt_tokens"])) == 3 and "prompt" not in out
    cq, fp = out["runs"]
    assert "3 prompts decoded as one left-padded batch" in res.output
    for r in (cq, fp):
        assert len(r["outputs"]) == 3 and r["new_tokens"] == sum(o["new_tokens"] for o in r["outputs"])
    assert cq["tokens_agreeing"] == sum(o["tokens_agreeing"] for o in cq["outputs"])
    for i, p in enumerate(prompts):
        res = run("generate", "--model", tiny_model_dir, "--prompt", p, *common)
        assert res.exit_code == 0, res.output
        alone = json.loads(js.read_text())
        assert alone["prompt_tokens"] == out["prompt_tokens"][i]
        for r, a in zip((cq, fp), alone["runs"]):
            assert r["outputs"][i]["token_ids"] == a["token_ids"], (i, r["cache"])
        assert cq["outputs"][i]["tokens_agreeing"] == alone["runs"][0]["tokens_agreeing"]


def test_generate_chat_template(tiny_calib, tiny_model_dir, tmp_path):
    """--chat: the prompt goes in as the user's turn of the tokenizer's chat template."""
    import shutil

    from transformers import AutoTokenizer

    d = tmp_path / "chat-model"
    shutil.copytree(tiny_model_dir, d)
    tok = AutoTokenizer.from_pretrained(d)
    tok.chat_template = "{% for m in messages %}<s>user: {{ m['content'] }}</s>{% endfor %}{% if add_generation_prompt %}<s>{% endif %}"
    tok.save_pretrained(d)
    js = tmp_path / "g.json"
    res = run("generate", "--model", d, "--codebook", tiny_calib / "cq-8c8b.safetensors", "--prompt", "w1 w2 the cat",
              "--chat", "--max-new-tokens", 3, "--no-compare", "--device", "cpu", "--json", js)
    assert res.exit_code == 0, res.output
    out = json.loads(js.read_text())
    want = tok("<s>user: w1 w2 the cat</s><s>")["input_ids"]
    assert out["chat"] is True and out["prompt_tokens"] == len(want) > len(tok("w1 w2 the cat")["input_ids"])
    assert len(out["runs"]) == 1 and "tokens_agreeing" not in out["runs"][0]


def test_generate_bad_input(tiny_calib, tiny_model_dir, tmp_path, tokenizer):
    from conftest import tiny_model

    cb = tiny_calib / "cq-8c8b.safetensors"
    base = ("generate", "--model", tiny_model_dir, "--device", "cpu")
    assert_user_error(run(*base, "--codebook", cb), "exactly one of --prompt", "neither")
    f = tmp_path / "p.txt"
    f.write_text("w1 w2")
    assert_user_error(run(*base, "--codebook", cb, "--prompt", "a", "--prompt-file", f), "exactly one of",
                      "got --prompt TEXT and --prompt-file FILE")
    assert_user_error(run(*base, "--codebook", cb, "--prompts", f, "--prompt", "a"), "exactly one of", "--prompts FILE")
    assert_user_error(run(*base, "--codebook", cb, "--prompts", tmp_path / "no.txt"), "--prompts", "does not exist")
    (tmp_path / "blank.txt").write_text("\n  \n")
    assert_user_error(run(*base, "--codebook", cb, "--prompts", tmp_path / "blank.txt"), "has no prompt")
    assert_user_error(run(*base, "--codebook", cb, "--prompts", f, "--cuda-graphs"), "--cuda-graphs needs the model on "
                      "a CUDA GPU", "cpu")
    assert_user_error(run(*base, "--codebook", cb, "--prompt-file", tmp_path / "none.txt"), "none.txt", "does not exist")
    assert_user_error(run(*base, "--codebook", cb, "--prompt", "a", "--max-new-tokens", 0), "--max-new-tokens 0")
    assert_user_error(run(*base, "--codebook", cb, "--prompt", "  "), "prompt is empty")
    assert_user_error(run(*base, "--codebook", cb, "--prompt", "a", "--backend", "cuda"), "--backend 'cuda'", "auto or reference")
    assert_user_error(run(*base, "--codebook", cb, "--prompt", "a", "--chat"), "--chat", "no chat template")
    assert_user_error(run(*base, "--codebook", tiny_calib, "--prompt", "a"), "is a directory", "cq-4c8b.safetensors")
    other = tmp_path / "other"
    tiny_model("llama", layers=3, vocab=len(tokenizer)).save_pretrained(other)
    tokenizer.save_pretrained(other)
    js = tmp_path / "g.json"
    assert_user_error(run("generate", "--model", other, "--codebook", cb, "--prompt", "a", "--device", "cpu", "--json", js),
                      "num_layers is 2 in the codebook")
    assert not js.exists()
    assert_user_error(run(*base, "--codebook", cb, "--prompt", "a", "--cuda-graphs"), "--cuda-graphs needs the model on "
                      "a CUDA GPU", "cpu")
    assert_user_error(run(*base, "--codebook", cb, "--prompt", "a", "--cuda-graphs", "--device-map", "auto"),
                      "--cuda-graphs needs the model on a CUDA GPU", "cpu")


def test_padded_batch_static_decode_equals_eager_and_alone():
    """A left-padded batch decoded with static caches (decode_graph_batch with graph=False: the steps a CUDA graph
    replays, the padding held out of the static mask) gives, row by row, the eager batch's tokens and each prompt's
    tokens decoded alone; CQ with a window and transformers' StaticCache alike; each row cut after its own eos."""
    import torch
    from transformers import DynamicCache

    from conftest import tiny_model
    from cqtool.cache import CQCache
    from cqtool.generate import decode_batch, decode_eager, decode_graph_batch
    from cqtool.graphs import static_cache
    from cqtool.models import ModelInfo
    from test_codebook import make_codebook

    model = tiny_model("llama")
    cb = make_codebook(ModelInfo.from_config(model.config, "tiny"))
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (9, 4, 13)]
    L, new = max(map(len, prompts)), 10
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    for kind, fresh in (("cq", lambda: CQCache(model, cb, window=3)), ("static", DynamicCache)):
        alone = [decode_eager(model, torch.tensor([p]), fresh(), new, None)[0] for p in prompts]
        eager, _ = decode_batch(model, ids, mask, fresh(), new, None)
        static, _, _ = decode_graph_batch(model, ids, mask, static_cache(model, kind, L + new, cb, window=3), new, None,
                                          graph=False)
        assert eager == alone and static == alone, kind
        eos = alone[1][3]  # a token of row 1: every row stops after its own first eos (or runs to the end)
        cut = [r[: r.index(eos) + 1] if eos in r else r for r in alone]
        assert decode_batch(model, ids, mask, fresh(), new, eos)[0] == cut
        assert decode_graph_batch(model, ids, mask, static_cache(model, kind, L + new, cb, window=3), new, eos,
                                  graph=False)[0] == cut
