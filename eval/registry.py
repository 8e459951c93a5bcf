"""The evaluation tasks, one line each: the run config's ``eval:`` section, the in-run evaluation, sweeps and
``eval.compare`` loop over ``EVAL_TASKS`` and nothing else (``eval.task`` says what a record holds).

Adding a task: a module in ``eval/`` that defines ``EVAL_TASK`` (``eval.task.EvalTask``) and runs ``task_main``
as its command, and its name in ``TASK_MODULES``. The order here is the order of the table's columns.
"""

from __future__ import annotations

import importlib

from eval.task import EvalTask

TASK_MODULES = (
    "eval.perplexity",
    "eval.passkey",
    "eval.ruler",
)

EVAL_TASKS: dict[str, EvalTask] = {
    task.name: task for task in (importlib.import_module(m).EVAL_TASK for m in TASK_MODULES)
}


def configured(section) -> list[tuple[EvalTask, object]]:
    """(task, its settings) of each task an ``eval:`` config section (None: no evaluation) asks for, in registry
    order."""
    if section is None:
        return []
    return [(task, getattr(section, name)) for name, task in EVAL_TASKS.items() if getattr(section, name) is not None]
