"""Fault injection for the crash tests: off unless ``ROPESCALE_FAULT=<point>:<n>`` names a point the code reaches.

Points (docs/testing.md): ``checkpoint:N`` SIGKILLs rank 0 in the middle of writing the step-N checkpoint (after
DeepSpeed and every rank wrote their files), ``checkpoint/rename:N`` after its manifest, just before the rename,
``checkpoint/model:N`` / ``checkpoint/optimizer:N`` inside DeepSpeed's save (``training.checkpoint``);
``pack/tokens:0`` SIGKILLs a data cache build once its documents are tokenized into the temporary folder, before
the rename (``data.pack``); ``nan_loss:N`` returns True on every rank at step N (the recipe then turns the loss
into NaN).
"""

from __future__ import annotations

import os
import signal

KILLS = ("checkpoint", "pack")  # points that SIGKILL (rank 0, as launchers set RANK) rather than return True


def fault_point(where: str, n: int = 0) -> bool:
    """True when ``ROPESCALE_FAULT`` is ``where:n``; for a killing point, rank 0 is SIGKILLed instead."""
    if os.environ.get("ROPESCALE_FAULT") != f"{where}:{n}":
        return False
    if where.split("/")[0] in KILLS and os.environ.get("RANK", "0") == "0":
        os.kill(os.getpid(), signal.SIGKILL)
    return True
