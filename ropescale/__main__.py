"""``python -m ropescale inspect|plan ...``: see ``ropescale.inspect`` and ``ropescale.plan``. Errors exit with
status 2 and one ``error:`` line.

An entry point, like ``train.py``: it may load models (``models.load``), and nothing imports it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from models.load import load_config
from ropescale import inspect, plan
from ropescale.methods import RopeConfigError
from utils.cli import UserError, run_cli


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    inspect.add_source_arguments(p)
    p.add_argument("--target", type=int, required=True, help="the context length to reach (tokens)")
    p.add_argument("--methods", default=",".join(plan.DEFAULT_METHODS), help="comma-separated (default: %(default)s)")
    p.add_argument("--factors", default=None,
                   help="comma-separated scale factors (default: 1, 1.25, 1.5 and 2 x target / L)")
    p.add_argument("--theory-only", action="store_true",
                   help="the numbers from the config alone (no forward pass)")
    p.add_argument("--no-base-bound", action="store_true",
                   help="skip Men et al.'s base lower bound (a scan of bases; about a minute at 32k)")
    p.add_argument("--out", default=None, help="folder for plan.md, plan.json and the pictures")
    p.add_argument("--json", action="store_true", help="print the whole result as one JSON line last")


def run_plan(a: argparse.Namespace) -> int:
    if not a.theory_only:
        raise UserError("plan: the measured part (training-free scoring at the target length) is not built yet; "
                        "run with --theory-only")
    try:
        factors = tuple(float(x) for x in a.factors.split(",")) if a.factors else None
    except ValueError:
        raise RopeConfigError(f"--factors must be comma-separated numbers (got {a.factors!r})") from None
    methods = tuple(m.strip() for m in a.methods.split(",") if m.strip())
    source, _ = inspect.rope_source(a, load_config)
    result = plan.theory_plan(**source, target=a.target, methods=methods, factors=factors,
                              base_bound=not a.no_base_bound)
    command = "python -m ropescale plan " + shlex.join(sys.argv[2:] if len(sys.argv) > 2 else [])
    print(plan.format_markdown(result, command).split("\n\nHow to read it")[0])
    if a.out:
        print(f"report: {plan.write_report(result, Path(a.out), command) / 'plan.md'}")
    if a.json:
        print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ropescale", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    inspect.add_arguments(sub.add_parser("inspect", help="per-dimension table (and plot) of a RoPE scaling method",
                                         description=inspect.__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter))
    add_plan_arguments(sub.add_parser("plan", help="which method and scale factor for a target length",
                                      description=plan.__doc__,
                                      formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    if args.command == "plan":
        return run_cli(lambda _: run_plan(args))
    return run_cli(lambda _: inspect.run(args, load_config))


if __name__ == "__main__":
    sys.exit(main())
