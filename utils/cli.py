"""What every command shares: bad input is one ``error: ...`` line and exit status 2, never a traceback.

Each package's error for bad input (``ConfigError``, ``DataError``, ``ModelLoadError``, ``RopeConfigError``,
``EvalError``, ``TrainError``, ...) derives from ``UserError``; ``run_cli`` is the one place that prints them.
"""

from __future__ import annotations

import gc
import socket
import sys
import unicodedata
from collections.abc import Callable
from typing import NoReturn


class UserError(ValueError):
    """Input that cannot be used (a config, a path, a model, a method); the message is one line naming the problem
    and the fix.

    Messages quote what the user wrote (a YAML key, a path, a method name), which may hold a newline or another
    control character; those are shown escaped (``'\\n'``), here, once for every error, so that no input can turn
    the message into two lines (found by the config fuzz test: an unknown ``rope.params`` key ``"\\n"``).
    """

    def __init__(self, message: object = "") -> None:
        super().__init__("".join(repr(c)[1:-1] if unicodedata.category(c) in ("Cc", "Zl", "Zp") else c
                                 for c in str(message)))


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> int:
    """Run a command's ``main(argv)``: a UserError becomes one ``error: ...`` line on stderr and exit status 2; an
    int returned by ``main`` is its exit status, anything else means 0."""
    try:
        status = main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return status if isinstance(status, int) and not isinstance(status, bool) else 0


def exit_process(status: object = 0) -> NoReturn:
    """End a command's process with ``status`` (as ``sys.exit``), every entry point's last call.

    The objects alive at this point (about 350,000 from importing torch, transformers and DeepSpeed, plus the run's
    own) are frozen first: the interpreter's final garbage collection would otherwise walk all of them, 1.5-2 s at
    every exit on a 2-core CPU (measured with train.py on configs/cpu_tiny.yaml: 2.0 s from the last line to the
    exit, 0.25 s frozen), for memory the operating system takes back anyway. Exit handlers (W&B, DeepSpeed) still
    run.
    """
    gc.freeze()
    sys.exit(status)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
