"""lm-eval integration: cache injection, local task files, and tiny-model runs through lm-eval's HFLM (CPU)."""
import importlib.util
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from cqtool.config import ConfigError
from cqtool.lmeval import (LOCAL_TASKS, convert_arc, convert_boolq, convert_copa, convert_hellaswag, convert_lambada,
                           convert_openbookqa, convert_winogrande, local_folder, read_hellaswag, run_tasks, use_method,
                           write_local_tasks)
from cqtool.methods import FullPrecision, KVMethod
from cqtool.models import cache_kwarg, output_cache

from conftest import SHARED_DATA, shared_file, tiny_model

MC_DIR = "multiple-choice"


def needs_lm_eval():
    return pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'cqtool[lmeval]')")


class CountingMethod(KVMethod):
    """Hands out plain DynamicCaches and remembers each one, so a test can see which cache a forward used."""

    name = "counting"

    def __init__(self):
        self.caches = []

    def make_cache(self, model):
        self.caches.append(DynamicCache(config=model.config))
        return self.caches[-1]

    def bits_per_channel(self, seqlen):
        return 16.0


@pytest.fixture()
def model(tokenizer):
    return tiny_model("llama", vocab=len(tokenizer))


# ---------------------------------------------------------------- use_method


def test_use_method_injects_a_fresh_cache_per_call_and_restores(model):
    ids = torch.randint(0, 100, (2, 9))
    method = CountingMethod()
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        with use_method(model, method):
            out = model(ids)  # as HFLM calls it: no cache given
            assert len(method.caches) == 1 and output_cache(out) is method.caches[0]
            assert method.caches[0].get_seq_length() == 9
            torch.testing.assert_close(out.logits, ref)
            out = model(ids, use_cache=False)  # a config or caller saying use_cache=False must not bypass the method
            assert len(method.caches) == 2 and output_cache(out) is method.caches[1]
            assert method.caches[1].get_seq_length() == 9  # fresh, not the first one

            mine = DynamicCache(config=model.config)
            assert output_cache(model(ids, **{cache_kwarg(model): mine})) is mine
            assert len(method.caches) == 2  # a caller's own cache is left alone
            mine = DynamicCache(config=model.config)
            with warnings.catch_warnings():  # transformers >= 5.24 deprecates the name, on purpose here
                warnings.simplefilter("ignore", FutureWarning)
                assert output_cache(model(ids, past_key_values=mine)) is mine  # the name before transformers 5.24
            assert len(method.caches) == 2

            gen = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
            assert len(method.caches) == 3  # one cache for the whole generation, not one per step
            assert method.caches[2].get_seq_length() == gen.shape[1] - 1
        assert "forward" not in model.__dict__ and "generate" not in model.__dict__
        model(ids)
        assert len(method.caches) == 3


def test_use_method_restores_after_an_error_and_keeps_a_patched_forward(model):
    ids = torch.randint(0, 100, (1, 5))
    sentinel = model.forward  # an instance-level forward, as accelerate's hooks install
    model.forward = sentinel
    with pytest.raises(RuntimeError, match="boom"):
        with use_method(model, CountingMethod()):
            raise RuntimeError("boom")
    assert model.__dict__["forward"] is sentinel and "generate" not in model.__dict__
    with torch.no_grad(), use_method(model, FullPrecision()):  # no cache object: the call is untouched
        assert output_cache(model(ids, use_cache=False)) is None


def test_use_method_counts_forwards_and_micro_batches_need_cuda_gpus(model):
    """`stats` counts the forwards (none cut into micro-batches with 1); micro_batches > 1 on a model that is not on
    CUDA GPUs is a one-line error on entering use_method, and the model's forward is left as it was."""
    stats: dict = {}
    ids = torch.randint(0, model.config.vocab_size, (3, 9))
    with torch.no_grad(), use_method(model, CountingMethod(), 1, stats):
        model(ids)
        model(ids[:1])
    assert stats == {"forwards": 2, "micro_batched": 0}
    with pytest.raises(ConfigError, match="micro-batch pipelining needs the model on CUDA GPUs"):
        with use_method(model, CountingMethod(), 2):
            pass
    assert "forward" not in model.__dict__


# ---------------------------------------------------------------- local task files reproduce lm-eval's prompts


def _builtin(task_rel: str):
    """(yaml config, utils module or None) of one of lm-eval's own task definitions."""
    import yaml

    lm_eval = needs_lm_eval()
    d = Path(lm_eval.__file__).parent / "tasks" / task_rel
    loader = type("L", (yaml.SafeLoader,), {})
    loader.add_constructor("!function", lambda ld, node: ld.construct_scalar(node))
    cfg = yaml.load(d.with_suffix(".yaml").read_text(), Loader=loader)
    utils = d.parent / "utils.py" if (d.parent / "utils.py").exists() else d.parent / "preprocess_winogrande.py"
    mod = None
    if utils.exists():
        spec = importlib.util.spec_from_file_location(f"lm_eval_builtin_{d.parent.name}", utils)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    return cfg, mod


def _render(template: str, doc: dict):
    from lm_eval.utils import apply_template

    return apply_template(template, doc)


CHOICES = {"text": ["dry palms", "wet palms", "palms covered with oil", "palms covered with lotion"],
           "label": ["A", "B", "C", "D"]}


def test_arc_openbookqa_piqa_boolq_match_lm_eval():
    arc, _ = _builtin("arc/arc_easy")
    hub = {"question": "Which of the following will produce the most heat?", "choices": CHOICES, "answerKey": "C"}
    got = convert_arc({"query": "Question: " + hub["question"], "choices": CHOICES["text"], "gold": 2})
    assert got["query"] == _render(arc["doc_to_text"], hub) and str(got["gold"]) == _render(arc["doc_to_target"], hub)

    obqa, _ = _builtin("openbookqa/openbookqa")
    hub = {"question_stem": "Predators eat", "choices": CHOICES, "answerKey": "B"}
    got = convert_openbookqa({"query": "Predators eat", "choices": CHOICES["text"], "gold": 1})
    assert got["query"] == hub[obqa["doc_to_text"]] and str(got["gold"]) == _render(obqa["doc_to_target"], hub)

    piqa, _ = _builtin("piqa/piqa")
    hub = {"goal": "dresser", "sol1": "replace drawer with bobby pin", "sol2": "finish, woodgrain with bobby pin", "label": 1}
    got = convert_arc({"query": "Question: dresser\n", "choices": [hub["sol1"], hub["sol2"]], "gold": 1})
    assert got["query"] == _render(piqa["doc_to_text"], hub) and got["choices"] == [hub["sol1"], hub["sol2"]]

    boolq, _ = _builtin("super_glue/boolq/default")
    hub = {"passage": "Ethanol fuel is ethyl alcohol.\nIt is made from corn.", "question": "is ethanol a fuel", "label": 1}
    got = convert_boolq({"query": f"Passage: {hub['passage']}\nQuestion: {hub['question']}?", "choices": ["no", "yes"],
                         "gold": 1})
    assert got["query"] == _render(boolq["doc_to_text"], hub) and got["choices"] == boolq["doc_to_choice"]


def test_copa_winogrande_lambada_match_lm_eval():
    _, copa = _builtin("super_glue/copa/default")
    hub = {"premise": "The man turned on the faucet.", "choice1": "The toilet filled with water.",
           "choice2": "Water flowed from the spout.", "question": "effect", "label": 1}
    got = convert_copa({"query": "The man turned on the faucet, therefore",
                        "choices": ["the toilet filled with water.", "water flowed from the spout."], "gold": 1})
    assert got["query"] == copa.doc_to_text(hub) and got["choices"] == copa.doc_to_choice(hub)

    _, wino = _builtin("winogrande/default")
    hub = {"sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.", "option1": "Sarah",
           "option2": "Maria", "answer": "2"}
    got = convert_winogrande({"context_options": ["Sarah was a much better surgeon than Maria so Sarah",
                                                  "Sarah was a much better surgeon than Maria so Maria"],
                              "continuation": "always got the easier cases.", "gold": 1})
    assert got["context_options"] == wino.doc_to_choice(hub) and got["continuation"] == wino.doc_to_target(hub)
    assert got["gold"] == wino.doc_to_text(hub)

    lam, _ = _builtin("lambada/lambada_openai")
    hub = {"text": "I look at him, feeling stunned. I don't care about signs"}
    got = convert_lambada({"context": "I look at him, feeling stunned. I don't care about", "continuation": "signs"})
    assert got["context"] == _render(lam["doc_to_text"], hub) and got["target"] == _render(lam["doc_to_target"], hub)


@pytest.mark.parametrize("hub, line", [
    # ActivityNet: ctx_b is capitalized by lm-eval; the file joins it lower-case
    ({"activity_label": "Clean and jerk", "ctx_a": "A lady walks to a barbell. She bends down and grabs the pole.",
      "ctx_b": "the lady", "endings": ["swings and lands in her arms.", "pulls the barbell forward.",
                                       "pulls a rope attached to the barbell.", "stands and lifts the weight over her head."],
      "label": "3"},
     "Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. the lady"),
    # WikiHow: no ctx_b; [title]/[step] markers already resolved in the file, stray brackets are not
    ({"activity_label": "Family Life", "ctx_a": "[header] How to entertain a toddler. Visit a site like [www.kiddio.org].",
      "ctx_b": "", "endings": ["Try some [step] arts and crafts.", "Make sure [substeps] you get a tablet.",
                               "Ask the toddler.", "Go outside."], "label": "0"},
     "Family Life: How to entertain a toddler. Visit a site like [www.kiddio.org]."),
])
def test_hellaswag_matches_lm_eval_preprocessing(hub, line):
    import datasets

    _, utils = _builtin("hellaswag/hellaswag")
    want = utils.process_docs(datasets.Dataset.from_list([hub]))[0]
    endings = [utils.preprocess(e) for e in hub["endings"]]  # the file's endings are already cleaned
    got = convert_hellaswag({"context": line, "endings": endings, "gold": int(hub["label"])})
    assert got["query"] == want["query"] and got["choices"] == want["choices"] and got["gold"] == want["gold"]


def test_shared_hellaswag_file_parses():
    rows = read_hellaswag(shared_file(f"{MC_DIR}/hellaswag_val_full.txt.bz2"))
    assert len(rows) == 10042 and {r["gold"] for r in rows} == {0, 1, 2, 3}
    assert all(len(r["endings"]) == 4 for r in rows)
    assert convert_hellaswag(rows[0])["query"] == "Roof shingle removal: A man is sitting on a roof. He"


# ---------------------------------------------------------------- task files and errors


def test_local_folder_accepts_the_parent_and_reports_missing_files(tmp_path):
    shared_file(MC_DIR)
    assert local_folder(SHARED_DATA) == SHARED_DATA / MC_DIR
    assert local_folder(SHARED_DATA / MC_DIR) == SHARED_DATA / MC_DIR
    with pytest.raises(ConfigError, match="no arc_easy.jsonl in"):
        write_local_tasks(tmp_path, ["arc_easy"], tmp_path / "out")
    (tmp_path / "arc_easy.jsonl").write_text(json.dumps({"question": "no query field"}) + "\n")
    with pytest.raises(ConfigError, match="expected fields"):
        write_local_tasks(tmp_path, ["arc_easy"], tmp_path / "out")
    with pytest.raises(ConfigError, match="does not exist"):
        local_folder(tmp_path / "nope")


def test_missing_lm_eval_is_a_one_line_config_error(monkeypatch):
    for name in ("lm_eval", "lm_eval.models.huggingface", "lm_eval.tasks"):
        monkeypatch.setitem(sys.modules, name, None)  # import now raises ImportError
    with pytest.raises(ConfigError) as e:
        run_tasks(None, None, ["arc_easy"], FullPrecision(), data_dir=None)
    assert "pip install 'cqtool[lmeval]'" in str(e.value) and "\n" not in str(e.value)


def test_unknown_local_task_is_a_one_line_config_error():
    needs_lm_eval()
    with pytest.raises(ConfigError) as e:
        run_tasks(None, None, ["arc_easyy"], FullPrecision(), data_dir=str(shared_file(MC_DIR)))
    assert "did you mean 'arc_easy'" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_unknown_hub_task_and_offline_hub_are_config_errors(monkeypatch):
    needs_lm_eval()  # indexes all of lm-eval's tasks: ~20 s
    with pytest.raises(ConfigError, match="did you mean 'arc_easy'") as e:
        run_tasks(None, None, ["arc_eazy"], FullPrecision(), data_dir=None)
    assert "\n" not in str(e.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="unreachable.*--data-dir"):
        run_tasks(None, None, ["arc_easy"], FullPrecision(), data_dir=None)


# ---------------------------------------------------------------- end to end through lm-eval's HFLM


def test_run_tasks_local_arc_easy_and_winogrande(model, tokenizer):
    needs_lm_eval()
    folder = shared_file(MC_DIR)
    method = CountingMethod()
    res = run_tasks(model, tokenizer, ["arc_easy", "winogrande"], method, data_dir=str(folder), limit=8)
    assert set(res) == {"arc_easy", "winogrande"}
    for task, r in res.items():
        assert r["n"] == 8 and r["source"] == str(folder / LOCAL_TASKS[task].files[0])
        assert 0.0 <= r["acc"] <= 1.0 and r["acc_stderr"] >= 0.0
    assert 0.0 <= res["arc_easy"]["acc_norm"] <= 1.0 and res["winogrande"]["acc_norm"] is None
    # lm-eval's forwards ran through the method: at least one per batch, at most one per (context, choice)
    assert 1 <= len(method.caches) <= 8 * 4 + 8 * 2
    assert all(c.get_seq_length() > 0 for c in method.caches)
    assert "forward" not in model.__dict__
