"""Small helpers shared by the tests that launch real processes (train.py, sweeps, launcher scripts)."""

import json
from pathlib import Path


def losses(run: Path) -> list[float]:
    """The per-step losses a train.py run logged in its metrics.jsonl."""
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
