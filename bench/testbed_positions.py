"""Loss by position over long windows of the held-out book: how each RoPE method changes the rise past the native
length.

    python bench/testbed_positions.py                                   # testbed base, windows of 4x its native length
    python bench/testbed_positions.py --length 8192 --runs runs/demo/yarn_4x

``eval.perplexity`` reports position buckets of its first window only, which at these sizes is mostly a property of
that stretch of text. Here every non-overlapping ``--length``-token window of the bundled held-out book (Persuasion)
is scored and the NLL of each position is averaged over all windows, then over buckets of ``--bucket`` positions.
Rows: the base without scaling, then each training-free method at s = length / native context, then any fine-tuned
run folders given with ``--runs``. Printed as a markdown table (mean NLL per bucket, and perplexity over the whole
window), with the command, the dtype and the time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.corpus import load_corpus  # noqa: E402
from eval.common import load_eval_model  # noqa: E402
from models.loss import causal_lm_parts, chunked_causal_lm_loss  # noqa: E402
from utils.cli import exit_process  # noqa: E402

METHODS = ("linear", "ntk_aware", "ntk_by_parts", "yarn")


@torch.inference_mode()
def position_nll(model, ids: torch.Tensor, length: int, batch_size: int = 4) -> torch.Tensor:
    """Mean NLL per predicted position [length - 1] over the non-overlapping windows of ``ids`` [n]."""
    decoder, head = causal_lm_parts(model)
    windows = ids[: (ids.numel() // length) * length].view(-1, length)  # [W, length]
    total = torch.zeros(length - 1, dtype=torch.float64)
    for i in range(0, len(windows), batch_size):
        rows = windows[i : i + batch_size]
        hidden = decoder(input_ids=rows, use_cache=False).last_hidden_state
        total += chunked_causal_lm_loss(hidden, head, rows, reduction="none").double().sum(0)
    return total / len(windows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/testbed", help="the base model folder")
    ap.add_argument("--length", type=int, default=None, help="window length in tokens (default: 4x the native length)")
    ap.add_argument("--bucket", type=int, default=None, help="positions per bucket (default: an eighth of the window)")
    ap.add_argument("--runs", nargs="*", default=[], help="fine-tuned run folders to add as rows")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = ap.parse_args(argv)
    base = load_eval_model(args.model, {}, args.dtype)
    native = base.info["original_context"]
    args.length = args.length or 4 * native
    args.bucket = args.bucket or max(1, args.length // 8)
    if not 2 <= args.length or not 1 <= args.bucket < args.length:
        ap.error(f"--length must be at least 2 and --bucket between 1 and the length; got {args.length}, {args.bucket}")
    factor = args.length / native
    text = load_corpus("heldout")[0].text
    ids = torch.tensor(base.tokenizer(text).input_ids)
    variants = [(args.model, {})] + [
        (args.model, dict(method=m, factor=factor, params=None, original_len=None, rebase=False)) for m in METHODS
    ] + [(r, {}) for r in args.runs]
    edges = list(range(0, args.length, args.bucket))
    print(f"`python {' '.join(sys.argv)}`: {ids.numel() // args.length} windows of {args.length} tokens of the "
          f"held-out book, native context {native}, {args.dtype}, {torch.get_num_threads()} thread(s)\n")
    print("| model | " + " | ".join(f"{a + 1}-{min(a + args.bucket, args.length - 1)}" for a in edges)
          + f" | ppl over {args.length} |")
    print("|---|" + "---|" * (len(edges) + 1))
    for spec, variant in variants:
        t0 = time.perf_counter()
        em = base if (spec, variant) == (args.model, {}) else load_eval_model(spec, variant, args.dtype)
        nll = position_nll(em.model, ids, args.length)  # entry t: the prediction of token t + 1
        cells = [float(nll[a : a + args.bucket].mean()) for a in edges]
        ppl = float(torch.exp(nll.mean()))
        print(f"| {em.info['label']} | " + " | ".join(f"{c:.3f}" for c in cells) + f" | {ppl:.1f} |", flush=True)
        print(f"  ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    exit_process(main())
