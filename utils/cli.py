"""What every command shares: bad input is one ``error: ...`` line and exit status 2, never a traceback.

Each package's error for bad input (``ConfigError``, ``DataError``, ``ModelLoadError``, ``RopeConfigError``,
``EvalError``, ``TrainError``, ...) derives from ``UserError``; ``run_cli`` is the one place that prints them.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable


class UserError(ValueError):
    """Input that cannot be used (a config, a path, a model, a method); the message is one line naming the problem
    and the fix."""


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> int:
    """Run a command's ``main(argv)``: a UserError becomes one ``error: ...`` line on stderr and exit status 2; an
    int returned by ``main`` is its exit status, anything else means 0."""
    try:
        status = main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return status if isinstance(status, int) and not isinstance(status, bool) else 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
