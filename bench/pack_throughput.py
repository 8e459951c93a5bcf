"""Tokenize-and-pack throughput (tokens/s) of ``data.pack.build_packed``, with 1 and 2 tokenizer processes.

Each configuration runs in a fresh process with an empty cache, so every run reads, tokenizes, packs and writes.
Two corpora from the bundled train split: ``books`` (its 7 documents; one of them holds 44% of the tokens, and a
document is never split across processes) and ``chapters`` (the same text cut at blank lines into pieces of about
8,000 characters, ~4,000 tokens, so the documents spread evenly over the processes). ``tok-threads`` is the Rust
tokenizer's own thread pool (TOKENIZERS_PARALLELISM), on for one process; datasets' worker processes run it
single-threaded. Wall seconds are the best of ``--repeats`` runs; the CPU seconds of that run (the process and its
workers) show the work done, which a machine shared with other jobs distorts less than wall time.

    python bench/pack_throughput.py --model smollm2-135m --seq-len 8192
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _chapters(folder: Path, target_chars: int = 8000) -> Path:
    """The train split cut at blank lines into pieces of about ``target_chars`` characters, one per .txt file."""
    from data.corpus import load_corpus

    out = folder / "chapters"
    out.mkdir()
    n = 0
    for doc in load_corpus("train"):
        piece = []
        size = 0
        for para in doc.text.split("\n\n"):
            piece.append(para)
            size += len(para) + 2
            if size >= target_chars:
                (out / f"{n:06d}.txt").write_text("\n\n".join(piece))
                n, piece, size = n + 1, [], 0
        if piece:
            (out / f"{n:06d}.txt").write_text("\n\n".join(piece))
            n += 1
    return out


def one(model: str, corpus: str, seq_len: int, num_proc: int) -> dict:
    from data.config import DataConfig, SourceSpec
    from data.pack import build_packed
    from models.load import load_tokenizer

    tok = load_tokenizer(model)
    with tempfile.TemporaryDirectory() as tmp:
        source = (SourceSpec(kind="bundled", split="train") if corpus == "books"
                  else SourceSpec(kind="files", path=str(_chapters(Path(tmp)))))
        cfg = DataConfig(sources=[source], seq_len=seq_len, cache_dir=str(Path(tmp) / "cache"), num_proc=num_proc)
        t, cpu = time.perf_counter(), _cpu_seconds()
        ds = build_packed(cfg, tok)
        seconds, cpu = time.perf_counter() - t, _cpu_seconds() - cpu
    return {"documents": ds.stats["documents"], "tokens": ds.stats["stream_tokens"], "seconds": seconds, "cpu": cpu}


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (datasets' tokenizer workers)."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration; the fastest is reported")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.model, *json.loads(args.one))))
        return
    print(f"tokenizer of {args.model}, seq_len {args.seq_len}; read + tokenize + pack + write, fresh cache, "
          f"{os.cpu_count()} CPUs, best of {args.repeats}; load average before: {os.getloadavg()[0]:.2f}")
    print(f"{'corpus':>9} {'documents':>9} {'processes':>9} {'tok-threads':>11} {'seconds':>8} {'tokens/s':>10} "
          f"{'CPU s':>7}")
    for corpus in ("books", "chapters"):
        for num_proc, threads in ((1, False), (1, True), (2, False)):
            env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM=str(threads).lower())
            cmd = [sys.executable, __file__, "--model", args.model, "--one", json.dumps([corpus, args.seq_len,
                                                                                            num_proc])]
            runs = [json.loads(subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                                              check=True).stdout.strip().splitlines()[-1]) for _ in range(args.repeats)]
            r = min(runs, key=lambda x: x["seconds"])
            print(f"{corpus:>9} {r['documents']:>9,} {num_proc:>9} {'on' if threads else 'off':>11} "
                  f"{r['seconds']:>8.2f} {r['tokens'] / r['seconds']:>10,.0f} {r['cpu']:>7.2f}", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    from utils.cli import exit_process

    main()
    exit_process(0)
