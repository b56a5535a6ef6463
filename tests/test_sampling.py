"""Sampling the next token (cqtool/sampling.py): the draw follows softmax(logits / T) after the top-k and top-p
filters, a seed repeats it, greedy is the argmax; the generate paths (eager and static, the code CUDA graphs replay)
sample the same tokens from one seed; `cqtool generate` takes the options and rejects bad ones in one line."""
import json

import pytest
import torch

from cqtool.config import ConfigError
from cqtool.sampling import GREEDY, Sampling, filtered_logits, next_token

from test_cli import assert_user_error, run, tiny_calib  # noqa: F401  (tiny_calib: a module fixture)

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
N = 60_000  # draws per check: a probability's standard error is at most 0.2%


def _freq(s: Sampling, logits=LOGITS, n=N, seed=0):
    torch.manual_seed(seed)
    tok = next_token(logits.expand(n, -1), s)
    assert tok.shape == (n, 1) and tok.dtype == torch.long
    return torch.bincount(tok[:, 0], minlength=logits.numel()).double() / n


def _close(freq, want):
    """Every token's frequency within 5 standard errors of its probability (and an impossible one never drawn)."""
    sd = (want * (1 - want) / N).sqrt()
    assert torch.all((freq - want).abs() <= 5 * sd + 1e-12), (freq, want)


@pytest.mark.parametrize("t", [1.0, 0.5, 2.0])
def test_draws_follow_the_tempered_softmax(t):
    _close(_freq(Sampling(temperature=t)), torch.softmax(LOGITS.double() / t, 0))


def test_top_k_renormalises_over_the_k_most_likely():
    want = torch.softmax(LOGITS.double()[:3], 0)
    freq = _freq(Sampling(temperature=1.0, top_k=3))
    _close(freq, torch.cat([want, torch.zeros(3, dtype=torch.double)]))
    assert freq[3:].sum() == 0


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    p = torch.softmax(LOGITS.double(), 0)  # 0.561, 0.206, 0.125, ...
    assert p[0] < 0.75 <= p[0] + p[1]  # the nucleus of 0.75: the first two tokens
    freq = _freq(Sampling(temperature=1.0, top_p=0.75))
    _close(freq, torch.cat([p[:2] / p[:2].sum(), torch.zeros(4, dtype=torch.double)]))
    only = _freq(Sampling(temperature=1.0, top_p=0.5))  # the most likely token alone already reaches 0.5
    assert only[0] == 1
    both = _freq(Sampling(temperature=1.0, top_k=2, top_p=0.99))  # top-k first, then the nucleus of what is left
    _close(both, torch.cat([p[:2] / p[:2].sum(), torch.zeros(4, dtype=torch.double)]))


def test_filtered_logits_on_a_batch_keeps_each_rows_own_set():
    x = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    f = filtered_logits(x, Sampling(temperature=2.0, top_k=2))
    assert torch.equal(torch.isfinite(f), torch.tensor([[True, True, False, False], [False, False, True, True]]))
    assert torch.equal(f[0, :2], x[0, :2] / 2)


def test_greedy_and_top_k_1_are_the_argmax():
    x = torch.randn(7, 1, 50, generator=torch.Generator().manual_seed(0))
    want = x[:, -1].argmax(-1, keepdim=True)
    assert torch.equal(next_token(x, GREEDY), want)
    assert torch.equal(next_token(x, Sampling(temperature=1.5, top_k=1)), want)
    assert GREEDY.greedy and Sampling(temperature=1.0, top_k=1).greedy and not Sampling(temperature=1.0).greedy


def test_a_seed_repeats_the_draws_and_another_seed_does_not():
    s = Sampling(temperature=1.0)
    x = torch.randn(4000, 100, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(3)
    a = next_token(x, s)
    torch.manual_seed(3)
    b = next_token(x, s)
    torch.manual_seed(4)
    c = next_token(x, s)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, x.argmax(-1, keepdim=True))


def test_fp16_logits_and_extreme_values():
    """Half-precision logits, a -inf logit (never drawn), and a huge temperature (close to uniform over the rest)."""
    x = torch.tensor([1.0, float("-inf"), 0.0, 2.0]).half()
    freq = _freq(Sampling(temperature=1e6), logits=x)
    assert freq[1] == 0
    _close(freq, torch.tensor([1 / 3, 0, 1 / 3, 1 / 3], dtype=torch.double))


@pytest.mark.parametrize("kw, msg", [
    (dict(temperature=-1.0), "--temperature -1.0"),
    (dict(temperature=float("nan")), "--temperature nan"),
    (dict(temperature=1.0, top_k=-2), "--top-k -2"),
    (dict(temperature=1.0, top_p=0.0), "--top-p 0.0"),
    (dict(temperature=1.0, top_p=1.5), "--top-p 1.5"),
    (dict(top_k=5), "give --temperature > 0"),
    (dict(top_p=0.9), "give --temperature > 0"),
    (dict(temperature=1.0, seed=-1), "--seed -1"),
])
def test_bad_settings_name_the_value(kw, msg):
    with pytest.raises(ConfigError, match=msg.replace("+", r"\+")):
        Sampling(**kw)


def test_eager_and_static_decode_sample_the_same_tokens():
    """decode_eager (growing CQ cache) and decode_graph(graph=False) (static CQ cache: the path a CUDA graph replays)
    draw the same tokens from one seed; sampling at temperature 1 leaves the greedy tokens; top-k 1 is greedy."""
    from cqtool.cache import CQCache
    from cqtool.generate import decode_eager, decode_graph
    from cqtool.graphs import static_cache
    from cqtool.models import ModelInfo

    from conftest import tiny_model
    from test_codebook import make_codebook

    model = tiny_model("llama")
    cb = make_codebook(ModelInfo.from_config(model.config, "tiny"))
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(7))
    s = Sampling(temperature=1.0, seed=11)
    torch.manual_seed(11)
    eager, _ = decode_eager(model, ids, CQCache(model, cb), 16, None, s)
    torch.manual_seed(11)
    static, _, _ = decode_graph(model, ids, static_cache(model, "cq", 28, cb), 16, None, graph=False, sampling=s)
    greedy, _ = decode_eager(model, ids, CQCache(model, cb), 16, None)
    assert eager == static and len(eager) == 16
    assert eager != greedy
    one, _ = decode_eager(model, ids, CQCache(model, cb), 16, None, Sampling(temperature=1.0, top_k=1))
    assert one == greedy


def test_generate_cli_samples_with_a_reported_seed(tiny_calib, tiny_model_dir, tmp_path):
    """cqtool generate --temperature: the title and JSON say how it decoded; the seed given repeats the texts; without
    --seed one is drawn and reported, and giving it back repeats that run."""
    cb, js = tiny_calib / "cq-8c8b.safetensors", tmp_path / "g.json"
    base = ("generate", "--model", tiny_model_dir, "--codebook", cb, "--prompt", "w1 w2 the cat", "--max-new-tokens", 10,
            "--device", "cpu", "--temperature", 1.5, "--top-k", 20, "--top-p", 0.95)
    res = run(*base, "--seed", 5, "--json", js)
    assert res.exit_code == 0, res.output
    a = json.loads(js.read_text())
    assert a["decoding"] == "sampled (temperature 1.5, top-k 20, top-p 0.95, seed 5)" and a["sampling"]["seed"] == 5
    assert "sampled (temperature 1.5, top-k 20, top-p 0.95, seed 5)" in res.output
    assert run(*base, "--seed", 5, "--json", js).exit_code == 0
    assert [r["token_ids"] for r in json.loads(js.read_text())["runs"]] == [r["token_ids"] for r in a["runs"]]
    res = run(*base, "--json", js)
    assert res.exit_code == 0, res.output
    drawn = json.loads(js.read_text())
    seed = drawn["sampling"]["seed"]
    assert isinstance(seed, int) and f"seed {seed}" in drawn["decoding"]
    assert run(*base, "--seed", seed, "--json", js).exit_code == 0
    assert [r["token_ids"] for r in json.loads(js.read_text())["runs"]] == [r["token_ids"] for r in drawn["runs"]]
    greedy = run("generate", "--model", tiny_model_dir, "--codebook", cb, "--prompt", "w1", "--max-new-tokens", 2,
                 "--device", "cpu", "--json", js)
    assert greedy.exit_code == 0 and json.loads(js.read_text())["decoding"] == "greedy" and "greedy" in greedy.output


def test_generate_cli_rejects_bad_sampling(tiny_calib, tiny_model_dir, tmp_path):
    base = ("generate", "--model", tiny_model_dir, "--codebook", tiny_calib / "cq-8c8b.safetensors", "--prompt", "a",
            "--device", "cpu", "--json", tmp_path / "g.json")
    assert_user_error(run(*base, "--temperature", -0.5), "--temperature -0.5", ">= 0")
    assert_user_error(run(*base, "--temperature", 1, "--top-p", 2), "--top-p 2.0", "(0, 1]")
    assert_user_error(run(*base, "--top-k", 3), "--top-k 3", "--temperature > 0")
    assert not (tmp_path / "g.json").exists()
