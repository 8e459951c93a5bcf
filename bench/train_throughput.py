"""Training speed and memory: our training step against transformers Trainer + peft, same model, data and LoRA.

    python bench/train_throughput.py                                  # SmolLM2-135M at 2k, 4k, 8k; all five paths
    python bench/train_throughput.py --lengths 2048,4096,8192,16384   # with 16k (about twice as long)
    python bench/train_throughput.py --model testbed                  # the testbed architecture at 1k, 2k, 4k
    python bench/train_throughput.py --paths ours,trainer --lengths 2048 --out runs/bench/train.json

Paths (bench/train_paths.py says exactly what each runs): ``ours-fp32`` and ``ours`` (our default precision, auto:
bf16 on CPUs with bf16 matrix units and on GPUs), one process each; ``ours-zero2x2``, the default with DeepSpeed
ZeRO-2 over two processes (threads split between them); ``trainer`` (its default fp32) and ``trainer-bf16``
(``bf16=True``), both with activation checkpointing and the model's own full-logits loss.

Each path runs in its own process: the model is loaded once, a warm-up step at ``--warmup-len`` tokens, then one
timed optimizer step per length in ascending order. tokens/s = tokens trained in the step / its wall time (both
ranks' rows for two processes); peak RSS = the process's RSS high-water mark during the step (VmHWM reset before
it; summed over the two processes, each also shown); MFU = model FLOPs/s (bench/train_paths.flops_per_token) / the
fp32 or bf16 matrix-multiply rate measured here first with the same number of threads. Printed last: the table, the
ratios ours / Trainer at equal precision and default against default, the targets, then one JSON line (``--out``
also writes it to a file).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import emit_record  # noqa: E402
from training.runtime import machine  # noqa: E402
from utils.cli import exit_process  # noqa: E402
from bench.train_paths import (MODELS, VARIANTS, check_choice, flops_per_token, launch,  # noqa: E402
                             parse_lengths)

DEFAULT_PATHS = "ours-fp32,ours,ours-zero2x2,trainer,trainer-bf16"
# A square matmul and SmolLM2's MLP up-projection over 4k tokens: the best of them is the machine's rate.
MATMUL_SHAPES = "2048x2048x2048,4096x576x1536"


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """``MxKxN,...`` -> [(M, K, N), ...]; each size 1..65536."""
    try:
        shapes = [tuple(int(x) for x in part.lower().split("x")) for part in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 3 or not all(1 <= x <= 65536 for x in s) for s in shapes):
        raise SystemExit(f"error: --matmul-shapes {text!r}: expected MxKxN[,MxKxN...] with sizes 1-65536, "
                         f"e.g. {MATMUL_SHAPES}")
    return shapes


def matmul_tflops(dtype: torch.dtype, device: torch.device, shapes: list[tuple[int, int, int]],
                  repeats: int = 3) -> dict:
    """torch.mm rate in TFLOP/s per shape (best of ``repeats`` after a warm-up) and the best over shapes."""
    rates = {}
    for m, k, n in shapes:
        a = torch.randn(m, k, dtype=dtype, device=device)
        b = torch.randn(k, n, dtype=dtype, device=device)
        best = float("inf")
        for i in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            torch.mm(a, b)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:  # the first call is the warm-up
                best = min(best, time.perf_counter() - t)
        rates[f"{m}x{k}x{n}"] = round(2 * m * k * n / best / 1e12, 4)
    return {"best": max(rates.values()), "shapes": rates}


def rows_of(result: dict, model: str, rates: dict, mem_key: str) -> list[dict]:
    """One row per timed step (the warm-up step is left out), with tokens/s, peak memory and MFU."""
    v = VARIANTS[result["variant"]]
    rows = []
    for s in result["steps"][1:]:
        per_token = flops_per_token(result, s["seq_len"])
        rows.append({
            "model": model, "variant": result["variant"], "label": v.label, "precision": result["precision"],
            "procs": result["world"], "threads_per_proc": result["threads"], "seq_len": s["seq_len"],
            "tokens": s["tokens"],
            "seconds": round(s["seconds"], 3), "tokens_per_s": round(s["tokens"] / s["seconds"], 2),
            "peak_rss_gib": round(s["peak_rss_mib"] / 1024, 3),
            "peak_rss_gib_per_proc": ([round(x / 1024, 3) for x in s["peak_rss_mib_per_proc"]]
                                      if result["world"] > 1 else None),
            "peak_dev_gib": None if s["peak_dev_mib"] is None else round(s["peak_dev_mib"] / 1024, 3),
            "start_rss_gib": round(s["start_rss_mib"] / 1024, 3),
            "load_peak_rss_gib": round(result["load_peak_rss_mib"] / 1024, 3),
            "model_flops_per_token": per_token,
            "mfu": round(per_token * s["tokens"] / s["seconds"] / (rates[result["precision"]]["best"] * 1e12), 4),
            "loss": round(s["loss"], 4),
        })
    for r in rows:
        r["peak_gib"] = r[mem_key]
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    """ours / Trainer per model and length: at equal precision (one process each), and default against default."""
    def find(model, variants, precision=None):
        for name in variants:
            for r in rows:
                if r["model"] == model and r["variant"] == name and precision in (None, r["precision"]):
                    yield r

    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        pairs = []
        for p in ("fp32", "bf16"):
            ours = {r["seq_len"]: r for r in find(model, ("ours-fp32", "ours", "ours-bf16"), p)}
            base = {r["seq_len"]: r for r in find(model, ("trainer", "trainer-bf16"), p)}
            pairs.append((f"equal precision: {p} = {p}", ours, base))
        base = {r["seq_len"]: r for r in find(model, ("trainer",))}
        for name in ("ours", "ours-zero2x2"):
            pairs.append((f"default: {name} vs trainer", {r["seq_len"]: r for r in find(model, (name,))}, base))
        for what, ours, base in pairs:
            for n in sorted(ours.keys() & base.keys()):
                o, b = ours[n], base[n]
                out.append({"model": model, "comparison": what, "seq_len": n, "ours": o["variant"],
                            "baseline": b["variant"], "ours_tokens_per_s": o["tokens_per_s"],
                            "baseline_tokens_per_s": b["tokens_per_s"],
                            "speed_ratio": round(o["tokens_per_s"] / b["tokens_per_s"], 3),
                            "ours_peak_gib": o["peak_gib"], "baseline_peak_gib": b["peak_gib"],
                            "memory_ratio": round(o["peak_gib"] / b["peak_gib"], 3)})
    return out


def print_report(rows: list[dict], rats: list[dict], mem: str) -> None:
    print(f"\n{'model':13s} {'path':31s} {'prec':4s} {'procs':>5s} {'seq_len':>7s} {'step s':>8s} "
          f"{'tokens/s':>9s} {mem:>13s} {'MFU':>6s} {'loss':>7s}")
    for r in rows:
        per = f" ({' + '.join(f'{x:.2f}' for x in r['peak_rss_gib_per_proc'])})" if r["procs"] > 1 else ""
        print(f"{r['model']:13s} {r['label']:31s} {r['precision']:4s} {r['procs']:>3d}x{r['threads_per_proc']:<1d} "
              f"{r['seq_len']:7d} {r['seconds']:8.2f} {r['tokens_per_s']:9.1f} {r['peak_gib']:13.2f} "
              f"{r['mfu']:6.1%} {r['loss']:7.3f}{per}")
    print(f"\n{'model':13s} {'ours / Trainer':36s} {'seq_len':>7s} {'tok/s ours':>10s} {'Trainer':>8s} "
          f"{'speed':>6s} {'GiB ours':>8s} {'Trainer':>8s} {'memory':>6s}")
    for r in rats:
        print(f"{r['model']:13s} {r['comparison']:36s} {r['seq_len']:7d} {r['ours_tokens_per_s']:10.1f} "
              f"{r['baseline_tokens_per_s']:8.1f} {r['speed_ratio']:5.2f}x {r['ours_peak_gib']:8.2f} "
              f"{r['baseline_peak_gib']:8.2f} {r['memory_ratio']:5.2f}x")
    print("\ntargets (issue #9): equal precision at 4k and 8k: speed >= 1.0x and memory <= 0.5x; default vs "
          "default: speed >= 3x")
    for r in rats:
        if r["comparison"].startswith("equal") and r["seq_len"] in (4096, 8192):
            ok = r["speed_ratio"] >= 1.0 and r["memory_ratio"] <= 0.5
            print(f"  {'met    ' if ok else 'NOT met'} {r['model']} {r['comparison']} {r['seq_len']}: "
                  f"{r['speed_ratio']:.2f}x speed, {r['memory_ratio']:.2f}x memory")
        elif r["comparison"].startswith("default") and r["ours"] == "ours":
            print(f"  {'met    ' if r['speed_ratio'] >= 3 else 'NOT met'} {r['model']} default vs default "
                  f"{r['seq_len']}: {r['speed_ratio']:.2f}x speed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help=f"comma-separated: {', '.join(MODELS)}")
    ap.add_argument("--lengths", default=None, help="comma-separated seq_lens (default: the model's, see MODELS)")
    ap.add_argument("--paths", default=DEFAULT_PATHS, help=f"comma-separated: {', '.join(VARIANTS)}")
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="threads in all (a two-process path gives each process half)")
    ap.add_argument("--warmup-len", type=int, default=256, help="tokens of the untimed first step")
    ap.add_argument("--out", default=None, help="also write the final JSON to this file")
    ap.add_argument("--matmul-shapes", default=MATMUL_SHAPES,
                    help="the shapes of the matmul rate probe (a CPU without bf16 units emulates bf16 at about "
                         "1/150 of its fp32 rate: there the default shapes take over a minute)")
    args = ap.parse_args()
    shapes = parse_shapes(args.matmul_shapes)
    models = check_choice(args.model, MODELS, "--model")
    paths = check_choice(args.paths, VARIANTS, "--paths")
    lengths = sorted(parse_lengths(args.lengths)) if args.lengths else None
    if args.threads < 1 or args.warmup_len < 2:
        raise SystemExit("error: --threads must be >= 1 and --warmup-len >= 2")
    if torch.cuda.is_available() and torch.cuda.device_count() < 2 and "ours-zero2x2" in paths:
        print("ours-zero2x2 needs 2 GPUs; left out")
        paths.remove("ours-zero2x2")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mem = "peak_dev_gib" if device.type == "cuda" else "peak_rss_gib"
    info = machine()
    torch.set_num_threads(args.threads)
    rates = {name: matmul_tflops(dtype, device, shapes) for name, dtype in (("fp32", torch.float32),
                                                                             ("bf16", torch.bfloat16))}
    print(f"{info['cpu']} ({info['cores']} cores{', ' + info['gpu'] if info['gpu'] else ''}), torch {info['torch']}, "
          f"transformers {info['transformers']}, {info['date']}, load average {info['load_average']}, "
          f"{args.threads} threads")
    print(f"matmul rate ({args.threads} threads): fp32 {rates['fp32']['best']:.3f} TFLOP/s, "
          f"bf16 {rates['bf16']['best']:.3f} TFLOP/s (best of {', '.join(rates['fp32']['shapes'])})", flush=True)

    rows, warmups = [], []
    for model in models:
        model_lengths = lengths or list(MODELS[model].lengths)
        print(f"\n{model}: {MODELS[model].note}; seq_len {', '.join(map(str, model_lengths))}", flush=True)
        for name in paths:
            t = time.perf_counter()
            result, _ = launch(name, model, model_lengths, min(args.warmup_len, model_lengths[0]), args.threads)
            new = rows_of(result, model, rates, mem)
            rows += new
            # The warm-up step's loss comes before any update: equal across paths at equal precision (same model,
            # same tokens), a check that they train the same thing.
            w = result["steps"][0]
            warmups.append({"model": model, "variant": name, "seq_len": w["seq_len"],
                            "seconds": round(w["seconds"], 3), "loss": w["loss"]})
            print(f"  {VARIANTS[name].label} ({result['precision']}, {time.perf_counter() - t:.0f} s in all): "
                  + ", ".join(f"{r['seq_len']} {r['tokens_per_s']:.1f} tok/s {r['peak_gib']:.2f} GiB"
                              for r in new), flush=True)

    rats = ratios(rows)
    print_report(rows, rats, "peak GPU GiB" if device.type == "cuda" else "peak RSS GiB")
    record = {"bench": "train_throughput", "machine": info, "threads": args.threads, "warmup_len": args.warmup_len,
              "load_average_end": round(os.getloadavg()[0], 2), "matmul_tflops": rates, "results": rows,
              "ratios": rats, "warmup": warmups}
    emit_record(record, args.out)


if __name__ == "__main__":
    main()
    exit_process(0)
