"""``python -m ropescale inspect ...``: see ``ropescale.inspect``. Errors exit with status 2 and one ``error:`` line.

An entry point, like ``train.py``: it may load models (``models.load``), and nothing imports it.
"""

from __future__ import annotations

import argparse
import sys

from models.load import load_config
from ropescale import inspect
from utils.cli import run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ropescale", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    inspect.add_arguments(sub.add_parser("inspect", help="per-dimension table (and plot) of a RoPE scaling method",
                                         description=inspect.__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    return run_cli(lambda _: inspect.run(args, load_config))


if __name__ == "__main__":
    sys.exit(main())
