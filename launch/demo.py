"""The main job on the embedded CPU default (``make demo``): the mission's comparison on the testbed, end to end.

    python -m launch.demo [--plan auto|full|small] [--parallel 2]

1. the committed testbed base (``models/testbed``: a small Llama pretrained at a native 1,024 tokens that retrieves
   a pass key at its native length; ``make testbed`` rebuilds it, docs/testbed.md), checked against its manifest; its
   native length is read from its config.json;
2. LoRA fine-tuning at s=4 for each of PI, NTK-aware, NTK-by-parts and YaRN: ``OMP_NUM_THREADS=1 deepspeed
   --num_gpus 2 train.py --config configs/testbed/<method>_4x.yaml`` into ``runs/demo/<method>_4x`` (replaced on
   every run), one after the other (each uses both cores);
3. perplexity (bundled held-out book) and passkey at 1x, 2x, 4x and 8x the native length for nine models: the
   base without scaling, the base under each method training-free, and the four fine-tuned models; one process per
   model and metric, ``--parallel`` at a time with one thread each, in bfloat16 where the CPU has bf16 units
   (``eval_dtype``), each output line prefixed with its name;
4. ``eval.compare`` over the results: the table, a two-line reading of it, and the plots' paths
   (``runs/demo/compare/``).

``--plan``: ``full`` evaluates each metric with the configs' ``eval:`` settings; ``small`` uses fewer passkey
prompts at 8x (the config's 20 per length up to 4x) and half the configs' stretch of the held-out book, so that a CPU
without bf16 units (fp32, 2-3x slower) stays within about 25 minutes; ``auto`` (default) picks ``full`` where the
CPU has bf16 units and ``small`` elsewhere, and says so.
Every command is printed before it runs, with the time since the start.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from configs.schema import EvalSection, load_run_config
from eval import compare
from eval.registry import EVAL_TASKS
from eval.task import settings_argv
from launch.testbed import COMMITTED_DIR, MANIFEST, TestbedError, deepspeed_launcher, file_table
from training.runtime import choose_precision
from utils.cli import exit_process, run_cli
from utils.log import Log

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("pi", "ntk_aware", "ntk_by_parts", "yarn")  # configs/testbed/<name>_4x.yaml
FACTOR = 4
DEMO_DIR = Path("runs/demo")
# The demo's evaluation tasks (eval/registry.py) with the short name of their jobs, from the configs' eval: sections.
TASKS = {"perplexity": "ppl", "passkey": "passkey"}
# The small plan (CPUs without bf16 units, where fp32 runs everything 2-3x slower): passkey at 3 depths x 2 trials
# beyond FACTOR x the native length (the config's 20 prompts up to it), perplexity on the held-out book's first
# 16,384 tokens instead of the config's 32,768.
SMALL = {"perplexity": {"max_tokens": 16384}, "passkey": {"depths": [0.0, 0.5, 1.0], "trials": 2}}
log = Log("demo")


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def run_logged(name: str, cmd: list[str]) -> None:
    """Run ``cmd``, printing each line of its output tagged with ``name``; raise TestbedError if it fails."""
    log(f"{name}: {' '.join(cmd)}")
    echo = Log(name)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env(), text=True,
                            errors="replace", bufsize=1)
    for line in proc.stdout:
        # tqdm redraws with carriage returns: keep the last state of each line only
        line = line.rstrip("\n").rsplit("\r", 1)[-1]
        if line.strip():
            echo(line)
    if proc.wait() != 0:
        raise TestbedError(f"{name} failed (exit status {proc.returncode}): {' '.join(cmd)}")


def run_all(name: str, cmds: list[list[str]]) -> None:
    """``run_logged`` for each command in turn (one job's commands share its result folder)."""
    for cmd in cmds:
        run_logged(name, cmd)


def eval_dtype() -> str:
    """bfloat16 where the CPU has bf16 matrix units (train.py's ``auto`` rule), else float32. Measured on the testbed
    base (2-core AMD EPYC with avx512_bf16, one thread): 2.5x faster at 256 tokens, 1.9x at 2048, perplexity equal
    to 1e-4 relative (logits are upcast to fp32 either way)."""
    return "bfloat16" if choose_precision("auto", torch.device("cpu"))[0] == "bf16" else "float32"


def config_path(name: str) -> Path:
    """The extension config of method ``name`` at the demo's factor."""
    return ROOT / "configs" / "testbed" / f"{name}_{FACTOR}x.yaml"


def choose_plan(plan: str) -> tuple[str, str]:
    """(plan, why): ``auto`` is ``full`` with bf16 units, ``small`` without (fp32 is about 3x slower there)."""
    if plan != "auto":
        return plan, "--plan " + plan
    precision, why = choose_precision("auto", torch.device("cpu"))
    return ("full" if precision == "bf16" else "small"), why


def check_base(folder: Path = COMMITTED_DIR) -> Path:
    """The committed base, every file as its manifest lists it (a damaged or half-replaced base is refused)."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise TestbedError(f"{folder} has no {MANIFEST}: restore it with `git checkout -- models/testbed`, or "
                           "rebuild and install a base with `python -m launch.testbed --install`")
    if file_table(folder) != json.loads(manifest.read_text())["files"]:
        raise TestbedError(f"{folder} does not match its {MANIFEST} (a changed or missing file): restore it with "
                           "`git checkout -- models/testbed`, or `python -m launch.testbed --install`")
    return folder


def model_out(out: Path, index: int, name: str) -> Path:
    """The result folder of the ``index``-th model: its own, so that the comparison lists the models in order."""
    return out / f"{index:02d}-{name.replace(' ', '-')}"


def native_length(base: Path) -> int:
    """The base's native context in tokens, from its config.json (``max_position_embeddings``)."""
    try:
        return int(json.loads((base / "config.json").read_text())["max_position_embeddings"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TestbedError(f"{base}/config.json gives no max_position_embeddings ({e}): restore the base with "
                           "`git checkout -- models/testbed`") from None


def eval_jobs(models: list[tuple[str, list[str]]], e: EvalSection, out: Path, native: int, dtype: str = "float32",
              plan: str = "full") -> list[tuple[str, list[list[str]]]]:
    """(name, commands run one after the other) of every evaluation: each task of ``TASKS`` with the config's
    settings for each (name, model arguments), the first task's jobs first (the long ones, so that the workers finish
    together). On the small plan perplexity reads the first ``SMALL`` tokens of the book, and passkey keeps the
    config's prompts up to ``FACTOR`` x ``native`` (the lengths the demo's reading is about) and asks ``SMALL``'s
    fewer beyond, appended to the same result (``eval.passkey --append``)."""
    jobs = []
    for task_name, short in TASKS.items():
        task, settings = EVAL_TASKS[task_name], getattr(e, task_name)
        parts = [settings]
        if plan == "small" and task_name == "passkey":
            limit = FACTOR * native
            near = [n for n in settings.lengths if n <= limit]
            far = [n for n in settings.lengths if n > limit]
            parts = [settings.model_copy(update={"lengths": near})] if near else []
            if far:
                parts.append(task.settings.model_validate({**settings.model_dump(), **SMALL[task_name],
                                                           "lengths": far}))
        elif plan == "small":
            parts = [task.settings.model_validate({**settings.model_dump(), **SMALL[task_name]})]
        for i, (name, m) in enumerate(models):
            cmds = [[sys.executable, "-m", task.module, *m, "--out", str(model_out(out, i, name)), "--threads", "1",
                     "--dtype", dtype, *settings_argv(part)] + (["--append"] if k else [])
                    for k, part in enumerate(parts)]
            jobs.append((f"{short} {name}", cmds))
    return jobs


def demo_models(base: Path, runs: dict[str, Path], methods: dict[str, str]) -> list[tuple[str, list[str]]]:
    """(name, model arguments) of the nine models: the base, each method training-free, each fine-tuned run."""
    models = [("base", ["--model", str(base)])]
    models += [(f"{rope} x{FACTOR}", ["--model", str(base), "--rope", rope, "--factor", str(FACTOR)])
               for rope in methods.values()]
    models += [(f"{methods[name]} x{FACTOR} fine-tuned", ["--model", str(run)]) for name, run in runs.items()]
    return models


def reading(header: list[str], rows: list[list], native: int) -> list[str]:
    """Two lines under the table: perplexity at the target length and passkey within it, for each method
    training-free and fine-tuned, with the base for reference (``native``: the base's native length in tokens)."""
    col = {h: i for i, h in enumerate(header)}
    target = native * FACTOR
    pk = [f"passkey@{L}" for L in (native, 2 * native, target) if f"passkey@{L}" in col]

    def who(row) -> str:
        return "base" if row[col["method"]] == "none" else row[col["method"]]

    def pk_mean(row) -> float:
        return sum(row[col[c]] or 0.0 for c in pk) / len(pk)

    def ranked(rows: list[list], value, fmt: str, best_high: bool = False) -> str:
        return ", ".join(f"{who(r)} {value(r):{fmt}}" for r in sorted(rows, key=value, reverse=best_high))

    tf = [r for r in rows if not r[col["fine_tuned"]] and r[col["method"]] != "none"]
    ft = [r for r in rows if r[col["fine_tuned"]]]
    base = [r for r in rows if r[col["method"]] == "none"]

    def ppl(row) -> float:
        return row[col[f"ppl@{target}"]]

    line1 = (f"Perplexity at {target} tokens ({FACTOR}x): fine-tuned {ranked(ft, ppl, '.1f')}; training-free "
             f"{ranked(tf, ppl, '.1f')}" + (f"; the unscaled base {ppl(base[0]):.1f}." if base else "."))
    line2 = (f"Passkey at 1x-{FACTOR}x ({native}-{target} tokens), mean: fine-tuned "
             f"{ranked(ft, pk_mean, '.0%', True)}; "
             f"training-free {ranked(tf, pk_mean, '.0%', True)}"
             + (f"; the base {pk_mean(base[0]):.0%} ({base[0][col[pk[0]]]:.0%} at {native})." if base else "."))
    return [line1, line2]


def demo(parallel: int = 2, plan: str = "auto") -> Path:
    plan, why = choose_plan(plan)
    configs = {name: load_run_config(config_path(name)) for name in METHODS}
    e = configs["yarn"].eval
    if e is None or any(getattr(e, name) is None for name in TASKS):
        raise TestbedError(f"configs/testbed/yarn_{FACTOR}x.yaml needs an eval: section with "
                           f"{' and '.join('eval.' + name for name in TASKS)}")
    log(f"plan: {plan} ({why})")
    log("step 1/4: the committed testbed base")
    base = check_base().relative_to(ROOT)
    native = native_length(base)
    log(f"  {base}: every file matches its manifest; native length {native} tokens")
    log(f"step 2/4: LoRA fine-tuning at s={FACTOR}, {', '.join(METHODS)}; 2 processes each")
    runs = {}
    for name, cfg in configs.items():
        run = DEMO_DIR / f"{name}_{FACTOR}x"
        if run.exists():
            shutil.rmtree(run)
        # eval=null: the evaluations run below, several processes at a time, rather than in rank 0 of the job
        run_logged(f"train {name}", deepspeed_launcher(2) + [
            "train.py", "--config", str(config_path(name)),
            "--set", f"output.dir={run}", "--set", "eval=null"])
        runs[name] = run
    dtype = eval_dtype()
    log(f"step 3/4: evaluations ({parallel} at a time, {dtype})")
    out = DEMO_DIR / "eval"
    if out.exists():
        shutil.rmtree(out)
    methods = {name: cfg.rope.method for name, cfg in configs.items()}
    models = demo_models(base, runs, methods)
    jobs = eval_jobs(models, e, out, native, dtype, plan)
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        for future in [pool.submit(run_all, name, cmds) for name, cmds in jobs]:
            future.result()
    log("step 4/4: comparison")
    where = DEMO_DIR / "compare"
    result = compare.main([str(model_out(out, i, name)) for i, (name, _) in enumerate(models)] + ["--out", str(where)])
    print()
    print((where / "compare.md").read_text())
    for line in reading(result["columns"], result["rows"], native):
        print(line)
    print()
    for f in result["files"]:
        print(f"  {f}")
    print(f"  per-model results (with loss by position): {out}/*/perplexity.md, passkey.md, *.png")
    log("done")
    return where


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--parallel", type=int, default=2, help="evaluation processes at a time (one thread each)")
    ap.add_argument("--plan", choices=("auto", "full", "small"), default="auto",
                    help="full: the configs' eval settings; small: fewer passkey prompts at 8x and half the "
                         "book's stretch (CPUs without bf16 units); auto: full with bf16 units, else small")
    args = ap.parse_args(argv)
    return run_cli(lambda _: demo(max(1, args.parallel), args.plan))


if __name__ == "__main__":
    exit_process(main())
