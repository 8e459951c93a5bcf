"""``python -m launch.memory``: the per-GPU memory plan of a run config, for any world size and GPU size, without
starting anything (the plan itself: ``training.memory``; ``train.py --dry-run`` prints the same for its launch).

    python -m launch.memory --config configs/ntk_parts_32k.yaml --world-size 8 [--gpu-mem-gib 80] [--set k=v ...]
"""

from __future__ import annotations

import argparse

from configs.schema import load_run_config
from training.memory import dry_run_text, format_plan, plan_memory
from utils.cli import exit_process, run_cli


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="YAML run config (see configs/)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    ap.add_argument("--world-size", type=int, default=1, help="GPUs in the run (all nodes)")
    ap.add_argument("--gpu-mem-gib", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    ap.add_argument("--show-config", action="store_true", help="print the resolved config before the plan")
    args = ap.parse_args(argv)

    def plan(_) -> None:
        cfg = load_run_config(args.config, args.set)
        if args.show_config:
            print(dry_run_text(cfg, args.world_size, args.gpu_mem_gib))
        else:
            print(format_plan(plan_memory(cfg, args.world_size, args.gpu_mem_gib)))

    return run_cli(plan)


if __name__ == "__main__":
    exit_process(main())
