"""One table and one picture per task over many evaluations: which method and factor, with or without fine-tuning,
works best.

    python -m eval.compare runs/eval/*/ runs/yarn-s4 [--out runs/compare] [--wandb]

Each argument is a result file (``<task>.json`` of a task in eval/registry.py), a result folder holding them, a run
folder (results in its ``eval/``), or a folder of such folders. Results of one model (same model, method, factor,
fine-tuned or not) form one row: the model, then for each task its descriptive columns and summary metrics
(``EvalTask.describe`` and ``summary``, e.g. the score at each length). Written to ``--out`` (default
``runs/compare``): ``compare.md``, ``compare.csv`` and each task's picture ``<task>.png`` (``EvalTask.plot``), when
some result has that task. With
``--wandb`` the table and the images are logged to Weights & Biases (``WANDB_MODE=offline`` works without an
account).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path

from eval.common import EvalError, log
from eval.registry import EVAL_TASKS
from utils.cli import exit_process, run_cli
from utils.files import write_atomic

IDENTITY = ["run", "model", "method", "factor", "fine_tuned"]


def _results_in(folder: Path) -> list[Path]:
    """Result files of a result folder, or of a run folder (train.py writes ``<run>/eval/<model slug>/``)."""
    evals = folder / "eval"
    dirs = [folder, evals, *(sorted(c for c in evals.iterdir() if c.is_dir()) if evals.is_dir() else [])]
    return [d / t.result_file for d in dirs for t in EVAL_TASKS.values() if (d / t.result_file).is_file()]


def find_results(paths: list[str]) -> list[Path]:
    """Result JSON files named by ``paths`` (files, result folders, run folders, folders of those)."""
    found: list[Path] = []
    names = ", ".join(t.result_file for t in EVAL_TASKS.values())
    for spec in paths:
        p = Path(spec)
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            here = _results_in(p) or [f for c in sorted(p.iterdir()) if c.is_dir() for f in _results_in(c)]
            if not here:
                raise EvalError(f"{p} holds no result file ({names}; nor in eval/ or its subfolders); run an "
                                "evaluation (python -m eval.<task>) first")
            found += here
        else:
            raise EvalError(f"{p} does not exist; give result files, result folders or run folders")
    return list(dict.fromkeys(found))


def _identity(model: dict) -> tuple:
    return (model["model"], model["method"], model["factor"], model["fine_tuned"],
            json.dumps(model["rope_parameters"], sort_keys=True), model["dtype"])


def collect(files: list[Path]) -> list[dict]:
    """Group results by model into runs: ``{"model", "results": {task: result}, "files"}``, in first-seen order."""
    runs: dict[tuple, dict] = {}
    for f in files:
        try:
            result = json.loads(f.read_text())
            kind, model = result["kind"], result["model"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise EvalError(f"{f} is not a result file of an evaluation task ({', '.join(EVAL_TASKS)})") from None
        if kind not in EVAL_TASKS:
            raise EvalError(f"{f}: unknown result kind '{kind}' (tasks: {', '.join(EVAL_TASKS)})")
        run = runs.setdefault(_identity(model), {"model": model, "results": {}, "files": []})
        if kind in run["results"]:
            raise EvalError(f"two {kind} results for {model['label']} ({model['model']}): "
                            f"{run['results'][kind]['_file']} and {f}; pass only one of them")
        run["results"][kind] = dict(result, _file=str(f))
        run["files"].append(str(f))
    return list(runs.values())


def _column_order(names: list[str]) -> list[str]:
    """A task's metric columns: ``prefix@L`` names grouped by prefix (first seen first), by length within a group
    (a suffix that is not a number sorts after the numbers, as text), then the other names in the order seen
    (``score@256, score@512, score_all``)."""
    prefixes = list(dict.fromkeys(n.split("@")[0] for n in names if "@" in n))

    def key(name: str) -> tuple:
        prefix, suffix = name.split("@", 1)
        return (prefixes.index(prefix), 0, int(suffix), "") if suffix.isdigit() else (prefixes.index(prefix), 1, 0,
                                                                                      suffix)

    return sorted((n for n in names if "@" in n), key=key) + [n for n in names if "@" not in n]


def columns_by_task(runs: list[dict]) -> dict[str, list[str]]:
    """The columns of each task of the registry that some run has: its descriptive columns (``describe``), then its
    summary metrics (``summary``) in ``_column_order``."""
    columns: dict[str, list[str]] = {}
    for name, task in EVAL_TASKS.items():
        results = [r["results"][name] for r in runs if name in r["results"]]
        if results:
            described = list(dict.fromkeys(k for res in results for k in task.describe(res)))
            columns[name] = described + _column_order(list(dict.fromkeys(k for res in results
                                                                             for k in task.summary(res))))
    return columns


def table(runs: list[dict]) -> tuple[list[str], list[list]]:
    """Header and rows: the model's identity (run, model, method, factor, fine_tuned), then each task's columns
    (``columns_by_task``)."""
    columns = columns_by_task(runs)
    header = IDENTITY + [c for cols in columns.values() for c in cols]
    rows = []
    for r in runs:
        m = r["model"]
        row = [m["label"], m["model"], m["method"], m["factor"], m["fine_tuned"]]
        for name, cols in columns.items():
            res = r["results"].get(name)
            values = {**EVAL_TASKS[name].describe(res), **EVAL_TASKS[name].summary(res)} if res else {}
            row += [values.get(c) for c in cols]
        rows.append(row)
    return header, rows


def cell_formats(runs: list[dict]) -> dict[str, str]:
    """Column -> format spec, from the ``formats`` of the task that owns the column."""
    return {c: spec for name, cols in columns_by_task(runs).items() for c in cols
            for prefix, spec in EVAL_TASKS[name].formats if c.startswith(prefix)}


def _cell(name: str, v, formats: dict[str, str]) -> str:
    if v is None:
        return "-"
    if name in formats and isinstance(v, (int, float)) and not isinstance(v, bool):
        return format(v, formats[name])
    if name == "fine_tuned":
        return "yes" if v else "no"
    return f"{v:g}" if isinstance(v, float) else str(v)


def markdown(header: list[str], rows: list[list], runs: list[dict], formats: dict[str, str]) -> str:
    """The table (cells formatted with ``formats``, see ``cell_formats``) and the results' definitions."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(h, v, formats) for h, v in zip(header, row)) + " |" for row in rows]
    definitions = sorted({res["definition"] for r in runs for res in r["results"].values()})
    lines += ["", "Definitions:"] + [f"- {d}." for d in definitions]
    return "\n".join(lines) + "\n"


def to_csv(header: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(["" if v is None else v for v in row] for row in rows)
    return buf.getvalue()


def plots(runs: list[dict], out: Path) -> list[Path]:
    """Each task's picture (``EvalTask.plot``) over the runs that have it, as ``<out>/<task>.png``."""
    written = []
    for name, task in EVAL_TASKS.items():
        entries = [(r["model"], r["results"][name]) for r in runs if name in r["results"]]
        if entries and task.plot is not None:
            task.plot(entries, out / f"{name}.png")
            written.append(out / f"{name}.png")
    return written


def log_wandb(out: Path, header: list[str], rows: list[list], formats: dict[str, str], images: list[Path],
              project: str) -> str:
    """Log the table (cells formatted with ``formats``, see ``cell_formats``) and images to one W&B run; returns the
    run's directory."""
    import wandb

    try:
        run = wandb.init(project=project, job_type="compare", dir=str(out), config={"results": str(out)})
    except Exception as e:  # noqa: BLE001 - wandb raises its own error types for missing keys and bad modes
        raise EvalError(f"W&B did not start ({str(e).splitlines()[0]}); log in, or set WANDB_MODE=offline") from None
    try:
        run.log({"compare": wandb.Table(columns=header, data=[[_cell(h, v, formats) for h, v in zip(header, r)]
                                                               for r in rows])})
        run.log({p.stem: wandb.Image(str(p)) for p in images})
        return run.dir
    finally:
        run.finish()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m eval.compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", help="result files, result folders, run folders, or folders of those")
    ap.add_argument("--out", default="runs/compare", help="folder for compare.md/.csv and the plots (default: "
                    "runs/compare)")
    ap.add_argument("--wandb", action="store_true", help="log the table and plots to Weights & Biases")
    ap.add_argument("--wandb-project", default="ropescale", help="W&B project")
    ap.add_argument("--json", action="store_true", help="print the table as one JSON object on the last line")
    args = ap.parse_args(argv)
    runs = collect(find_results(args.paths))
    header, rows = table(runs)
    out = Path(args.out)
    formats = cell_formats(runs)
    write_atomic(out / "compare.md", markdown(header, rows, runs, formats))
    write_atomic(out / "compare.csv", to_csv(header, rows))
    images = plots(runs, out)
    log(f"compare: {len(runs)} runs -> {out}/compare.md, compare.csv, " + ", ".join(p.name for p in images))
    result = {"columns": header, "rows": rows, "files": [str(out / "compare.md"), str(out / "compare.csv")]
              + [str(p) for p in images]}
    if args.wandb:
        result["wandb_dir"] = log_wandb(out, header, rows, formats, images, args.wandb_project)
    if args.json:
        print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    exit_process(run_cli(main))
