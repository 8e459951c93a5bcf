"""Shared-prefix scoring against independent prompts: a RULER-style depth sweep, both ways, same answers?

    python bench/shared_prefix.py                                   # smollm2-135m, niah_single at 8k, 5 depths x 4
    python bench/shared_prefix.py --length 4096 --dtype float32     # what a CPU without bf16 units runs
    python bench/shared_prefix.py --task vt --samples 2
    python bench/shared_prefix.py --costs                           # what a prefill after a cached prefix costs

The sweep is ``eval.ruler.evaluate_ruler`` over ``--depths`` x ``--samples`` prompts of one task and length, run twice
in one process on the same loaded model (after a warm-up forward): once with ``eval.common.SharedPrefix`` reusing
the KV cache of the prefix each prompt shares with the previous one (the depths of one sample share its haystack up
to the earlier needle), once prefilling every prompt in full (``--no-shared-prefix``). Printed: prompt tokens and
the share actually prefilled, wall and CPU seconds of each, their ratio, and how many greedy answers agree (the
reuse is exact in exact arithmetic; in floating point a prefill split in two rounds differently, so a near-tie
between two tokens could in principle flip).

The saving has a ceiling set by the sweep and by attention. With depths d_1 < ... < d_k of one haystack, a prompt
can reuse at most the text before the previous needle, and the tokens after it sit late in the prompt, where each
attends to everything before it: the rest of a prompt with a cached fraction p costs about (1 - p) of the linear
layers but (1 - p^2) of the attention. ``SharedPrefix`` reuses a prefix only from a third of the prompt on (below
that, prefilling the rest after a cache is slower than one causal prefill on a CPU); docs/eval.md has the figures.
``--costs`` measures that directly on random token ids: one causal prefill of ``--length`` tokens, then the rest
after a cached prefix of 0.3%, 25%, 50% and 75% of it, in one forward and in chunks of 1,024 (``greedy_decode``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.runtime import machine  # noqa: E402
from bench.common import parse_list  # noqa: E402
from eval.common import DTYPES  # noqa: E402
from eval.ruler import evaluate_ruler, task_of  # noqa: E402
from models.load import load_model, load_tokenizer  # noqa: E402
from utils.cli import exit_process  # noqa: E402
from utils.schema import Depth  # noqa: E402


def sweep(model, tok, args, shared: bool) -> dict:
    """One pass of the sweep; wall and CPU seconds of the whole pass (sample building included, the same both ways)."""
    t, c = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        raw = evaluate_ruler(model, tok, [args.task], [args.length], args.depths, args.samples, args.seed,
                             shared_prefix=shared)
    return dict(raw, wall=time.perf_counter() - t, cpu=time.process_time() - c,
                answers=[s["prediction"] for cell in raw["cells"] for s in cell["samples"]])


def costs(model, length: int) -> None:
    """Seconds of one causal prefill of ``length`` tokens, and of the rest after cached prefixes."""
    ids = torch.randint(100, model.config.vocab_size - 100, (1, length), generator=torch.Generator().manual_seed(0))

    def timed(cached: int, chunk: int) -> float:
        cache = DynamicCache(config=model.config)
        if cached:
            model(input_ids=ids[:, :cached], cache=cache, use_cache=True, logits_to_keep=1)
        t = time.perf_counter()
        for a in range(cached, length, chunk):
            model(input_ids=ids[:, a:a + chunk], cache=cache, use_cache=True, logits_to_keep=1)
        return time.perf_counter() - t

    with torch.inference_mode():
        full = timed(0, length)
        print(f"one causal prefill of {length} tokens: {full:.1f} s")
        for share in (24 / length, 0.25, 0.5, 0.75):
            cached = round(share * length)
            one, chunked = timed(cached, length), timed(cached, 1024)
            print(f"after {cached:6d} cached tokens ({share:5.1%}): the rest in one forward {one:6.1f} s "
                  f"({one / full:.2f} of the full prefill), in chunks of 1024 {chunked:6.1f} s ({chunked / full:.2f})",
                  flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="niah_single")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="also write the figures as JSON here")
    ap.add_argument("--costs", action="store_true", help="measure prefill costs after cached prefixes instead")
    args = ap.parse_args()
    args.depths = parse_list(args.depths, Depth, "--depths")
    if not task_of(args.task).has_depth:
        ap.error(f"{args.task} has no depth: a depth sweep needs one of the niah tasks or vt")
    torch.set_num_threads(args.threads)
    model = load_model(args.model, dtype=DTYPES[args.dtype])
    tok = load_tokenizer(args.model)
    with torch.inference_mode():  # first-call allocations and kernel selection, outside the timing
        model(input_ids=torch.tensor([tok("warm up " * 64).input_ids]), use_cache=False)
    if args.costs:
        costs(model, args.length)
        return
    print(f"model {args.model} ({args.dtype}), {args.task} at {args.length}, depths {args.depths} x {args.samples} "
          f"samples, {args.threads} threads, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}",
          flush=True)
    shared = sweep(model, tok, args, True)
    full = sweep(model, tok, args, False)
    same = sum(a == b for a, b in zip(shared["answers"], full["answers"]))
    n = len(full["answers"])
    prefilled = 1 - shared["reused_tokens"] / shared["prompt_tokens"]
    for name, r in (("independent prompts", full), ("shared prefix", shared)):
        print(f"{name:22s} {r['wall']:8.1f} s wall  {r['cpu']:8.1f} s CPU  {r['prompt_tokens']} prompt tokens, "
              f"{r['prompt_tokens'] - r['reused_tokens']} prefilled", flush=True)
    print(f"shared / independent: {shared['wall'] / full['wall']:.2f} of the wall time, "
          f"{shared['cpu'] / full['cpu']:.2f} of the CPU time, {prefilled:.2f} of the prompt tokens prefilled; "
          f"{same}/{n} answers the same; load average at the end {os.getloadavg()[0]:.1f}")
    if args.out:
        record = dict(machine=machine(), settings={k: v for k, v in vars(args).items() if k != "out"},
                      shared=dict(wall=shared["wall"], cpu=shared["cpu"], prefilled_share=prefilled),
                      independent=dict(wall=full["wall"], cpu=full["cpu"]), same_answers=same, prompts=n)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
    exit_process(0)
