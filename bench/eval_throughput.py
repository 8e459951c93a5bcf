"""Perplexity-scoring throughput and loss memory, against a bare forward and the transformers docs' recipe.

    python bench/eval_throughput.py                       # smollm2-135m, 4k window; about 3 minutes on 2 cores
    python bench/eval_throughput.py --length 8192         # the 8k window of docs/eval.md (about twice as long)
    python bench/eval_throughput.py --model tiny-llama --length 2048 --stride 1024

Each measurement runs in its own subprocess, so its peak RSS is its own. Rows:

- ``forward (decoder only)``: the base model's forward, no LM head: the floor for any scoring.
- ``forward (full logits)``: ``model(input_ids)`` as transformers runs it: the [T, vocab] logits are built.
- ``score (eval.perplexity)``: our scoring of the same tokens, every token scored: decoder + chunked LM head + NLL.
- ``sliding, ours`` / ``sliding, transformers docs recipe``: the same text (2 x length tokens) with the same stride;
  the recipe (transformers' "Perplexity of fixed-length models" page) calls ``model(input_ids, labels=...)`` per
  window, so it builds full logits and runs the head on unscored positions too.
- ``loss fwd+bwd, full logits`` / ``loss fwd+bwd, chunked``: the loss alone on the model's real LM head with hidden
  states that require grad (what training pays for the loss), at half the length and at the length.

tokens/s counts tokens fed to the model (for sliding, overlapping tokens count once per window they are fed in).
Wall time is what a user waits; CPU time (both threads) is less disturbed when other jobs share the cores. With
``--repeats N`` the rows are measured round-robin N times and each keeps its fastest round.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import corpus_tokens, reset_peak, run_children, status_mib  # noqa: E402
from utils.cli import exit_process  # noqa: E402
from eval.perplexity import plan_windows, score  # noqa: E402
from models.loss import IGNORE_INDEX, causal_lm_parts, chunked_causal_lm_loss  # noqa: E402
from models.load import load_model, load_tokenizer  # noqa: E402


def hf_recipe(model, ids: torch.Tensor, length: int, stride: int) -> tuple[float, int, int]:
    """The transformers docs' sliding-window recipe: full-logits forward with labels per window.
    Returns (NLL sum, scored tokens, tokens fed)."""
    nll_sum, n_scored, prev_end, fed = 0.0, 0, 0, 0
    for begin in range(0, ids.numel(), stride):
        end = min(begin + length, ids.numel())
        trg_len = end - prev_end
        inputs = ids[begin:end][None]
        labels = inputs.clone()
        labels[:, :-trg_len] = IGNORE_INDEX
        out = model(input_ids=inputs, labels=labels, use_cache=False)
        n = int((labels[:, 1:] != IGNORE_INDEX).sum())  # the model shifts labels: this many tokens are averaged
        nll_sum += float(out.loss) * n
        n_scored += n
        fed += inputs.numel()
        prev_end = end
        if end == ids.numel():
            break
    return nll_sum, n_scored, fed


def one(name: str, args) -> dict:
    """Run measurement ``name`` in this process; returns seconds, tokens fed, peak RSS above the start."""
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    L = args.length
    ids = corpus_tokens(load_tokenizer(args.model), 2 * L, split="heldout")
    with torch.inference_mode():  # warm-up: first-call allocations and kernel selection, outside the timing
        model(input_ids=ids[None, :256], use_cache=False)
    extra = {}
    if name.startswith("loss"):
        T = L // 2 if name.endswith("half") else L
        hidden = torch.randn(1, T, model.config.hidden_size, requires_grad=True)
        labels = ids[:T][None]
        _, head = causal_lm_parts(model)
        head.requires_grad_(False)  # the gradient that matters here is the hidden states'
        base = reset_peak()  # loading the model does not count
        t, c = time.perf_counter(), time.process_time()
        if "full" in name:
            logits = head(hidden)
            loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), labels[0, 1:], reduction="sum")
        else:
            loss, _ = chunked_causal_lm_loss(hidden, head, labels, chunk_size=args.chunk_size)
        loss.backward()
        seconds, cpu, fed = time.perf_counter() - t, time.process_time() - c, T
        extra["length"] = T
    else:
        base = reset_peak()
        with torch.inference_mode():
            t, c = time.perf_counter(), time.process_time()
            if name == "decoder":
                causal_lm_parts(model)[0](input_ids=ids[None, :L], use_cache=False)
                fed = L
            elif name == "full_logits":
                model(input_ids=ids[None, :L], use_cache=False)
                fed = L
            elif name == "score":
                fed = score(model, ids[:L], [(0, L, 1)], chunk_size=args.chunk_size)["forward_tokens"]
            elif name == "sliding_ours":
                windows = plan_windows(2 * L, L, args.stride)
                r = score(model, ids, windows, chunk_size=args.chunk_size)
                fed, extra["ppl"] = r["forward_tokens"], float(torch.tensor(r["nll_sum"] / r["tokens"]).exp())
            elif name == "sliding_recipe":
                nll_sum, n, fed = hf_recipe(model, ids, L, args.stride)
                extra["ppl"] = float(torch.tensor(nll_sum / n).exp())
            seconds, cpu = time.perf_counter() - t, time.process_time() - c
    return dict(name=name, seconds=seconds, cpu_seconds=cpu, fed=fed, peak_mib=status_mib("VmHWM") - base, **extra)


ROWS = [
    ("decoder", "forward (decoder only)"),
    ("full_logits", "forward (full logits)"),
    ("score", "score (eval.perplexity)"),
    ("sliding_ours", "sliding, ours"),
    ("sliding_recipe", "sliding, transformers docs recipe"),
    ("loss_full_half", "loss fwd+bwd, full logits"),
    ("loss_chunked_half", "loss fwd+bwd, chunked"),
    ("loss_full", "loss fwd+bwd, full logits"),
    ("loss_chunked", "loss fwd+bwd, chunked"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--stride", type=int, default=None, help="sliding stride (default: length / 2)")
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=None, help="comma-separated measurement names (default: all)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="rounds over the measurements (interleaved, so that load from other processes hits all "
                         "rows alike); each row reports its fastest round")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one measurement, print JSON
    args = ap.parse_args()
    args.stride = args.stride or args.length // 2
    if args.one:
        print(json.dumps(one(args.one, args)))
        return
    names = args.only.split(",") if args.only else [n for n, _ in ROWS]
    print(f"model {args.model}, length {args.length}, stride {args.stride}, chunk {args.chunk_size}, "
          f"{args.threads} threads, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}", flush=True)
    results: dict[str, dict] = {}
    for _ in range(args.repeats):
        for name in names:
            cmd = [sys.executable, __file__, "--one", name, "--model", args.model, "--length", str(args.length),
                   "--stride", str(args.stride), "--chunk-size", str(args.chunk_size), "--threads", str(args.threads)]
            r = run_children([cmd], f"measurement {name}")[0].result()
            if name not in results or r["seconds"] < results[name]["seconds"]:
                results[name] = r
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    for name in names:
        r = results[name]
        label = dict(ROWS)[name] + (f" @{r['length']}" if "length" in r else "")
        tps = f"{r['fed'] / r['seconds']:9.0f}"
        ppl = f"  ppl {r['ppl']:.4f}" if "ppl" in r else ""
        print(f"{label:42s} {r['seconds']:8.2f} s  {tps} tokens/s  cpu {r['cpu_seconds']:8.2f} s  "
              f"peak +{r['peak_mib']:7.0f} MiB{ppl}", flush=True)
    if "score" in results:
        for ref in ("full_logits", "decoder"):
            if ref in results:
                wall = results["score"]["seconds"] / results[ref]["seconds"] - 1
                cpu = results["score"]["cpu_seconds"] / results[ref]["cpu_seconds"] - 1
                print(f"scoring vs {dict(ROWS)[ref]}: {wall:+.1%} wall time, {cpu:+.1%} CPU time")
    if "sliding_ours" in results and "sliding_recipe" in results:
        s = results["sliding_recipe"]["seconds"] / results["sliding_ours"]["seconds"]
        print(f"sliding: the docs recipe takes {s:.2f}x our time on the same windows")


if __name__ == "__main__":
    main()
    exit_process(0)
