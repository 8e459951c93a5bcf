"""How far a model's look-up reaches: teacher-forced digit accuracy of a copied number across k filler groups.

    python bench/lookup_distance.py                                     # the committed testbed base
    python bench/lookup_distance.py --models models/testbed runs/demo/yarn_4x --fillers 0,4,16,66 --docs 40
    python bench/lookup_distance.py --shuffle                           # filler sentences drawn at random

A passkey answer is one look-up: find the key's digits earlier in the prompt and copy them. Passkey accuracy mixes
that look-up with the prompt's cues; this isolates it. Each document is data/synthetic.py's ``copy`` document with
``--numbers`` five-digit numbers and exactly k of the passkey prompt's filler groups (about 29.5 testbed tokens each)
between the list and its repeat, ``Numbers: 47526. <filler> Again: 47526.``; the score is the share of the repeat's
digits that the model's argmax predicts, given the true text before each (chance is about 10%). Digits occur nowhere
in the filler, so a look-up by content has no distractor: a score that falls with k says the look-up leans on
distance. Documents are seed 9 of the generator, which no committed config trains on (they use seeds 0 and 1).
The filler is the prompt's repeated group, so every distance lies on the group's lattice, as in the passkey
evaluation; ``--shuffle`` draws it sentence by sentence instead (off the lattice, as the shuffled builds of
docs/testbed.md train): a look-up by position scores differently on the two, one by content the same.
``--words N`` scores a look-up by content instead: data/synthetic.py's ``repeat`` documents, N words drawn from the
train split's vocabulary, ``Words: w1 ... wN. <filler> Again: w1 ... wN.``; the score is the share of the repeat's
tokens after its first that the argmax predicts. The words are drawn at random, so a token follows its predecessor
only in the list above: an induction head (Olsson et al. 2022: find the earlier copy of the current token, predict
what followed it) scores near 100%, a model without one near the floor that word pieces and the closing full stop
give (10-20% on the models of docs/testbed.md), whereas on ten digit tokens a head that copies by distance scores too.
Printed as a markdown table, one row per model, with the command and the mean token length of each column's documents.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.synthetic import copy_sample, repeat_sample  # noqa: E402
from eval.common import load_eval_model  # noqa: E402
from utils.cli import exit_process  # noqa: E402

SEED = 9  # a copy stream no config trains on


@torch.inference_mode()
def lookup_accuracy(model, tokenizer, numbers: int, filler: int, docs: int, shuffle: int = 0,
                    words: int = 0) -> tuple[float, float]:
    """(share of the repeat's look-ups predicted, mean document length in tokens) over ``docs`` documents: its digits
    (``copy`` documents of ``numbers`` numbers) or, with ``words``, its tokens after the first (``repeat`` documents
    of ``words`` words); ``shuffle`` 1 draws the filler sentence by sentence (data/synthetic.py), so the distances
    leave the filler group's lattice."""
    right = total = length = 0
    for i in range(docs):
        if words:
            text = repeat_sample(i, words, words, SEED, min_filler=filler, max_filler=filler, shuffle=shuffle)
        else:
            text = copy_sample(i, numbers, SEED, min_filler=filler, max_filler=filler, shuffle=shuffle)
        ids = tokenizer(text).input_ids
        start = len(tokenizer(text[: text.rindex("Again:") + len("Again:")]).input_ids)  # the repeat starts here
        pred = model(torch.tensor([ids])).logits[0].argmax(-1)  # [len(ids)]: pred[t] is the guess for ids[t + 1]
        for t in range(start + 1 if words else start, len(ids)):
            if words or tokenizer.decode([ids[t]]).strip().isdigit():
                right += int(pred[t - 1] == ids[t])
                total += 1
        length += len(ids)
    return right / total, length / docs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["models/testbed"], help="model folders, run folders or names")
    ap.add_argument("--fillers", default="0,4,8,16,32,66", help="filler groups between the list and its repeat")
    ap.add_argument("--numbers", type=int, default=1, help="five-digit numbers in each list (1-12)")
    ap.add_argument("--docs", type=int, default=40, help="documents per cell")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--words", type=int, default=0,
                    help="score repeated lists of this many train-split words (a look-up by content) instead of digits")
    ap.add_argument("--shuffle", action="store_true",
                    help="filler sentences drawn at random (off the filler group's lattice), as shuffled builds train")
    args = ap.parse_args(argv)
    try:
        fillers = [int(k) for k in args.fillers.split(",")]
    except ValueError:
        ap.error(f"--fillers takes comma-separated integers, got {args.fillers!r}")
    if (any(k < 0 or k > 10_000 for k in fillers) or not 1 <= args.numbers <= 12 or not 1 <= args.docs <= 10_000
            or not 0 <= args.words <= 2_000):
        ap.error("--fillers must be 0-10000 groups, --numbers 1-12, --words 0-2000 and --docs 1-10000")
    what = f"{args.words} words per list" if args.words else f"{args.numbers} number(s) per list"
    print(f"`python {' '.join(sys.argv)}`: {args.docs} documents per cell, {what}, "
          f"{'filler drawn sentence by sentence, ' if args.shuffle else ''}{args.dtype}, "
          f"{torch.get_num_threads()} thread(s)\n")
    lengths: list[float] = []
    rows = []
    for spec in args.models:
        t0 = time.perf_counter()
        em = load_eval_model(spec, {}, args.dtype)
        cells = [lookup_accuracy(em.model, em.tokenizer, args.numbers, k, args.docs, int(args.shuffle), args.words)
                 for k in fillers]
        lengths = [n for _, n in cells]
        rows.append(f"| {spec} | " + " | ".join(f"{acc:.0%}" for acc, _ in cells) + " |")
        print(f"  {spec}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    print("| model | " + " | ".join(f"k={k} (~{n:.0f} tokens)" for k, n in zip(fillers, lengths)) + " |")
    print("|---|" + "---|" * len(fillers))
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    exit_process(main())
