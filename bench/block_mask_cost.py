"""Cost of blocking attention across packed documents on CPU (sdpa), vs plain causal attention.

For each length, one row of ``--docs`` equal documents runs forward + backward through a tiny preset model in three
ways, each in a fresh process (so peak RSS is its own):

- ``causal``: concat positions, plain causal attention (sdpa ``is_causal``, no mask tensor);
- ``reset``: positions restart per document, attention not blocked (all-ones mask: also plain causal);
- ``blocked``: positions restart, attention blocked (transformers builds a [L, L] block-diagonal mask from the
  position ids, which sdpa then applies with its masked kernel).

Prints the best of ``--repeats`` forward+backward passes (after one warm-up), wall and CPU seconds, and peak RSS. On a
machine shared with other jobs, compare CPU seconds with ``--threads 1``: wall time then mostly measures the others.

    python bench/block_mask_cost.py --lengths 2048 4096 8192 16384 --docs 8 --threads 1
"""

from __future__ import annotations

import argparse
import json
import resource
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one(model_name: str, length: int, docs: int, way: str, repeats: int, threads: int) -> dict:
    import numpy as np
    import torch

    from data.loader import forward_kwargs
    from data.pack import row_labels_positions
    from models.load import load_model

    torch.set_num_threads(threads)
    model = load_model(model_name).train()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256, size=(1, length)).astype(np.int32)
    starts = np.zeros((1, length), bool)
    starts[0, :: length // docs] = True
    labels, pos = row_labels_positions(ids, starts, "concat" if way == "causal" else "reset")
    batch = {"input_ids": torch.from_numpy(ids.astype(np.int64)),
             "position_ids": torch.from_numpy(pos.astype(np.int64))}
    kwargs = forward_kwargs(batch, block_cross_doc=way == "blocked")
    times, cpu = [], []
    for _ in range(repeats + 1):  # the first pass warms up
        model.zero_grad(set_to_none=True)
        t, c = time.perf_counter(), time.process_time()
        model(**kwargs).logits.float().mean().backward()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return {"length": length, "way": way, "seconds": min(times[1:]), "cpu_seconds": min(cpu[1:]),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--docs", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.model, *json.loads(args.one), args.repeats, args.threads)))
        return
    print(f"model {args.model}, {args.docs} documents per row, forward+backward, {args.threads} threads, "
          f"best of {args.repeats}; load average before: {os.getloadavg()[0]:.2f}")
    print(f"{'length':>7} {'way':>8} {'seconds':>8} {'CPU s':>8} {'x causal (CPU)':>14} {'peak RSS GiB':>12}")
    for length in args.lengths:
        base = None
        for way in ("causal", "reset", "blocked"):
            cmd = [sys.executable, __file__, "--model", args.model, "--repeats", str(args.repeats), "--threads",
                   str(args.threads), "--one", json.dumps([length, args.docs, way])]
            out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            base = base or r["cpu_seconds"]
            print(f"{length:>7} {way:>8} {r['seconds']:>8.3f} {r['cpu_seconds']:>8.3f} "
                  f"{r['cpu_seconds'] / base:>14.2f} {r['peak_rss_gib']:>12.2f}", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    from utils.cli import exit_process

    main()
    exit_process(0)
