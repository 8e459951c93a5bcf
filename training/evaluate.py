"""The in-run evaluation: every task of the run config's ``eval:`` section on the merged model (eval/registry.py)."""

from __future__ import annotations

from pathlib import Path

from configs.schema import RunConfig
from eval.common import load_eval_model
from eval.registry import configured


def evaluate_run(cfg: RunConfig, run: Path) -> tuple[dict[str, float | int | None], list[Path]]:
    """Load ``run``'s merged model once and run each configured task on it; each task's files go to
    ``<run>/eval/<model slug>/`` where eval.compare and sweeps read them. Returns the run's summary metrics, each
    task's ``summary`` as ``eval/<metric>`` (the metric names the task defines), for
    W&B and ``<run>/eval/summary.json``, and the files the tasks wrote (their ``files`` patterns)."""
    tasks = configured(cfg.eval)
    if not tasks:
        return {}, []
    em = load_eval_model(str(run), {})
    folder = run / "eval" / em.info["slug"]
    summary: dict[str, float | int | None] = {}
    files: list[Path] = []
    for task, settings in tasks:
        result = task.run(em, settings)
        task.write(result, folder)
        summary.update({f"eval/{k}": v for k, v in task.summary(result).items()})
        files += [p for pattern in task.files for p in sorted(folder.glob(pattern))]
    return summary, files
