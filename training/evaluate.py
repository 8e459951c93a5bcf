"""The in-run evaluation: every task of the run config's ``eval:`` section on the merged model (eval/registry.py)."""

from __future__ import annotations

from pathlib import Path

from configs.schema import RunConfig
from eval.common import load_eval_model
from eval.registry import configured
from ropescale.methods import ROPE_METHODS


def evaluate_run(cfg: RunConfig, run: Path) -> tuple[dict[str, float | int | None], list[Path]]:
    """Load ``run``'s merged model and run each configured task on it (one load for all, unless its RoPE table
    depends on the length); each task's files go to ``<run>/eval/<model slug>/`` where eval.compare and sweeps read
    them. Returns the run's summary metrics, each task's ``summary`` as ``eval/<metric>`` (the metric names the task
    defines), for W&B and ``<run>/eval/summary.json``, and the files the tasks wrote (their ``files`` patterns)."""
    summary: dict[str, float | int | None] = {}
    files: list[Path] = []
    em = None
    for task, settings in configured(cfg.eval):
        # A RoPE table that depends on the sequence length (dynamic NTK, dynamic YaRN) keeps the largest one the model
        # has seen (transformers' dynamic update): each task then gets a fresh model, as its own command would.
        if em is None or ROPE_METHODS[em.info["method"]].length_dependent:
            em = load_eval_model(str(run), {})
        folder = run / "eval" / em.info["slug"]
        result = task.run(em, settings)
        task.write(result, folder)
        summary.update({f"eval/{k}": v for k, v in task.summary(result).items()})
        files += [p for pattern in task.files for p in sorted(folder.glob(pattern))]
    return summary, files
