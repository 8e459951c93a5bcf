"""The one way a command prints its progress: ``Log("sweep")("start ...")`` prints ``[sweep 12s] start ...``.

Every line carries its source (the tag) and the seconds since the process imported this module (near enough its
start), so that lines of several processes or threads interleaved in one log still say who and when. Options:

- ``err=True``: to stderr, for commands whose stdout ends with a ``--json`` result line (eval, plan);
- ``rank0=True``: only the process of global rank 0 prints (launchers set ``RANK``), for code that runs on every
  rank of a distributed job.

Lines are written whole under a lock, so that threads printing at once (the demo's parallel jobs) never mix
halves of two lines.
"""

from __future__ import annotations

import os
import sys
import threading
import time

START = time.monotonic()
_LOCK = threading.Lock()


def rank() -> int:
    """This process's global rank (0 before a process group starts, as launchers set RANK)."""
    return int(os.environ.get("RANK", "0"))


class Log:
    """A progress printer for one source: call it with a message (one line)."""

    def __init__(self, tag: str, *, err: bool = False, rank0: bool = False) -> None:
        self.tag, self.err, self.rank0 = tag, err, rank0

    def line(self, msg: str) -> str:
        """``msg`` as this printer writes it (for a writer of its own, such as a progress bar's)."""
        return f"[{self.tag} {time.monotonic() - START:.0f}s] {msg}"

    def __call__(self, msg: str) -> None:
        if self.rank0 and rank() != 0:
            return
        stream = sys.stderr if self.err else sys.stdout
        with _LOCK:
            print(self.line(msg), file=stream, flush=True)
