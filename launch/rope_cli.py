"""The command ``python -m ropescale inspect|plan|tune|export ...``: see ``ropescale.inspect``, ``ropescale.plan``,
``ropescale.search`` (tune: a method's parameters or per-pair factors searched for a target, training-free) and
``ropescale.serving`` (export: what each server computes of a model, its config.json legacy keys, a GGUF). Errors
exit with status 2 and one ``error:`` line.

It sits above ``ropescale`` (which only computes): it loads models (``models.load``), scores candidates
(``eval.candidates``, ``eval.tune``) and writes the reports and pictures (``launch.plan``, ``launch.tune``);
``ropescale/__main__.py`` calls ``main``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from eval import tune as tune_eval
from eval.candidates import SEARCHES, recommend, score_candidates
from eval.common import locate
from eval.perplexity import load_texts
from launch import plan as report
from launch import tune as tune_report
from models.gguf_export import write_gguf
from models.load import load_config
from ropescale import inspect, plan, search, serving
from ropescale.apply import PRIMARY, head_dim_of, layer_tables, partial_rotary_factor_of, rope_of
from ropescale.methods import RopeConfigError, rotary_dim, validate_method
from training.runtime import choose_precision
from utils.cli import UserError, run_cli
from utils.files import write_atomic
from utils.log import Log

log = Log("plan", err=True)


def layer_note(a: argparse.Namespace) -> str | None:
    """For ``--model`` with one RoPE per layer type (Gemma 3, OLMo 3): which layers inspect and plan describe."""
    tables = layer_tables(load_config(a.model)) if a.model else None
    if tables is None:
        return None
    others = "; ".join(f"{t} (base {r['rope_theta']:g}) keeps its own" for t, r in tables.items() if t != PRIMARY)
    return (f"per-layer-type RoPE: this describes the {PRIMARY} layers (base {tables[PRIMARY]['rope_theta']:g}), "
            f"which a method scales by default; {others} unless rope.layer_types names it")


def run_inspect(a: argparse.Namespace) -> int:
    """``inspect``: the per-pair table (or its JSON) of ``a`` (``ropescale.inspect.add_arguments``), and with
    ``--plot`` the comparison page."""
    kw = inspect.resolve(a, load_config)
    table = inspect.rope_table(**kw)
    if a.plot:
        if not Path(a.plot).parent.is_dir():
            raise RopeConfigError(f"--plot: folder {Path(a.plot).parent} does not exist")
        report.plot_inspect(a.plot, **kw)
    note = layer_note(a)
    if a.json:
        print(json.dumps({**table, "layer_note": note} if note else table))
    else:
        print(inspect.format_table(table) + (f"\n{note}" if note else ""))
        if a.plot:
            print(f"plot written to {a.plot}")
    return 0


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    inspect.add_source_arguments(p)
    p.add_argument("--target", type=int, required=True, help="the context length to reach (tokens)")
    p.add_argument("--methods", default=",".join(plan.DEFAULT_METHODS), help="comma-separated (default: %(default)s)")
    p.add_argument("--factors", default=None,
                   help="comma-separated scale factors (default: 1, 1.25, 1.5 and 2 x target / L)")
    p.add_argument("--theory-only", action="store_true",
                   help="the numbers from the config alone (no forward pass); --head-dim/--base/--original need it")
    m = p.add_argument_group("the measured part (training-free scoring; needs --model)")
    m.add_argument("--data", nargs="+", default=["bundled"],
                   help="held-out text: 'bundled' (the bundled held-out book), .txt/.jsonl files, or a dataset")
    m.add_argument("--windows", type=int, default=1, help="windows of --target tokens scored per candidate")
    m.add_argument("--buckets", type=int, default=16, help="position buckets of the loss curve")
    m.add_argument("--tolerance", type=float, default=0.1,
                   help="nats above the unscaled native loss that end the effective context (default 0.1)")
    m.add_argument("--native-tolerance", type=float, default=0.05,
                   help="largest native-window cost (nats) a recommended factor may have (default 0.05)")
    m.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="auto (default): bfloat16 where the hardware has bf16 units (CPU: amx_bf16 or avx512_bf16; "
                        "about 2x faster there), else float32")
    m.add_argument("--search", choices=SEARCHES, default="scan",
                   help="scan (default): per method, stop at the first factor whose loss rises; grid: score all")
    m.add_argument("--sweep-base", default=None, metavar="YAML",
                   help="a run config whose recipe fine-tunes the top candidates: writes --out/sweep.yaml")
    p.add_argument("--no-base-bound", action="store_true",
                   help="skip Men et al.'s base lower bound (a scan of bases: 1.5 s for head_dim 128 at 32k)")
    p.add_argument("--out", default=None, help="folder for plan.md, plan.json and the pictures")
    p.add_argument("--json", action="store_true", help="print the whole result as one JSON line last")


def run_plan(a: argparse.Namespace) -> int:
    try:
        factors = tuple(float(x) for x in a.factors.split(",")) if a.factors else None
    except ValueError:
        raise RopeConfigError(f"--factors must be comma-separated numbers (got {a.factors!r})") from None
    methods = tuple(m.strip() for m in a.methods.split(",") if m.strip())
    if not a.theory_only and not a.model:
        raise UserError("plan: the measured part scores a model: give --model, or --theory-only")
    if a.sweep_base and (a.theory_only or not a.out):
        raise UserError("plan: --sweep-base needs the measured part and --out (the sweep is written there)")
    if a.sweep_base and not Path(a.sweep_base).is_file():
        raise UserError(f"plan: --sweep-base {a.sweep_base} not found (a run config such as "
                        "configs/smollm2/yarn_16k.yaml)")
    source, _ = inspect.rope_source(a, load_config)
    note = layer_note(a)
    if note:
        log(note)
    result = plan.theory_plan(**source, target=a.target, methods=methods, factors=factors,
                              base_bound=not a.no_base_bound)
    if not a.theory_only:
        texts, desc = load_texts(a.data)
        grid = plan.candidates(source["original_len"], a.target, methods, factors)
        dtype = auto_dtype(a.dtype)
        rows, skipped = score_candidates(a.model, grid, texts, a.target, source["original_len"], windows=a.windows,
                                         n_buckets=a.buckets, tolerance=a.tolerance, dtype=dtype, search=a.search)
        result["measured"] = {"data": desc, "windows": a.windows, "tolerance": a.tolerance,
                              "native_tolerance": a.native_tolerance, "dtype": dtype, "search": a.search,
                              "rows": rows, "skipped": skipped}
        result["recommendation"] = recommend(rows, a.native_tolerance)
        if a.sweep_base:
            path = Path(a.out) / "sweep.yaml"
            result["sweep"] = {"path": str(path), "command": f"python launch/sweep.py --config {path}"}
    command = "python -m ropescale plan " + shlex.join(sys.argv[2:] if len(sys.argv) > 2 else [])
    print(report.format_markdown(result, command, guide=False))
    if a.out:
        print(f"report: {report.write_report(result, Path(a.out), command) / 'plan.md'}")
        if a.sweep_base:
            write_atomic(Path(result["sweep"]["path"]),
                         report.sweep_yaml(result, a.sweep_base, result["sweep"]["path"]))
            print(f"sweep: {result['sweep']['path']}; next: {result['sweep']['command']}")
    if a.json:
        print(json.dumps(result))
    return 0


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a run folder (its merged/), a model folder, or a model name")
    p.add_argument("--gguf", default=None, metavar="OUT.gguf",
                   help="write a GGUF file for llama.cpp (Llama architecture; methods it cannot run are refused)")
    p.add_argument("--write-config", action="store_true",
                   help="rewrite the folder's config.json with the legacy keys older loaders read (rope_scaling, "
                        "rope_theta) and write SERVING.md next to it (train.py's merged/ has both already)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line last")


def run_export(a: argparse.Namespace) -> int:
    src = locate(a.model)["load"]
    if a.write_config and not (Path(src) / "config.json").is_file():
        raise UserError(f"export: --write-config rewrites a local folder's config.json; {a.model} is not one")
    config = load_config(src)
    if a.write_config:
        verdicts = serving.write_serving_files(Path(src), config)
        print(f"export: wrote {src}/config.json (legacy keys) and {src}/SERVING.md")
    else:
        verdicts = serving.compatibility(config)
    for v in verdicts:
        print(f"{v.loader} ({serving.LOADERS[v.loader]}): {v.status}" + (f": {v.why}" if v.why else ""))
    result = {"model": src, "verdicts": [vars(v) for v in verdicts]}
    if a.gguf:
        result["gguf"] = write_gguf(src, a.gguf)
        print(f"gguf: {a.gguf} ({result['gguf']['tensors']} tensors; {result['gguf']['how']})")
    if a.json:
        print(json.dumps(result))
    return 0


def add_tune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a model name, a model folder, or a run folder (its merged/)")
    p.add_argument("--target", type=int, required=True, help="the context length to reach (tokens)")
    p.add_argument("--space", choices=search.SPACES, default="pairs",
                   help="pairs (default): LongRoPE per-pair factors, seeded from PI, NTK-aware and YaRN; params: "
                        "--method's own parameters and s")
    p.add_argument("--method", default=None, choices=sorted(search.PARAM_GENES),
                   help="the method whose parameters --space params searches (default yarn)")
    p.add_argument("--factor", type=float, default=None,
                   help="s for --space pairs (default: target / L); --space params searches s itself")
    p.add_argument("--fixed-factor", action="store_true", help="--space params: keep s at target / L")
    p.add_argument("--keep", type=int, default=0, help="--space pairs: the first pairs left at factor 1 (LongRoPE's "
                   "n-hat; default 0)")
    p.add_argument("--max-lambda", type=float, default=None, help="--space pairs: the largest per-pair factor "
                   "(default 2 s)")
    p.add_argument("--budget", type=int, default=120,
                   help="forward passes the search may spend (a candidate costs --windows, plus 4 with a needle "
                        "objective; the reference and the report are extra); default 120")
    p.add_argument("--population", type=int, default=8, help="candidates per generation (default 8)")
    p.add_argument("--parents", type=int, default=4, help="the best kept as parents each generation (default 4)")
    p.add_argument("--seed", type=int, default=0, help="the search's random seed")
    p.add_argument("--objective", choices=tune_eval.OBJECTIVES, default="ppl",
                   help="ppl (default): loss at the target under the native-cost limit; needle: loss of pass-key "
                        "answers at the target; mixed: both")
    p.add_argument("--data", nargs="+", default=["bundled"],
                   help="held-out text: 'bundled' (the bundled held-out book), .txt/.jsonl files, or a dataset")
    p.add_argument("--windows", type=int, default=2, help="windows of --target tokens per candidate (search text)")
    p.add_argument("--report-windows", type=int, default=2,
                   help="windows of the report text (the stream's end; the search never sees it)")
    p.add_argument("--native-tolerance", type=float, default=0.05,
                   help="largest native-window cost (nats) of a feasible candidate (default 0.05)")
    p.add_argument("--compare", default=",".join(plan.DEFAULT_METHODS),
                   help="methods reported at their published parameters beside the best (default: %(default)s)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="auto (default): bfloat16 where the hardware has bf16 units, else float32")
    p.add_argument("--out", default=None, help="folder for tune.md, tune.json, rope.yaml, rope_parameters.json and "
                   "the pictures")
    p.add_argument("--json", action="store_true", help="print the whole result as one JSON line last")


def auto_dtype(dtype: str) -> str:
    """``auto``: bfloat16 where the hardware has bf16 units (train.py's rule), else float32; logged."""
    if dtype != "auto":
        return dtype
    precision, why = choose_precision("auto", torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bf16": "bfloat16", "fp32": "float32"}[precision]
    log(f"scoring in {dtype} ({why})")
    return dtype


def run_tune(a: argparse.Namespace) -> int:
    compare = [m.strip() for m in a.compare.split(",") if m.strip()]
    for name, v, lo, hi in (("--budget", a.budget, 1, 10**6), ("--population", a.population, 2, 1000),
                            ("--parents", a.parents, 1, a.population - 1), ("--seed", a.seed, 0, 2**32 - 1)):
        if not lo <= v <= hi:
            raise UserError(f"tune: {name} must be from {lo} to {hi} (got {v})")
    wrong = ([o for o, v in (("--keep", a.keep), ("--max-lambda", a.max_lambda), ("--factor", a.factor)) if v]
             if a.space == "params" else [o for o, v in (("--method", a.method), ("--fixed-factor", a.fixed_factor))
                                          if v])
    if wrong:
        raise UserError(f"tune: {', '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} not used by --space "
                        f"{a.space}; drop {'it' if len(wrong) == 1 else 'them'}, or use --space "
                        f"{'pairs' if a.space == 'params' else 'params'}")
    if a.out and Path(a.out).exists() and not Path(a.out).is_dir():
        raise UserError(f"tune: --out {a.out} is a file; give a folder")
    config = load_config(locate(a.model)["load"])
    if layer_tables(config) is not None:
        raise UserError(f"tune: {a.model} has one RoPE per layer type (Gemma 3, OLMo 3); tune searches one table "
                        "for every layer: plan it with `python -m ropescale plan` instead")
    rope = rope_of(config)
    if rope["method"] != "none":
        raise UserError(f"tune: {a.model} already carries {rope['method']} x{rope['factor']:g}; tune its base model")
    L = int(rope["original_max_position_embeddings"])
    head_dim, prf = head_dim_of(config), partial_rotary_factor_of(config)
    model = {"model": a.model, "head_dim": head_dim, "rotary_dim": rotary_dim(head_dim, prf),
             "base": float(rope["rope_theta"]), "original_len": L, "target": a.target, "partial_rotary_factor": prf}
    tune_eval.check_settings(a.objective, a.target, L, a.windows, a.report_windows, a.native_tolerance)
    nominal = a.target / L
    factor = nominal if a.factor is None else a.factor
    if a.space == "pairs":
        space = search.PairSpace(head_dim, model["base"], L, factor, a.keep, a.max_lambda, prf)
    else:
        space = search.ParamSpace(a.method or "yarn", nominal, search_factor=not a.fixed_factor)
    for m in compare:
        validate_method(m, factor, {}, L)
    per = tune_eval.forwards_per_candidate(a.objective, a.windows)
    if a.budget < per:
        raise UserError(f"tune: --budget {a.budget} is less than one candidate's {per} forward passes")
    texts, desc = load_texts(a.data)
    dtype = auto_dtype(a.dtype)
    objective = tune_eval.Objective(a.model, texts, a.target, L, a.objective, a.windows, a.report_windows,
                                    a.native_tolerance, dtype)
    t0, spent = time.perf_counter(), objective.forwards
    history = search.evolve(space, objective, a.budget // per, a.population, a.parents, a.seed,
                            on_scored=tune_eval.log_scored,
                            identity=lambda c: search.table_key(c, model["rotary_dim"], model["base"], L))
    settings = {"space": a.space, "method": space.method if a.space == "params" else "longrope", "factor": factor,
                "objective": a.objective, "windows": a.windows, "report_windows": a.report_windows,
                "native_tolerance": a.native_tolerance, "budget": a.budget, "population": a.population,
                "parents": a.parents, "seed": a.seed, "dtype": dtype, "scored": len(history),
                "forwards": objective.forwards - spent, "seconds": round(time.perf_counter() - t0, 1),
                "stretches": objective.stretches}
    defaults = [search.default_candidate(m, factor) for m in compare]
    top = min(history, key=search.rank_key)
    best = top.candidate
    if not top.score["feasible"]:
        log(f"tune: no candidate kept the native cost within {a.native_tolerance:g} nats; the best written is over it "
            "(tune.md says so): raise --native-tolerance or --budget, or tune another space")
    comparison = [{"name": f"{c.method} (default)", "factor": c.factor, **objective.report(c)} for c in defaults]
    comparison.append({"name": f"tuned ({best.method})", "factor": best.factor, **objective.report(best)})
    comparison.append({"name": "none (unscaled)", "factor": 1.0, **objective.reference["report"]})
    result = tune_report.assemble(model, desc, settings, history, comparison, defaults)
    command = "python -m ropescale tune " + shlex.join(sys.argv[2:] if len(sys.argv) > 2 else [])
    print(tune_report.markdown(result, command))
    if a.out:
        print(f"report: {tune_report.write_report(result, Path(a.out), command) / 'tune.md'}")
    if a.json:
        print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ropescale", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    inspect.add_arguments(sub.add_parser("inspect", help="per-dimension table (and plot) of a RoPE scaling method",
                                         description=inspect.__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter))
    add_plan_arguments(sub.add_parser("plan", help="which method and scale factor for a target length",
                                      description=plan.__doc__,
                                      formatter_class=argparse.RawDescriptionHelpFormatter))
    add_export_arguments(sub.add_parser("export", help="what each server computes of a model; legacy keys; GGUF",
                                        description=serving.__doc__,
                                        formatter_class=argparse.RawDescriptionHelpFormatter))
    add_tune_arguments(sub.add_parser("tune", help="search a method's parameters or per-pair factors for a target",
                                      description=search.__doc__,
                                      formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    if args.command == "tune":
        return run_cli(lambda _: run_tune(args))
    if args.command == "plan":
        return run_cli(lambda _: run_plan(args))
    if args.command == "export":
        return run_cli(lambda _: run_export(args))
    return run_cli(lambda _: run_inspect(args))
