"""How well a cheaper objective ranks tune's candidates: fewer windows against the full objective.

    python bench/tune_windows.py                                            # the committed testbed base at 4x
    python bench/tune_windows.py --model smollm2-135m --target 16384 --windows 1,2 --full 4 --candidates 8

``python -m ropescale tune`` scores every candidate on ``--windows`` windows of the target length; the fewer, the more
candidates a budget buys, and the noisier each score. This scores a fixed set of per-pair candidates (PI's,
NTK-aware's and YaRN's tables and mutations of them, seed 0, as the search's first generation makes them) with each
of ``--windows`` windows and with ``--full`` windows, on the same search stretch of the held-out text, and prints the
Spearman rank correlation of each cheap ranking with the full one, whether both pick the same best, and the
seconds per candidate. Printed as a markdown table with the command.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eval.perplexity import load_texts  # noqa: E402
from eval.tune import Objective  # noqa: E402
from models.load import load_config  # noqa: E402
from ropescale.apply import head_dim_of, partial_rotary_factor_of, rope_of  # noqa: E402
from ropescale.search import PairSpace  # noqa: E402
from utils.cli import exit_process  # noqa: E402


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation of two equally long score lists (no ties expected in float losses)."""
    def ranks(x):
        order = sorted(range(len(x)), key=x.__getitem__)
        r = [0] * len(x)
        for k, i in enumerate(order):
            r[i] = k
        return r
    ra, rb, n = ranks(a), ranks(b), len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb)) / (n * (n * n - 1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/testbed")
    ap.add_argument("--target", type=int, default=None, help="default: 4x the model's native length")
    ap.add_argument("--windows", default="1,2", help="the cheap objectives' window counts (comma-separated)")
    ap.add_argument("--full", type=int, default=8, help="windows of the full objective (default 8)")
    ap.add_argument("--candidates", type=int, default=12, help="candidates scored (default 12; at least 3)")
    a = ap.parse_args(argv)
    try:
        cheap = sorted({int(x) for x in a.windows.split(",")})
    except ValueError:
        ap.error(f"--windows must be comma-separated integers (got {a.windows!r})")
    if not cheap or min(cheap) < 1 or max(cheap) >= a.full or not 3 <= a.candidates <= 1000:
        ap.error("--windows must be >= 1 and below --full, and --candidates from 3 to 1000")
    config = load_config(a.model)
    L = int(rope_of(config)["original_max_position_embeddings"])
    target = a.target or 4 * L
    space = PairSpace(head_dim_of(config), float(config.rope_parameters["rope_theta"]), L, target / L,
                      partial_rotary_factor=partial_rotary_factor_of(config))
    rng = random.Random(0)
    cands = space.seeds()
    while len(cands) < a.candidates:
        cands.append(space.mutate(rng.choice(cands[:3]), rng))
    texts, desc = load_texts(["bundled"])
    objective = Objective(a.model, texts, target, L, "ppl", windows=a.full, report_windows=1)
    t0 = time.perf_counter()
    full = [objective(c)["target_nll"] for c in cands]
    per_full = (time.perf_counter() - t0) / len(cands)
    print(f"\n`python bench/tune_windows.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n")
    print(f"{a.model}, L = {L:,} -> {target:,}; {len(cands)} per-pair candidates; {desc}, search stretch\n")
    print("| windows | Spearman vs full | same best | seconds per candidate |\n|---|---|---|---|")
    for w in cheap:
        objective.windows = w  # the first w windows of the same stretch
        t0 = time.perf_counter()
        got = [objective(c)["target_nll"] for c in cands]
        sec = (time.perf_counter() - t0) / len(cands)
        same = min(range(len(cands)), key=got.__getitem__) == min(range(len(cands)), key=full.__getitem__)
        print(f"| {w} | {spearman(got, full):.3f} | {'yes' if same else 'no'} | {sec:.1f} |")
    print(f"| {a.full} (full) | 1 | yes | {per_full:.1f} |")
    return 0


if __name__ == "__main__":
    exit_process(main())
