"""lm-eval tasks scored through a KV method's cache.

lm-eval's HFLM calls the model itself; `use_method` hands every such call a fresh cache of the method, so a task
scores the model as it reads its context through the CQ cache (or a baseline's). `run_tasks` evaluates the
standard hub tasks, or, given `data_dir`, the same tasks rebuilt from local files (LOCAL_TASKS) as lm-eval YAML
configs under the standard names.
"""
from __future__ import annotations

import bz2
import contextlib
import difflib
import functools
import inspect
import json
import os
import re
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlparse

from .config import ConfigError
from .methods import KVMethod
from .models import cache_kwarg

INSTALL_HINT = "pip install 'cqtool[lmeval]'"
TASK_ALIASES = {"lambada": "lambada_openai", "openbook_qa": "openbookqa"}


@contextlib.contextmanager
def use_method(model, method: KVMethod, micro_batches: int = 1, stats: dict | None = None) -> Iterator[Any]:
    """While active, each `model(...)` / `model.generate(...)` given no KV cache (`cache`, or `past_key_values` before
    transformers 5.24) runs with a fresh `method.make_cache(model)` (and use_cache=True). A method whose cache is None
    leaves calls untouched. The model's own `forward` / `generate` are restored on exit.

    micro_batches > 1 (a model on CUDA GPUs): a forward given only `input_ids` of two or more rows (as lm-eval's HFLM
    scores its requests) is cut into that many micro-batches, each with a fresh cache, on its own CUDA streams
    (pipeline.MicroBatches), so that the GPUs of a model spread by layers work on different micro-batches at once; it
    returns only the logits, joined in row order. A method without a cache gets an empty DynamicCache there (no host
    sync). Other calls (generate, other arguments, one row) run as one.
    `stats`, if given, counts the forwards ("forwards") and those cut into micro-batches ("micro_batched")."""
    saved = {name: model.__dict__[name] for name in ("forward", "generate") if name in model.__dict__}
    forward, generate = model.forward, model.generate
    signature = inspect.signature(forward)
    kw = cache_kwarg(model)  # "cache" (transformers >= 5.24) or "past_key_values"
    if not kw:
        raise ConfigError(f"{type(model).__name__}.forward takes no KV cache argument; a KV method cannot be used with it")
    pipe = None
    if micro_batches > 1:
        from .pipeline import shared_pipeline

        pipe = shared_pipeline(model, micro_batches)  # ConfigError unless the model is on CUDA GPUs
    stats = stats if stats is not None else {}
    stats.setdefault("forwards", 0)
    stats.setdefault("micro_batched", 0)

    def given(*named: dict) -> bool:  # the caller passed a cache, under either name
        return any(d.get(n) is not None for d in named for n in ("cache", "past_key_values"))

    def pipelined(ids):
        import torch
        from transformers.modeling_outputs import CausalLMOutputWithPast

        from .pipeline import micro_batch_cache, split_batch

        pipe.fork()  # the micro-batch streams wait for the input's copy to the GPU
        parts = []
        try:
            for m, rows in enumerate(split_batch(ids.shape[0], min(pipe.parts, ids.shape[0]))):
                with pipe.on(m):
                    cache = micro_batch_cache(method, model)  # filled on m's streams (pipeline.py says why)
                    parts.append(forward(input_ids=ids[rows], **{kw: cache}, use_cache=True).logits)
        finally:  # also after an error: the caller frees the input on its own streams, which must wait for ours
            pipe.join()
        for t in parts:  # read by the cat below on the current stream: not to be reused before it has
            t.record_stream(torch.cuda.current_stream(t.device))
        stats["micro_batched"] += 1
        return CausalLMOutputWithPast(logits=torch.cat(parts))

    @functools.wraps(forward)  # keeps the signature that generate() inspects
    def forward_with_cache(*args, **kwargs):
        bound = signature.bind_partial(*args, **kwargs)
        stats["forwards"] += 1
        if not given(bound.arguments, kwargs):
            ids = bound.arguments.get("input_ids")
            if pipe is not None and set(bound.arguments) == {"input_ids"} and ids is not None and ids.dim() == 2 \
                    and ids.shape[0] > 1 and ids.is_cuda:
                return pipelined(ids)
            cache = method.make_cache(model)
            if cache is not None:
                bound.arguments[kw] = cache
                bound.arguments["use_cache"] = True
        return forward(*bound.args, **bound.kwargs)

    @functools.wraps(generate)
    def generate_with_cache(*args, **kwargs):
        if not given(kwargs):
            cache = method.make_cache(model)
            if cache is not None:
                kwargs[kw] = cache
        return generate(*args, **kwargs)

    model.forward, model.generate = forward_with_cache, generate_with_cache
    try:
        yield model
    finally:
        for name in ("forward", "generate"):
            if name in saved:
                setattr(model, name, saved[name])
            else:
                model.__dict__.pop(name, None)


# ---------------------------------------------------------------- local data -> the docs lm-eval's tasks show
# Each converter turns one row of a local file into the text lm-eval 0.4's standard task builds from the hub
# row, so the local YAML needs only feature names: query / choices / gold (multiple choice),
# context_options / continuation / gold (winogrande's partial scoring), context / target (lambada).


def _hs_preprocess(text: str) -> str:
    """lm-eval's hellaswag/utils.py preprocess."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _mc(query: str, choices: list[str], gold) -> dict[str, Any]:
    return {"query": query, "choices": list(choices), "gold": int(gold)}


def _with_answer(text: str) -> str:
    return text if text.endswith("Answer:") else text + "\nAnswer:"


def _question(query: str) -> str:
    """arc / piqa: "Question: {question}\\nAnswer:" (llm-foundry files hold "Question: {question}", piqa with a "\\n")."""
    q = query[:-1] if query.endswith("\n") else query
    return _with_answer(q if q.startswith("Question:") else f"Question: {q}")


def convert_arc(row: dict) -> dict:
    return _mc(_question(row["query"]), row["choices"], row["gold"])


def convert_openbookqa(row: dict) -> dict:
    return _mc(row["query"], row["choices"], row["gold"])


def convert_copa(row: dict) -> dict:
    # lm-eval: premise without its final period + " because"/" therefore"; choices " " + first letter lowered
    # (its default target delimiter " " is added on top, so the continuation starts with two spaces: kept as is)
    query = re.sub(r",\s*(because|therefore)$", r" \1", row["query"].strip())
    return _mc(query, [" " + c[0].lower() + c[1:] for c in row["choices"]], row["gold"])


def convert_boolq(row: dict) -> dict:
    # lm-eval: "{passage}\nQuestion: {question}?\nAnswer:", choices no / yes
    q = row["query"]
    q = q[len("Passage: "):] if q.startswith("Passage: ") else q
    return _mc(_with_answer(q), ["no", "yes"], row["gold"])


def convert_winogrande(row: dict) -> dict:
    return {"context_options": list(row["context_options"]), "continuation": row["continuation"].strip(),
            "gold": int(row["gold"])}


def convert_lambada(row: dict) -> dict:
    return {"context": row["context"], "target": " " + row["continuation"]}


def convert_hellaswag(row: dict) -> dict:
    """row: {"context": "label: ctx_a ctx_b", "endings": [4], "gold"} from hellaswag_val_full.txt.

    lm-eval builds preprocess(label + ": " + ctx_a + " " + ctx_b.capitalize()). The file joins ctx_a and ctx_b;
    ctx_b is the unfinished last sentence (ActivityNet items; WikiHow items end with a full stop and have none),
    so it is recovered as the text after the last sentence end.
    """
    label, _, ctx = row["context"].partition(": ")
    if not ctx.rstrip().endswith("."):
        ends = list(re.finditer(r"[.!?] ", ctx))
        cut = ends[-1].end() if ends else 0
        ctx = ctx[:cut] + ctx[cut:].capitalize()
    return _mc(_hs_preprocess(f"{label}: {ctx}"), [_hs_preprocess(e) for e in row["endings"]], row["gold"])


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path}:{i} is not JSON: {e.msg}") from None
    return rows


def read_hellaswag(path: Path) -> list[dict]:
    """6 lines per item: "label: context", gold index, 4 endings (plain or .bz2)."""
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().rstrip("\n").split("\n")
    if len(lines) % 6:
        raise ConfigError(f"{path}: {len(lines)} lines is not 6 per item (context, gold index, 4 endings)")
    rows = []
    for i in range(0, len(lines), 6):
        if not lines[i + 1].strip().isdigit():
            raise ConfigError(f"{path}:{i + 2} should be the gold index 0-3, got {lines[i + 1][:40]!r}")
        rows.append({"context": lines[i], "gold": int(lines[i + 1]), "endings": lines[i + 2:i + 6]})
    return rows


def _metrics(*names: str) -> list[dict[str, Any]]:
    # as lm-eval's own tasks declare them: perplexity aggregated as a perplexity (lower is better), the rest means
    return [{"metric": n, "aggregation": "perplexity", "higher_is_better": False} if n == "perplexity"
            else {"metric": n, "aggregation": "mean", "higher_is_better": True} for n in names]


MC_FIELDS = {"doc_to_text": "query", "doc_to_target": "gold", "doc_to_choice": "choices"}


@dataclass(frozen=True)
class LocalTask:
    """A standard lm-eval task rebuilt from a local file (first of `files` found in the data folder)."""

    files: tuple[str, ...]
    convert: Callable[[dict], dict]
    split: str = "validation"  # the split the standard task evaluates
    output_type: str = "multiple_choice"
    fields: tuple[tuple[str, str], ...] = tuple(MC_FIELDS.items())
    metrics: tuple[str, ...] = ("acc", "acc_norm")
    version: float = 1.0
    read: Callable[[Path], list[dict]] = read_jsonl


LOCAL_TASKS: dict[str, LocalTask] = {
    "arc_easy": LocalTask(("arc_easy.jsonl",), convert_arc, split="test"),
    "arc_challenge": LocalTask(("arc_challenge.jsonl",), convert_arc, split="test"),
    "piqa": LocalTask(("piqa.jsonl",), convert_arc),
    "winogrande": LocalTask(("winogrande.jsonl",), convert_winogrande, metrics=("acc",),
                            fields=(("doc_to_text", "gold"), ("doc_to_target", "continuation"),
                                    ("doc_to_choice", "context_options"))),
    "hellaswag": LocalTask(("hellaswag_val_full.txt.bz2", "hellaswag_val_full.txt"), convert_hellaswag,
                           read=read_hellaswag),
    "lambada_openai": LocalTask(("lambada_openai.jsonl",), convert_lambada, split="test", output_type="loglikelihood",
                                fields=(("doc_to_text", "context"), ("doc_to_target", "target")),
                                metrics=("perplexity", "acc")),
    "openbookqa": LocalTask(("openbook_qa.jsonl", "openbookqa.jsonl"), convert_openbookqa, split="test"),
    "copa": LocalTask(("copa.jsonl",), convert_copa, metrics=("acc",)),
    "boolq": LocalTask(("boolq.jsonl",), convert_boolq, metrics=("acc",), version=2.0),
}


def canonical_task(name: str) -> str:
    name = name.strip()
    return TASK_ALIASES.get(name.lower(), name)


def _unknown_task(name: str, known: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    listing = f" (known: {', '.join(sorted(known))})" if len(known) <= 30 else ""
    return ConfigError(f"unknown lm-eval task {name!r} {where}{hint}{listing}")


def local_folder(data_dir: str | os.PathLike) -> Path:
    """The folder holding the task files: `data_dir` itself or its `multiple-choice/` subfolder."""
    d = Path(data_dir).expanduser()
    if not d.is_dir():
        raise ConfigError(f"data folder {str(data_dir)!r} does not exist")
    sub = d / "multiple-choice"
    return sub if sub.is_dir() and not any((d / f).exists() for t in LOCAL_TASKS.values() for f in t.files) else d


def write_local_tasks(data_dir: str | os.PathLike, tasks: list[str], out_dir: str | os.PathLike) -> dict[str, str]:
    """Write `<task>.yaml` + `data/<task>.jsonl` (docs as lm-eval shows them) into `out_dir`, for
    `TaskManager(include_path=out_dir)`. -> {task: source file}. Usable with `lm_eval --include_path` too."""
    import yaml

    folder, out = local_folder(data_dir), Path(out_dir)
    (out / "data").mkdir(parents=True, exist_ok=True)
    sources = {}
    for name in tasks:
        if name not in LOCAL_TASKS:
            raise _unknown_task(name, list(LOCAL_TASKS), "for local data (other tasks need the hub: give no data folder)")
        spec = LOCAL_TASKS[name]
        src = next((folder / f for f in spec.files if (folder / f).is_file()), None)
        if src is None:
            raise ConfigError(f"task {name}: no {' or '.join(spec.files)} in {folder}")
        try:
            docs = [spec.convert(r) for r in spec.read(src)]
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ConfigError(f"task {name}: {src} does not have the expected fields ({type(e).__name__}: {e})") from None
        if not docs:
            raise ConfigError(f"task {name}: {src} holds no items")
        data = out / "data" / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
        cfg = {"task": name, "dataset_path": "json",
               "dataset_kwargs": {"data_files": {spec.split: str(data)}, "cache_dir": str(out / "hf-datasets")},
               "output_type": spec.output_type, f"{spec.split}_split": spec.split, **dict(spec.fields),
               "metric_list": _metrics(*spec.metrics), "metadata": {"version": spec.version, "source": str(src)}}
        (out / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        sources[name] = str(src)
    return sources


# ---------------------------------------------------------------- running lm-eval


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ConfigError(f"lm-eval tasks need the lm-eval package ({e.name or e} is not installed): {INSTALL_HINT}") from None
    return lm_eval, HFLM, TaskManager


def hub_reachable(timeout: float = 3.0) -> bool:
    if any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout).close()
        return True
    except OSError:
        return False


@functools.cache
def _hub_task_manager(TaskManager):
    return TaskManager()  # indexes lm-eval's ~15k task configs (about 20 s): once per process


def _number(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None  # stderr may be "N/A"


def run_tasks(model, tokenizer, tasks: list[str], method: KVMethod, data_dir: str | None = None, limit: int | None = None,
              batch_size: int = 1, seed: int = 0, bootstrap_iters: int = 1000, micro_batches: int = 1,
              stats: dict | None = None) -> dict[str, dict[str, Any]]:
    """Zero-shot lm-eval tasks on `model` with every forward through `method`'s cache.

    -> {task: {"acc", "acc_norm", "acc_stderr", "acc_norm_stderr", ..., "n", "source"}} as lm-eval reports them
    (acc_norm None where the task has none, lambada adds perplexity). `data_dir`: a folder with the LOCAL_TASKS
    files (or its parent holding `multiple-choice/`); None: the standard hub tasks. `bootstrap_iters` only
    affects the perplexity stderr (acc stderr is analytic). Seeds Python, numpy and torch, as lm-eval does.
    micro_batches, stats: see use_method (each batch of requests cut into micro-batches on a model on CUDA GPUs).
    """
    lm_eval, HFLM, TaskManager = _import_lm_eval()
    names = list(dict.fromkeys(canonical_task(t) for t in tasks if t.strip()))
    if not names:
        raise ConfigError("no lm-eval task given")
    with tempfile.TemporaryDirectory(prefix="cqtool-lmeval-") as tmp:
        if data_dir is not None:
            sources = write_local_tasks(data_dir, names, tmp)
            manager = TaskManager(include_path=tmp, include_defaults=False)
        else:
            manager = _hub_task_manager(TaskManager)
            for n in names:
                if n not in manager.all_tasks:
                    raise _unknown_task(n, manager.all_tasks, "in lm-eval")
            if not hub_reachable():
                raise ConfigError("lm-eval tasks need the Hugging Face hub, which is unreachable here: give a data folder "
                                  f"(--data-dir) with local files for {', '.join(LOCAL_TASKS)}")
            sources = {}
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        with use_method(model, method, micro_batches, stats):
            out = lm_eval.simple_evaluate(model=lm, tasks=names, limit=limit, task_manager=manager, log_samples=False,
                                          bootstrap_iters=bootstrap_iters, random_seed=seed, numpy_random_seed=seed,
                                          torch_random_seed=seed, fewshot_random_seed=seed)
    results = {}
    for task, metrics in out["results"].items():
        row: dict[str, Any] = {"acc": None, "acc_norm": None}
        for key, v in metrics.items():
            metric, sep, _ = key.partition(",")
            if sep:
                row[metric] = _number(v)
        row["n"] = out.get("n-samples", {}).get(task, {}).get("effective")
        row["source"] = sources.get(task, "hub")
        results[task] = row
    return results
