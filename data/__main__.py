"""``python -m data pack --model M --seq-len N ...``: build (or reuse) a packed set and print its stats.

An entry point, like ``train.py``: it loads the model's tokenizer (``models.load``), which the ``data`` library
itself never does (it is handed a tokenizer); nothing imports this module.
"""

from __future__ import annotations

import argparse

from data.config import DataConfig, DataError
from data.pack import build_packed, parse_source
from models.load import load_tokenizer
from utils.cli import exit_process, run_cli
from utils.files import write_json
from utils.schema import validate


def pack(args: argparse.Namespace) -> int:
    cfg = validate(DataConfig, dict(
        sources=[parse_source(s) for s in args.source or ["bundled:train"]], seq_len=args.seq_len, mode=args.mode,
        block_cross_doc=args.block_cross_doc, whole_docs=args.whole_docs, pose_target_len=args.pose_target_len,
        pose_chunks=args.pose_chunks, min_doc_tokens=args.min_doc_tokens, passes=args.passes, add_bos=args.add_bos,
        seed=args.seed, cache_dir=args.cache_dir, num_proc=args.num_proc), DataError, "data setting")
    ds = build_packed(cfg, load_tokenizer(args.model))
    print(f"packed set: {ds.path} ({len(ds):,} rows; stats in {ds.path / 'stats.json'})")
    if args.stats_out:
        write_json(args.stats_out, ds.stats, indent=2)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="build (or reuse) a packed set and print its stats")
    p.add_argument("--model", required=True, help="model whose tokenizer to use (smollm2-135m, tiny-llama, a folder)")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--mode", choices=["concat", "reset", "pose"], default="concat")
    p.add_argument("--block-cross-doc", action="store_true", help="reset mode: block attention across documents")
    p.add_argument("--whole-docs", action="store_true", help="reset mode: never cut a document that fits in a row "
                   "(first-fit packing, padded gaps)")
    p.add_argument("--pose-target-len", type=int)
    p.add_argument("--pose-chunks", type=int, default=2)
    p.add_argument("--source", action="append", help="kind[:value][,key=value...]; repeatable (default "
                   "bundled:train)")
    p.add_argument("--min-doc-tokens", type=int, default=0)
    p.add_argument("--passes", type=int, default=1)
    p.add_argument("--add-bos", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir")
    p.add_argument("--num-proc", type=int, default=1)
    p.add_argument("--stats-out", help="also write the stats JSON here")
    args = ap.parse_args(argv)
    return run_cli(lambda _: pack(args))


if __name__ == "__main__":
    exit_process(main())
