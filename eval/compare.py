"""One table and three plots over many evaluations: which method and factor, with or without fine-tuning, works best.

    python -m eval.compare results/*/ runs/yarn-s4 --out results/compare [--wandb]

Each argument is a result file (``passkey.json``, ``perplexity.json``, ``ruler.json``), a result folder holding them,
a run folder (results in its ``eval/``), or a folder of such folders. Results of one model (same model, method,
factor, fine-tuned or not) form one row: perplexity, passkey accuracy and the RULER-style suite's averaged score at
each length, and the suite's effective length. Written to ``--out``:
``compare.md``, ``compare.csv``, ``perplexity.png`` (perplexity against length, one line per run), ``passkey.png``
(the passkey heatmaps side by side) and ``ruler.png`` (the suite's score against length, one line per run), each
plot only when some result has its kind. With ``--wandb`` the table and the images are logged to Weights & Biases
(``WANDB_MODE=offline`` works without an account).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
from pathlib import Path

from eval.common import EvalError, length_axis, log
from eval.passkey import draw_heatmap
from utils.cli import exit_process, run_cli
from utils.files import save_figure, write_atomic

KINDS = ("perplexity", "passkey", "ruler")


def _results_in(folder: Path) -> list[Path]:
    """Result files of a result folder, or of a run folder (train.py writes ``<run>/eval/<model slug>/``)."""
    evals = folder / "eval"
    dirs = [folder, evals, *(sorted(c for c in evals.iterdir() if c.is_dir()) if evals.is_dir() else [])]
    return [d / f"{k}.json" for d in dirs for k in KINDS if (d / f"{k}.json").is_file()]


def find_results(paths: list[str]) -> list[Path]:
    """Result JSON files named by ``paths`` (files, result folders, run folders, folders of those)."""
    found: list[Path] = []
    for spec in paths:
        p = Path(spec)
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            here = _results_in(p) or [f for c in sorted(p.iterdir()) if c.is_dir() for f in _results_in(c)]
            if not here:
                raise EvalError(f"{p} holds no perplexity.json, passkey.json or ruler.json (nor in eval/ or its "
                                "subfolders); run eval.perplexity / eval.passkey / eval.ruler first")
            found += here
        else:
            raise EvalError(f"{p} does not exist; give result files, result folders or run folders")
    return list(dict.fromkeys(found))


def _identity(model: dict) -> tuple:
    return (model["model"], model["method"], model["factor"], model["fine_tuned"],
            json.dumps(model["rope_parameters"], sort_keys=True), model["dtype"])


def collect(files: list[Path]) -> list[dict]:
    """Group results by model into runs: ``{"model", "perplexity", "passkey", "files"}``, in first-seen order."""
    runs: dict[tuple, dict] = {}
    for f in files:
        try:
            result = json.loads(f.read_text())
            kind, model = result["kind"], result["model"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise EvalError(f"{f} is not a result file of eval.passkey, eval.perplexity or eval.ruler") from None
        if kind not in KINDS:
            raise EvalError(f"{f}: unknown result kind '{kind}'")
        run = runs.setdefault(_identity(model), {"model": model, **dict.fromkeys(KINDS), "files": []})
        if run[kind] is not None:
            raise EvalError(f"two {kind} results for {model['label']} ({model['model']}): {run[kind]['_file']} and "
                            f"{f}; pass only one of them")
        run[kind] = dict(result, _file=str(f))
        run["files"].append(str(f))
    return list(runs.values())


def table(runs: list[dict]) -> tuple[list[str], list[list]]:
    """Header and rows: run, model, method, factor, fine-tuned, ppl mode, ppl@L..., passkey@L..., passkey overall,
    ruler@L... (the suite's score averaged over tasks), ruler_effective (its effective length)."""
    ppl_lengths = sorted({int(k) for r in runs if r["perplexity"] for k in r["perplexity"]["ppl"]})
    pk_lengths = sorted({int(k) for r in runs if r["passkey"] for k in r["passkey"]["by_length"]})
    ru_lengths = sorted({int(k) for r in runs if r["ruler"] for k in r["ruler"]["by_length"]})
    header = (["run", "model", "method", "factor", "fine_tuned", "ppl_mode"] + [f"ppl@{L}" for L in ppl_lengths]
              + [f"passkey@{L}" for L in pk_lengths] + (["passkey_all"] if pk_lengths else [])
              + [f"ruler@{L}" for L in ru_lengths] + (["ruler_effective"] if ru_lengths else []))
    rows = []
    for r in runs:
        m, ppl, pk, ru = r["model"], r["perplexity"], r["passkey"], r["ruler"]
        mode = ppl["settings"]["mode"] if ppl else None
        row = [m["label"], m["model"], m["method"], m["factor"], m["fine_tuned"], mode]
        row += [ppl["ppl"].get(str(L)) if ppl else None for L in ppl_lengths]
        row += [pk["by_length"].get(str(L)) if pk else None for L in pk_lengths]
        row += [pk["accuracy"] if pk else None] if pk_lengths else []
        row += [ru["by_length"].get(str(L)) if ru else None for L in ru_lengths]
        row += [ru["effective_length"] if ru else None] if ru_lengths else []
        rows.append(row)
    return header, rows


def _cell(name: str, v) -> str:
    if v is None:
        return "-"
    if name.startswith("passkey"):
        return f"{v:.0%}"
    if name.startswith("ppl@"):
        return f"{v:.3f}"
    if name.startswith("ruler@"):
        return f"{v:.2f}"
    if name == "fine_tuned":
        return "yes" if v else "no"
    return f"{v:g}" if isinstance(v, float) else str(v)


def markdown(header: list[str], rows: list[list], runs: list[dict]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(h, v) for h, v in zip(header, row)) + " |" for row in rows]
    definitions = sorted({r[k]["definition"] for r in runs for k in KINDS if r[k]})
    lines += ["", "Definitions:"] + [f"- {d}." for d in definitions]
    return "\n".join(lines) + "\n"


def to_csv(header: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(["" if v is None else v for v in row] for row in rows)
    return buf.getvalue()


def plot_lines(runs: list[dict], kind: str, values: str, ylabel: str, title: str, path: Path,
               unit_range: bool = False) -> bool:
    """``r[kind][values]`` ({length: value}) against length, one line per run that has it; False (nothing written)
    when none has. ``unit_range``: a score in [0, 1] (fixed axis); otherwise a log axis when the values spread over
    more than 10x (a method that breaks down would flatten the others)."""
    import matplotlib
    from matplotlib.figure import Figure

    with_kind = [r for r in runs if r[kind]]
    if not with_kind:
        return False
    fig = Figure(figsize=(7 if len(with_kind) <= 8 else 9.5, 4.2), layout="constrained")
    ax = fig.subplots()
    # One colour per (method, factor), so a fine-tuned run (solid) and its training-free twin (dashed) pair up.
    keys = list(dict.fromkeys((r["model"]["method"], r["model"]["factor"]) for r in with_kind))
    palette = matplotlib.colormaps["tab10" if len(keys) <= 10 else "tab20"].colors
    for r in with_kind:
        pts = sorted((int(k), v) for k, v in r[kind][values].items() if v is not None and math.isfinite(v))
        ls = "-" if r["model"]["fine_tuned"] else "--"
        color = palette[keys.index((r["model"]["method"], r["model"]["factor"])) % len(palette)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle=ls, color=color,
                label=r["model"]["label"])
    originals = sorted({r["model"]["original_context"] for r in with_kind if r["model"]["original_context"]})
    for i, L in enumerate(originals):
        ax.axvline(L, color="grey", linestyle=":", label="original context" if i == 0 else None)
    length_axis(ax, sorted({int(k) for r in with_kind for k in r[kind][values]}))
    found = [v for r in with_kind for v in r[kind][values].values() if v is not None]
    if unit_range:
        ax.set_ylim(-0.03, 1.03)
    elif found and max(found) > 10 * min(found):
        ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title} (dashed: training-free)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    if len(with_kind) <= 8:
        ax.legend(fontsize=8)
    else:  # outside the axes, where it hides no line
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save_figure(fig, path)
    return True


def plot_perplexity(runs: list[dict], path: Path) -> bool:
    """Perplexity against length, one line per run; False (nothing written) when no run has perplexity."""
    modes = sorted({r["perplexity"]["settings"]["mode"] for r in runs if r["perplexity"]})
    return plot_lines(runs, "perplexity", "ppl", f"perplexity ({', '.join(modes)})", "perplexity by context length",
                      path)


def plot_ruler(runs: list[dict], path: Path) -> bool:
    """The RULER-style suite's score (mean over tasks) against length, one line per run; False when none has it."""
    return plot_lines(runs, "ruler", "by_length", "RULER-style score (mean over tasks)",
                      "RULER-style suite by context length", path, unit_range=True)


def plot_passkey(runs: list[dict], path: Path) -> bool:
    """Passkey heatmaps side by side (one per run, shared colour scale); False when no run has passkey results."""
    from matplotlib.figure import Figure

    with_pk = [r for r in runs if r["passkey"]]
    if not with_pk:
        return False
    cols = min(4, len(with_pk))
    nrows = -(-len(with_pk) // cols)
    fig = Figure(figsize=(3.2 * cols + 0.8, 3.2 * nrows), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False)
    im = None
    for i, (ax, r) in enumerate(zip(axes.flat, with_pk)):
        im = draw_heatmap(ax, r["passkey"], f"{r['model']['label']}\nacc {r['passkey']['accuracy']:.0%}")
        if i % cols:
            ax.set_ylabel("")
    for ax in list(axes.flat)[len(with_pk):]:
        ax.set_axis_off()
    fig.colorbar(im, ax=axes.ravel().tolist(), label="passkey accuracy")
    save_figure(fig, path)
    return True


def log_wandb(out: Path, header: list[str], rows: list[list], images: list[Path], project: str) -> str:
    """Log the table and images to one W&B run; returns the run's directory."""
    import wandb

    try:
        run = wandb.init(project=project, job_type="compare", dir=str(out), config={"results": str(out)})
    except Exception as e:  # noqa: BLE001 - wandb raises its own error types for missing keys and bad modes
        raise EvalError(f"W&B did not start ({str(e).splitlines()[0]}); log in, or set WANDB_MODE=offline") from None
    try:
        run.log({"compare": wandb.Table(columns=header, data=[[_cell(h, v) for h, v in zip(header, r)]
                                                               for r in rows])})
        run.log({p.stem: wandb.Image(str(p)) for p in images})
        return run.dir
    finally:
        run.finish()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m eval.compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", help="result files, result folders, run folders, or folders of those")
    ap.add_argument("--out", default="results/compare", help="folder for compare.md/.csv and the plots")
    ap.add_argument("--wandb", action="store_true", help="log the table and plots to Weights & Biases")
    ap.add_argument("--wandb-project", default="ropescale", help="W&B project")
    ap.add_argument("--json", action="store_true", help="print the table as one JSON object on the last line")
    args = ap.parse_args(argv)
    runs = collect(find_results(args.paths))
    header, rows = table(runs)
    out = Path(args.out)
    write_atomic(out / "compare.md", markdown(header, rows, runs))
    write_atomic(out / "compare.csv", to_csv(header, rows))
    images = [p for p, ok in ((out / "perplexity.png", plot_perplexity(runs, out / "perplexity.png")),
                              (out / "passkey.png", plot_passkey(runs, out / "passkey.png")),
                              (out / "ruler.png", plot_ruler(runs, out / "ruler.png"))) if ok]
    log(f"compare: {len(runs)} runs -> {out}/compare.md, compare.csv, " + ", ".join(p.name for p in images))
    result = {"columns": header, "rows": rows, "files": [str(out / "compare.md"), str(out / "compare.csv")]
              + [str(p) for p in images]}
    if args.wandb:
        result["wandb_dir"] = log_wandb(out, header, rows, images, args.wandb_project)
    if args.json:
        print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    exit_process(run_cli(main))
