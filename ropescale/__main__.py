"""``python -m ropescale inspect ...``: see ``ropescale.inspect``. Errors exit with status 2 and one ``error:`` line."""

from __future__ import annotations

import argparse
import sys

from ropescale import inspect
from ropescale.methods import RopeConfigError
from ropescale.models import ModelLoadError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ropescale", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    inspect.add_arguments(sub.add_parser("inspect", help="per-dimension table (and plot) of a RoPE scaling method",
                                         description=inspect.__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    try:
        return inspect.run(args)
    except (RopeConfigError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
