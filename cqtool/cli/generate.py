"""cqtool generate"""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from ._app import DEVICE_MAP_HELP, app, console, user_errors


@app.command("generate")
@user_errors
def generate_cmd(
    model: Annotated[str, typer.Option(help="Hub id, alias (smollm2, llama-2-7b), local dir or .gguf file")],
    codebook: Annotated[str, typer.Option(help="CQ codebook file (from cqtool quantize or calibrate)")],
    prompt: Annotated[Optional[str], typer.Option(help="Prompt text")] = None,
    prompt_file: Annotated[Optional[str], typer.Option(help="Read the prompt from this file")] = None,
    prompts: Annotated[Optional[str], typer.Option(help="A file of prompts, one per line (blank lines skipped), "
                                                        "decoded as one left-padded batch")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate (stops at end of sequence)")] = 64,
    temperature: Annotated[float, typer.Option(help="0: greedy; > 0: sample from softmax(logits / temperature)")] = 0.0,
    top_k: Annotated[int, typer.Option(help="Sample among the k most likely tokens only (0: all)")] = 0,
    top_p: Annotated[float, typer.Option(help="Sample within the smallest set of tokens of this probability (1: all)")] = 1.0,
    seed: Annotated[Optional[int], typer.Option(help="Seed for sampling (both caches use it; default: drawn and "
                                                "reported)")] = None,
    window: Annotated[Optional[int], typer.Option(help="Full-precision window of recent tokens (paper: 128)")] = None,
    sinks: Annotated[Optional[int], typer.Option(help="Full-precision first tokens")] = None,
    compare: Annotated[bool, typer.Option(help="Also generate with the full-precision DynamicCache")] = True,
    chat: Annotated[bool, typer.Option(help="Wrap the prompt in the tokenizer's chat template (instruct models)")] = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:N]")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto | float32 | float16 | bfloat16")] = "auto",
    device_map: Annotated[Optional[str], typer.Option(help=DEVICE_MAP_HELP)] = None,
    backend: Annotated[str, typer.Option(help="auto: CUDA kernels where they apply | reference: PyTorch reference only")] = "auto",
    cuda_graphs: Annotated[bool, typer.Option("--cuda-graphs", help="Replay each decode step as a CUDA graph (one per GPU with "
                                              "--device-map; the full-precision run uses transformers' StaticCache)")] = False,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Save the texts and numbers as JSON")] = None,
):
    """Generation through a CQ cache, beside the full-precision cache (greedy, or sampled with --temperature, --top-k,
    --top-p from one seed for both): the texts, where they first differ,
    tokens/s (new tokens over the wall time of prefill and decode, no warm-up: `cqtool bench generate` times
    generation; with --cuda-graphs the steps run over that time, since a graph runs all --max-new-tokens steps), cache
    memory and the attention backend. --prompts FILE: several prompts, one per line, decoded as one batch."""
    from rich.panel import Panel
    from rich.table import Table

    from .. import attention
    from ..generate import check_args, run_generate
    from ..io import write_json
    from ..sampling import Sampling

    text = check_args(prompt, prompt_file, max_new_tokens, prompts)
    sampling = Sampling(temperature, top_k, top_p, seed)
    with attention.backend(backend), console.status("loading the model and generating"):
        res = run_generate(model, codebook, text, max_new_tokens, window, sinks, compare, device, dtype, device_map,
                           chat, cuda_graphs, sampling)
    batch = "prompts" in res
    n_tok = f"{len(res['prompts'])} prompts of {min(res['prompt_tokens'])}-{max(res['prompt_tokens'])} tokens" if batch \
        else f"{res['prompt_tokens']} prompt tokens"
    t = Table(title=f"{res['model']['model_id']}: {n_tok}, {res['decoding']}, {' + '.join(res['devices'])}, "
                    f"{res['dtype'].removeprefix('torch.')}")
    for col in ("cache", "bits/channel", "new tokens", "tokens/s", "cache MiB", "same as full precision"):
        t.add_column(col, justify="right")
    for r in res["runs"]:
        agree = "-" if "tokens_agreeing" not in r else \
            f"{r['tokens_agreeing']} of {r['new_tokens']}" if batch else f"first {r['tokens_agreeing']}"
        t.add_row(r["cache"].replace(" (full precision)", ""), f"{r['bits_per_channel']:g}", str(r["new_tokens"]),
                  f"{r['tokens_per_s']:.1f}", f"{r['cache_bytes'] / 2**20:.3f}", agree)
    if batch:
        for i, p in enumerate(res["prompts"]):
            console.print(Panel(p.strip(), title=f"prompt {i + 1}", expand=False))
            for r in res["runs"]:
                o = r["outputs"][i]
                agree = f", first {o['tokens_agreeing']} of {o['new_tokens']} equal" if "tokens_agreeing" in o else ""
                console.print(Panel(o["text"], title=f"{r['cache']}{agree}", expand=False))
    else:
        console.print(Panel(res["prompt"].strip(), title="prompt", expand=False))
        for r in res["runs"]:
            console.print(Panel(r["text"], title=r["cache"], expand=False))
    console.print(t)
    cq = res["runs"][0]
    ran = (f"CUDA kernels ({', '.join(cq['attention_kernels'])})" if cq["attention_kernels"] else
           f"the PyTorch reference (backends: {', '.join(f'{k} {v}' for k, v in cq['backends'].items())})")
    line = f"{cq['cache']}, {res['decoding']}: attention ran on {ran}"
    if res["cuda_graphs"]:
        n = cq["graph_replays"]
        per = f"one CUDA graph per run of layers on each of {len(res['devices'])} GPUs" if len(res["devices"]) > 1 \
            else "a CUDA graph"
        line += (f"; {n} decode steps replayed as {per}" if n else
                 "; no CUDA graph was captured (3 new tokens or fewer: all steps ran as warm-up)")
    if "tokens_agreeing" in cq:
        fp = res["runs"][1]
        first = (f"{cq['tokens_agreeing']} of {cq['new_tokens']} new tokens (each prompt's up to its first difference)"
                 if batch else f"first {cq['tokens_agreeing']} of {cq['new_tokens']} new tokens")
        line += (f"; {first} equal to the full-precision ones; "
                 f"cache {cq['cache_bytes'] / 2**20:.3f} MiB vs {fp['cache_bytes'] / 2**20:.3f} MiB")
    if batch:
        line += f"; {len(res['prompts'])} prompts decoded as one left-padded batch"
    console.print(line, soft_wrap=True)
    if json_out:
        write_json(json_out, res)
        console.print(f"wrote {json_out}")
