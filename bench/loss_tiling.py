"""The LM-head loss over long rows, two ways: ours (``models.loss.chunked_causal_lm_loss``: chunks of positions, each
recomputed in the backward) against DeepSpeed's ``TiledFusedLogitsLoss`` (the same chunks, the backward of each run
inside the forward, so nothing is recomputed but the input's gradient is held from the forward on).

    python bench/loss_tiling.py                          # SmolLM2-135M's head (576 -> 49,152), 8k and 32k positions
    python bench/loss_tiling.py --lengths 16384 --chunk 512 --dtype bf16

Each (way, length) runs in its own process: hidden states ``[1, L, 576]`` that require grad, SmolLM2's LM-head
shape with seeded random weights (speed and memory do not depend on the values), seeded random targets, then loss
+ backward, timed after one untimed warm-up of the same call. Peak RSS is the process's high-water mark during the
timed call above its RSS before it (VmHWM reset first). Both ways' losses and input gradients are compared (they
must agree). Printed: one line per (way, length), then one JSON line (``--out`` also writes it).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import emit_record, reset_peak, status_mib  # noqa: E402
from models.loss import chunked_causal_lm_loss  # noqa: E402
from training.runtime import machine  # noqa: E402
from utils.cli import exit_process  # noqa: E402

HIDDEN, VOCAB = 576, 49_152  # SmolLM2-135M
WAYS = ("ours", "deepspeed")


def inputs(length: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(VOCAB, HIDDEN, generator=g) * HIDDEN**-0.5)
    head.requires_grad_(False)  # frozen under LoRA: only the input's gradient flows back
    hidden = torch.randn(1, length, HIDDEN, generator=g).to(dtype).requires_grad_(True)
    labels = torch.randint(0, VOCAB, (1, length), generator=g)
    return head, hidden, labels


def loss_of(way: str, head, hidden, labels, chunk: int) -> torch.Tensor:
    """Mean NLL of ``labels[:, t + 1]`` given ``hidden[:, t]``, the way ``way`` computes it."""
    if way == "ours":
        total, n = chunked_causal_lm_loss(hidden, head, labels, chunk_size=chunk)
        return total / n
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss

    def nll_sum(module, x, y):
        return F.cross_entropy(module(x).float(), y, reduction="sum")

    x, y = hidden[:, :-1], labels[:, 1:]
    shards = math.ceil(x.shape[1] / chunk)
    return TiledFusedLogitsLoss.apply(nll_sum, head, x, y, None, shards, [], "sum") / y.numel()


def worker(way: str, length: int, chunk: int, dtype: str) -> dict:
    head, hidden, labels = inputs(length, torch.bfloat16 if dtype == "bf16" else torch.float32)
    loss_of(way, head, hidden, labels, chunk).backward()  # warm-up
    hidden.grad = None
    start = reset_peak()
    t0 = time.perf_counter()
    loss = loss_of(way, head, hidden, labels, chunk)
    loss.backward()
    seconds = time.perf_counter() - t0
    return {"way": way, "length": length, "seconds": seconds, "peak_extra_mib": status_mib("VmHWM") - start,
            "loss": loss.item(), "grad_sum": hidden.grad.float().abs().sum().item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="8192,32768")
    ap.add_argument("--chunk", type=int, default=256, help="positions per chunk (train.loss_chunk_size)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.chunk < 1 or min(lengths) < 2:
        raise SystemExit("error: --chunk must be >= 1 and every length >= 2")
    if args.worker:
        print(json.dumps(worker(args.worker, lengths[0], args.chunk, args.dtype)), flush=True)
        return
    info = machine()
    print(f"{info['cpu']} ({info['cores']} cores), torch {info['torch']}, {info['date']}; head {HIDDEN} -> "
          f"{VOCAB:,}, chunk {args.chunk}, {args.dtype}", flush=True)
    rows = []
    for length in lengths:
        for way in WAYS:
            r = subprocess.run([sys.executable, __file__, "--worker", way, "--lengths", str(length), "--chunk",
                                str(args.chunk), "--dtype", args.dtype], capture_output=True, text=True, cwd=ROOT)
            if r.returncode:
                raise SystemExit(f"error: {way} at {length} failed:\n{r.stderr[-2000:]}")
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
            x = rows[-1]
            print(f"  {way:10s} {length:6d}: {x['seconds']:6.2f} s, +{x['peak_extra_mib']:7.1f} MiB, "
                  f"loss {x['loss']:.6f}", flush=True)
        ours, ds = rows[-2], rows[-1]
        agree = abs(ours["loss"] - ds["loss"]) < 1e-4 * abs(ours["loss"]) and \
            abs(ours["grad_sum"] - ds["grad_sum"]) < 1e-3 * abs(ours["grad_sum"])
        print(f"  {length}: deepspeed / ours time {ds['seconds'] / ours['seconds']:.2f}x, memory "
              f"{ds['peak_extra_mib'] / max(ours['peak_extra_mib'], 1e-9):.2f}x; losses and gradients "
              f"{'agree' if agree else 'DIFFER'}", flush=True)
    emit_record({"bench": "loss_tiling", "machine": info, "chunk": args.chunk, "dtype": args.dtype, "rows": rows},
                args.out)


if __name__ == "__main__":
    main()
    exit_process(0)
