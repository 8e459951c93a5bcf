"""A sweep: one train.py run (train, then eval) per point of a grid of config values, then one comparison table.

    python launch/sweep.py --config configs/sweeps/cpu_tiny.yaml [--set key=value ...] [--parallel N]
    python launch/sweep.py --config configs/sweeps/cpu_tiny.yaml --dry-run          # configs + memory plans
    python launch/sweep.py --config configs/sweeps/cpu_tiny.yaml --training-free    # eval only, base model
    python launch/sweep.py --config configs/sweeps/cpu_tiny.yaml --emit-wandb-sweep sweep.yaml

A sweep YAML (``configs/sweeps/``) names a base run config, a grid of dotted config keys to lists of values, the
overrides every run gets, and how runs are launched::

    name: cpu_tiny                     # W&B group of every run, and the default sweep folder's name
    base: configs/cpu_tiny.yaml
    grid: {rope.method: [linear, ntk_aware, yarn], rope.factor: [2, 4]}
    overrides: {output.dir: runs/sweeps/cpu_tiny, train.max_steps: 6}
    launcher: {kind: python, nproc: 1, parallel: 1}     # or deepspeed / torchrun with nproc GPUs per run

Keys that must change together form one grid entry: ``"rope.factor,data.seq_len": [[4, 1024], [8, 2048]]`` gives
two values (each factor trains at its own target length), crossed with the other entries as usual.

The sweep folder is ``output.dir`` after the overrides and ``--set`` (so ``--set output.dir=X`` moves the whole
sweep); run ``<point>`` is written to ``<sweep>/<point>/`` (e.g. ``method-yarn_factor-4``) by an ordinary
``train.py --resume auto`` with ``--set`` overrides, its log to ``<sweep>/logs/<point>.log``. A run is finished when
its ``sweep_run.json`` records the same overrides and its ``merged/`` model and eval results exist: a rerun skips it.
An interrupted run resumes from its newest complete checkpoint (train.py's ``--resume auto``). At the end
``eval.compare`` over every finished run writes ``compare.md``, ``compare.csv`` and the plots into the sweep folder,
and ``sweep.json`` records each run's status.

``--training-free`` evaluates the base model under each point's RoPE method and factor (each task of the base
config's ``eval:`` section as its command, ``python -m eval.<task> --rope/--factor``) into ``<sweep>/training-free/``;
linked keys that only affect training (``data.seq_len`` beside ``rope.factor``) are dropped there. A training sweep's
table also holds the rows of a training-free sweep already run into its folder, so that one table shows each method
with and without fine-tuning. ``results.md`` in the sweep folder is the results page: the command, the date, each
run's status and time, the table and the plots.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator

if __package__ in (None, ""):  # `python launch/sweep.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.schema import ConfigError, RunConfig, load_run_config, parse_overrides  # noqa: E402
from training.checkpoint import complete_checkpoints, public_config  # noqa: E402
from eval.registry import EVAL_TASKS, configured  # noqa: E402
from eval.task import settings_argv  # noqa: E402
from utils.cli import exit_process, free_port, run_cli  # noqa: E402
from utils.files import write_atomic  # noqa: E402
from utils.log import Log  # noqa: E402
from utils.schema import StrictModel, validate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MARKER = "sweep_run.json"
ROPE_KEYS = ("rope.method", "rope.factor")
log = Log("sweep")


class SweepError(ConfigError):
    """A sweep that cannot run; one line naming the problem and the fix."""


# ---------------------------------------------------------------------------------------------------- the config


class Launcher(StrictModel):
    kind: Literal["python", "deepspeed", "torchrun"] = "python"
    """How each run starts: `python train.py` (one process), the `deepspeed` launcher, or `torchrun`."""
    nproc: int = Field(default=1, ge=1)
    """Processes (GPUs) per run."""
    parallel: int = Field(default=1, ge=1)
    """Runs at once; on GPUs each gets its own `nproc` devices (`--parallel` overrides it)."""
    devices: list[int] | None = None
    """GPU ids shared out among parallel runs; default: every visible GPU."""


class SweepConfig(StrictModel):
    name: str
    """The sweep's name: the W&B group of its runs."""
    base: str
    """The run config every point starts from."""
    grid: dict[str, list[Any]]
    """Dotted config keys to the values to sweep; one run per combination. A key naming several config keys,
    comma-separated, takes lists of one value per key (linked values)."""
    overrides: dict[str, Any] = {}
    """Dotted config keys set in every run (before `--set` from the command line)."""
    launcher: Launcher = Launcher()

    @field_validator("name")
    @classmethod
    def _slug(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", v):
            raise ValueError(f"must be letters, digits, '.', '_' or '-' (it names a W&B group), got '{v}'")
        return v

    @field_validator("grid")
    @classmethod
    def _grid(cls, v: dict) -> dict:
        if not v:
            raise ValueError("is empty; give at least one key with a list of values")
        for key, values in v.items():
            if not values:
                raise ValueError(f"'{key}' has no values")
            if len({json.dumps(x, sort_keys=True) for x in values}) != len(values):
                raise ValueError(f"'{key}' lists a value twice")
            keys = linked_keys(key)
            if len(keys) > 1 and any(not isinstance(x, list) or len(x) != len(keys) for x in values):
                raise ValueError(f"'{key}' links {len(keys)} keys: each value must be a list of {len(keys)} values, "
                                 f"e.g. [{', '.join('...' for _ in keys)}]")
        return v


def linked_keys(grid_key: str) -> list[str]:
    """``"rope.factor,data.seq_len"`` -> ``["rope.factor", "data.seq_len"]``; a plain key -> ``[key]``."""
    return [k.strip() for k in grid_key.split(",")]


def _is_rope_key(key: str) -> bool:
    return key in ROPE_KEYS or key.startswith("rope.params.")


def expand_point(point: dict[str, Any], training_free: bool = False) -> dict[str, Any]:
    """A grid point (grid key -> value) as dotted config key -> value. Training-free points keep only the RoPE keys
    of linked entries (the rest, such as ``data.seq_len``, only affect training)."""
    out: dict[str, Any] = {}
    for grid_key, value in point.items():
        keys = linked_keys(grid_key)
        pairs = zip(keys, value) if len(keys) > 1 else [(grid_key, value)]
        out.update((k, v) for k, v in pairs if not (training_free and len(keys) > 1 and not _is_rope_key(k)))
    return out


def load_sweep(path: str | Path) -> SweepConfig:
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep config not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SweepError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    try:
        return validate(SweepConfig, raw, SweepError, "sweep key")
    except SweepError as e:
        raise SweepError(f"{path}: {e}") from None


# ------------------------------------------------------------------------------------------------------- the runs


def yaml_value(value: Any) -> str:
    """A value as one line of YAML, the form ``--set key=value`` parses back (``yarn``, ``4``, ``[a, b]``)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**9).strip().removesuffix("...").strip()


def _label(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = value if isinstance(value, str) else yaml_value(value)
    return re.sub(r"[^A-Za-z0-9._]+", "-", str(text)).strip("-")


def run_name(point: dict[str, Any]) -> str:
    """``{"rope.method": "yarn", "rope.factor": 4.0}`` -> ``method-yarn_factor-4`` (last key part, full key where two
    keys share it)."""
    short = [k.rsplit(".", 1)[-1] for k in point]
    names = [s if short.count(s) == 1 else k.replace(".", "-") for k, s in zip(point, short)]
    return "_".join(f"{n}-{_label(v)}" for n, v in zip(names, point.values()))


@dataclass
class Run:
    name: str
    point: dict[str, Any]
    folder: Path
    base: str  # the run config path
    sets: list[str]  # every --set of this run, in order
    cfg: RunConfig


@dataclass
class Sweep:
    config: SweepConfig
    folder: Path
    runs: list[Run]
    training_free: bool


def plan_sweep(sc: SweepConfig, cli_sets: list[str], training_free: bool = False,
               only: dict[str, Any] | None = None) -> Sweep:
    """Resolve every run's config (all validated before anything starts)."""
    base_sets = [f"{k}={yaml_value(v)}" for k, v in sc.overrides.items()] + list(cli_sets)
    set_keys = {k for k, _ in parse_overrides(base_sets)}
    for key in (k for grid_key in sc.grid for k in linked_keys(grid_key)):
        if key in set_keys:
            raise SweepError(f"'{key}' is both a grid key and an override (--set or overrides:); drop one")
        if key in ("output.dir", "wandb.group"):
            raise SweepError(f"grid key '{key}' is set by the sweep itself; choose another key")
    if training_free:
        bad = [k for k in sc.grid if not any(_is_rope_key(x) for x in linked_keys(k))]
        if bad:
            raise SweepError(f"--training-free evaluates the base model, so the grid may only hold rope.method, "
                             f"rope.factor and rope.params.*; drop {', '.join(bad)}")
    try:
        base = load_run_config(sc.base, base_sets)
    except ConfigError as e:
        raise SweepError(f"base config {sc.base}: {e}") from None
    folder = Path(base.output.dir) / ("training-free" if training_free else "")
    points = [dict(zip(sc.grid, values)) for values in itertools.product(*sc.grid.values())]
    if only is not None:
        if set(only) != set(sc.grid):
            raise SweepError(f"--point needs exactly the grid keys {', '.join(sc.grid)}; got {', '.join(only)}")
        points = [{k: only[k] for k in sc.grid}]
    runs = []
    # the sweep sets each run's folder and W&B group itself (last, so they win)
    kept = [s for s, (k, _) in zip(base_sets, parse_overrides(base_sets)) if k not in ("output.dir", "wandb.group")]
    for grid_point in points:
        # a linked entry is named by its first key ("method-yarn_factor-8", not every linked value)
        name = run_name({linked_keys(k)[0]: (v[0] if len(linked_keys(k)) > 1 else v) for k, v in grid_point.items()})
        point = expand_point(grid_point, training_free)
        sets = kept + [f"{k}={yaml_value(v)}" for k, v in point.items()] + [
            f"output.dir={folder / name}", f"wandb.group={sc.name}"]
        try:
            cfg = load_run_config(sc.base, sets)
        except ConfigError as e:
            raise SweepError(f"run {name}: {e}") from None
        if training_free and cfg.eval is None:
            raise SweepError(f"--training-free needs an eval: section in {sc.base} (or in overrides:)")
        runs.append(Run(name, point, folder / name, sc.base, sets, cfg))
    if len({r.name for r in runs}) != len(runs):
        raise SweepError("two grid points give the same run name; make the values differ after slugging")
    return Sweep(sc, folder, runs, training_free)


def eval_commands(run: Run) -> list[list[str]]:
    """Training-free: the eval CLI commands of one point (base model, RoPE method and factor applied)."""
    cfg, e = run.cfg, run.cfg.eval
    if cfg.model.arch or cfg.model.tokenizer or cfg.model.init == "scratch":
        raise SweepError("--training-free evaluates the base model as the eval CLIs load it; model.arch, "
                         "model.tokenizer and model.init: scratch are not supported there")
    model = ["--model", cfg.model.name, "--rope", cfg.rope.method, "--factor", str(cfg.rope.factor),
             "--out", str(run.folder)]
    if cfg.rope.params:
        model += ["--rope-params", json.dumps(cfg.rope.params)]
    if cfg.rope.original_len:
        model += ["--original-len", str(cfg.rope.original_len)]
    commands = [["-m", task.module, *model, *settings_argv(settings)] for task, settings in configured(e)]
    if not commands:
        raise SweepError("--training-free: the eval: section names no task (one of "
                         f"{', '.join('eval.' + name for name in EVAL_TASKS)})")
    return commands


def signature(run: Run, training_free: bool) -> dict:
    """What a finished run's marker must match to be skipped."""
    if training_free:
        return {"mode": "training-free", "commands": eval_commands(run)}
    return {"mode": "train", "sets": run.sets}


def results_folder(run: Run, training_free: bool) -> Path:
    """Where eval.compare finds this run's results."""
    return run.folder if training_free else run.folder / "eval"


def is_finished(run: Run, training_free: bool) -> bool:
    marker = run.folder / MARKER
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text())["signature"]
    except (json.JSONDecodeError, KeyError):
        return False
    if recorded != signature(run, training_free):
        return False
    if not training_free and not (run.folder / "merged" / "config.json").is_file():
        return False
    found = results_folder(run, training_free)
    return all(any(found.rglob(task.result_file)) for task, _ in configured(run.cfg.eval))


def state_of(run: Run, training_free: bool) -> str:
    """finished | resumes from step-N | new."""
    if is_finished(run, training_free):
        return "finished"

    complete = [] if training_free else complete_checkpoints(run.folder)
    return f"resumes from {complete[-1].name}" if complete else "new"


# ------------------------------------------------------------------------------------------------------ launching


def _tool(name: str) -> str:
    """A console script of this environment (deepspeed, torchrun), else whatever PATH has."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


def train_command(run: Run, launcher: Launcher, devices: list[int] | None) -> list[str]:
    """The train.py command line of one run; ``devices`` are this run's GPUs (None on a CPU machine)."""
    args = [str(ROOT / "train.py"), "--config", run.base, *[a for s in run.sets for a in ("--set", s)],
            "--resume", "auto"]
    if launcher.kind == "python":
        return [sys.executable, *args]
    port = str(free_port())  # parallel runs on one machine need one rendezvous port each
    if launcher.kind == "deepspeed":
        # The deepspeed launcher ignores CUDA_VISIBLE_DEVICES once told how many GPUs to use: name them instead.
        where = (["--include", "localhost:" + ",".join(map(str, devices))] if devices
                 else ["--num_gpus", str(launcher.nproc)])
        return [_tool("deepspeed"), *where, "--master_port", port, *args]
    return [_tool("torchrun"), "--nproc_per_node", str(launcher.nproc), "--master_port", port, *args]


def run_commands(run: Run, sweep: Sweep, devices: list[int] | None) -> list[list[str]]:
    if sweep.training_free:
        return [[sys.executable, *cmd] for cmd in eval_commands(run)]
    return [train_command(run, sweep.config.launcher, devices)]


def device_slots(launcher: Launcher, parallel: int) -> list[list[int] | None]:
    """One device group per parallel slot: ``nproc`` GPUs each, or None for every slot on a CPU machine."""
    devices = launcher.devices
    if devices is None:
        import torch

        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    if not devices:
        return [None] * parallel
    need = parallel * launcher.nproc
    if len(devices) < need:
        raise SweepError(f"{parallel} parallel run(s) x {launcher.nproc} GPU(s) need {need} GPUs, {len(devices)} "
                         "available; lower --parallel or launcher.nproc")
    return [devices[k * launcher.nproc:(k + 1) * launcher.nproc] for k in range(parallel)]


def _child_env() -> dict[str, str]:
    """The environment of every child: this one, unbuffered, with the repository importable (``-m eval.*``)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


class _Children:
    """The subprocesses running now, so that a SIGTERM (or Ctrl-C) to the sweep reaches the running train.py."""

    def __init__(self):
        self.procs: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.stopping = False

    def forward(self, signum, _frame):
        self.stopping = True
        with self.lock:
            for p in self.procs:
                p.send_signal(signum)


def execute_run(run: Run, sweep: Sweep, devices: list[int] | None, parallel: int, children: _Children) -> dict:
    """Run one point to completion (or failure); write its marker when every command succeeded."""
    record = {"name": run.name, "point": run.point, "folder": str(run.folder)}
    if children.stopping:
        return dict(record, status="not started")
    env = _child_env()
    launcher = sweep.config.launcher
    if devices is None and "OMP_NUM_THREADS" not in env:
        # CPU: share the cores among the parallel runs' processes (oversubscribed threads cost 30x, docs/notes.md)
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // (parallel * launcher.nproc)))
    elif devices is not None and launcher.kind != "deepspeed":
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, devices))
    log_path = sweep.folder / "logs" / f"{run.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    log(f"start {run.name} ({state_of(run, sweep.training_free)}); log {log_path}")
    with open(log_path, "a") as logfile:
        for cmd in run_commands(run, sweep, devices):
            logfile.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
            logfile.flush()
            with children.lock:
                if children.stopping:
                    return dict(record, status="interrupted")
                proc = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, env=env)
                children.procs.add(proc)
            rc = proc.wait()
            with children.lock:
                children.procs.discard(proc)
            if rc != 0:
                tail = [ln for ln in log_path.read_text().splitlines() if ln.strip()][-1:] or [""]
                status = "interrupted" if children.stopping else "failed"
                log(f"{status.upper()} {run.name} (exit {rc}): {tail[0][:300]}  log: {log_path}")
                return dict(record, status=status, exit_code=rc, seconds=round(time.monotonic() - start, 1))
    seconds = round(time.monotonic() - start, 1)
    write_atomic(run.folder / MARKER, json.dumps({"signature": signature(run, sweep.training_free),
                                                   "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                                   "seconds": seconds}, indent=1) + "\n")
    log(f"done {run.name} ({seconds} s)")
    return dict(record, status="finished", seconds=seconds)


def execute(sweep: Sweep, parallel: int, compare: bool = True, command: str = "") -> int:
    """Run every unfinished point (``parallel`` at a time), then compare and write the results page; returns the
    exit status. ``command`` is the command line the page names."""
    slots = device_slots(sweep.config.launcher, parallel)
    children = _Children()
    previous = {s: signal.signal(s, children.forward) for s in (signal.SIGTERM, signal.SIGINT)}
    log(f"{sweep.config.name}: {len(sweep.runs)} run(s) in {sweep.folder}"
         + (" (training-free)" if sweep.training_free else f" (W&B group {sweep.config.name})"))
    records: dict[str, dict] = {}
    todo = []
    for run in sweep.runs:
        if is_finished(run, sweep.training_free):
            log(f"skip {run.name}: finished")
            earlier = json.loads((run.folder / MARKER).read_text())
            records[run.name] = {"name": run.name, "point": run.point, "folder": str(run.folder),
                                 "status": "finished", "skipped": True, "seconds": earlier.get("seconds")}
        else:
            todo.append(run)
    free = list(range(len(slots)))
    free_lock = threading.Lock()

    def one(run: Run) -> dict:
        with free_lock:
            slot = free.pop()
        try:
            return execute_run(run, sweep, slots[slot], parallel, children)
        finally:
            with free_lock:
                free.append(slot)

    try:
        with ThreadPoolExecutor(max_workers=len(slots)) as pool:
            for record in pool.map(one, todo):
                records[record["name"]] = record
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    ordered = [records[r.name] for r in sweep.runs]
    status = 0 if all(r["status"] == "finished" for r in ordered) else 1
    summary = {"name": sweep.config.name, "folder": str(sweep.folder),
               "mode": "training-free" if sweep.training_free else "train", "runs": ordered, "compare": None}
    if compare and not children.stopping:
        summary["compare"], ok = compare_runs(sweep)
        status = status or (0 if ok else 1)
        if summary["compare"]:
            write_atomic(sweep.folder / "results.md", results_page(sweep, ordered, command))
    write_atomic(sweep.folder / "sweep.json", json.dumps(summary, indent=1) + "\n")
    failed = [r["name"] for r in ordered if r["status"] != "finished"]
    log(f"{len(ordered) - len(failed)}/{len(ordered)} run(s) finished" + (f"; not finished: {', '.join(failed)}"
                                                                         if failed else ""))
    if children.stopping:
        return 128 + signal.SIGTERM
    return status


def _training_free_folders(sweep: Sweep) -> list[Path]:
    """Finished points of a ``--training-free`` sweep run into this training sweep's folder (their rows join the
    table, so that each method shows with and without fine-tuning)."""
    tf = sweep.folder / "training-free"
    if sweep.training_free or not tf.is_dir():
        return []
    return [d for d in sorted(tf.iterdir()) if (d / MARKER).is_file()]


def compare_runs(sweep: Sweep) -> tuple[list[str] | None, bool]:
    """``eval.compare`` over the finished runs' results into the sweep folder: (files written, ok)."""
    folders = [str(results_folder(r, sweep.training_free)) for r in sweep.runs
               if is_finished(r, sweep.training_free) and configured(r.cfg.eval)]
    folders += [str(d) for d in _training_free_folders(sweep)]
    if not folders:
        log("no finished run has eval results (no eval: section?); no comparison table")
        return None, True
    cmd = [sys.executable, "-m", "eval.compare", *folders, "--out", str(sweep.folder), "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_child_env())
    if r.returncode != 0:
        log(f"eval.compare failed (exit {r.returncode}): {(r.stderr.strip().splitlines() or [''])[-1]}")
        return None, False
    files = json.loads(r.stdout.strip().splitlines()[-1])["files"]
    log(f"comparison of {len(folders)} run(s): {', '.join(files)}")
    return files, True


def results_page(sweep: Sweep, records: list[dict], command: str) -> str:
    """``results.md``: the command and date, each run's status and time, then eval.compare's table and plots, as the
    sweep wrote them (nothing typed by hand)."""
    mode = "training-free" if sweep.training_free else "train"
    gpus = _gpu_names()
    lines = [f"# Sweep `{sweep.config.name}` ({mode})", "",
             f"Written by `{command}` on {time.strftime('%Y-%m-%d %H:%M %Z')} ({os.cpu_count()} CPU cores, "
             + (gpus or "no GPU") + f"); base config `{sweep.config.base}`.", ""]
    tf = _training_free_folders(sweep)
    if tf:
        lines += [f"Rows with fine_tuned = no: the base model under each method, from the `--training-free` sweep in "
                  f"`{tf[0].parent}` ({len(tf)} point(s)).", ""]
    lines += ["| run | status | seconds |", "|---|---|---|"]
    lines += [f"| {r['name']} | {r['status']}{' (by an earlier run)' if r.get('skipped') else ''} | "
              f"{r.get('seconds') or ''} |" for r in records]
    lines += ["", (sweep.folder / "compare.md").read_text().rstrip(), ""]
    lines += [f"![{name}]({name}.png)" for name in EVAL_TASKS if (sweep.folder / f"{name}.png").is_file()]
    return "\n".join(lines) + "\n"


def _gpu_names() -> str:
    import torch

    if not torch.cuda.is_available():
        return ""
    return ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))


# ------------------------------------------------------------------------------------------------ dry run, W&B


def dry_run(sweep: Sweep, gpu_mem_gib: float) -> str:
    """Each run's state and command; for training runs each one's memory total, then the resolved config and full
    memory plan of the run that needs the most."""
    from training.memory import format_plan, plan_memory

    launcher = sweep.config.launcher
    lines = [f"sweep {sweep.config.name}: {len(sweep.runs)} run(s) in {sweep.folder}; launcher {launcher.kind} x "
             f"{launcher.nproc} process(es), {launcher.parallel} at a time"]
    plans = {}
    for run in sweep.runs:
        lines.append(f"  {run.name}: {state_of(run, sweep.training_free)}")
        for cmd in run_commands(run, sweep, None):
            lines.append(f"    {shlex.join(cmd)}")
        if not sweep.training_free:
            plans[run.name] = plan = plan_memory(run.cfg, launcher.nproc, gpu_mem_gib)
            lines.append(f"    memory per GPU {plan.total / 2**30:.3f} GiB: "
                         f"{'fits' if plan.fits else 'does NOT fit'} in {gpu_mem_gib:g} GiB")
    if plans:
        name = max(plans, key=lambda n: plans[n].total)
        run = next(r for r in sweep.runs if r.name == name)
        resolved = yaml.safe_dump(public_config(run.cfg), sort_keys=False)
        lines += ["", f"resolved config of {name} (the largest memory plan):", resolved, format_plan(plans[name])]
    return "\n".join(lines)


def sweep_metric(sweep: Sweep, metric: str | None) -> dict:
    """The W&B sweep's objective: ``metric`` (``eval/<metric>`` of a task every run's in-run evaluation logs, its
    ``goal`` saying minimize or maximize; or ``loss``: minimize, though not comparable across scale factors), by
    default the ``objective`` of the first task configured (registry order). train.py writes every metric into the
    W&B run's summary."""
    if metric == "loss":
        return {"name": "loss", "goal": "minimize"}
    goals = [{m: task.goal for task, s in configured(r.cfg.eval) for m in task.metrics(s)} for r in sweep.runs]
    common = {m: g for m, g in goals[0].items() if all(m in other for other in goals)}
    if metric is None:
        first = next(((task, s) for task, s in configured(sweep.runs[0].cfg.eval) if task.objective), None)
        if first is None:
            raise SweepError("the W&B sweep needs a metric every run evaluates: add an eval: task section ("
                             f"{', '.join('eval.' + name for name in EVAL_TASKS)}) with the target length to the "
                             "runs' config, or pass --metric loss")
        metric = f"eval/{first[0].objective(first[1])}"
        if metric.removeprefix("eval/") not in common:
            raise SweepError(f"the default objective {metric} (the first run's {first[0].name} task) is not evaluated "
                             "by every run; pass --metric with one they all evaluate (choices: "
                             f"{', '.join('eval/' + m for m in common) or 'none'}) or loss")
    name = metric.removeprefix("eval/")
    if not metric.startswith("eval/") or name not in common:
        choices = ", ".join(f"eval/{m}" for m in common) or "none: the runs have no eval: task in common"
        raise SweepError(f"--metric must be a metric every run evaluates or loss; got '{metric}' (choices: "
                         f"{choices})")
    return {"name": metric, "goal": common[name]}


def wandb_sweep_yaml(sc: SweepConfig, sweep_path: str, cli_sets: list[str], metric: dict) -> str:
    """A W&B sweep (grid) whose agent runs each point through this script, so that folders, overrides and the
    W&B group are the same as in a plain sweep run; ``metric`` from ``sweep_metric``."""
    doc = {
        "name": sc.name,
        "program": "launch/sweep.py",
        "method": "grid",
        "metric": metric,
        "parameters": {k: {"values": list(v)} for k, v in sc.grid.items()},
        "command": ["${env}", "${interpreter}", "${program}", "--config", sweep_path,
                    *[a for s in cli_sets for a in ("--set", s)], "--point", "${args_no_hyphens}"],
    }
    return yaml.safe_dump(doc, sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python launch/sweep.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="sweep YAML (see configs/sweeps/)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a run-config key in every run, e.g. --set output.dir=runs/sweeps/x")
    ap.add_argument("--parallel", type=int, default=None, help="runs at once (default: launcher.parallel)")
    ap.add_argument("--training-free", action="store_true", help="evaluate the base model only, no training")
    ap.add_argument("--dry-run", action="store_true", help="print runs, commands, configs and memory plans")
    ap.add_argument("--gpu-mem-gib", type=float, default=80.0, help="GPU memory for --dry-run's plans")
    ap.add_argument("--emit-wandb-sweep", metavar="OUT.yaml", help="write a W&B sweep YAML and exit")
    ap.add_argument("--metric", default=None, metavar="NAME",
                    help="the W&B sweep's objective: eval/<metric> of a task the runs evaluate (the metric names of "
                         "its summary.json; default: the objective of the first configured task, e.g. the score at "
                         "the longest length), or loss")
    ap.add_argument("--point", nargs="+", metavar="KEY=VALUE",
                    help="run only this grid point (what the W&B sweep's agent calls)")
    args = ap.parse_args(argv)
    return run_cli(lambda _: run_sweep(args, argv))


def run_sweep(args: argparse.Namespace, argv: list[str] | None) -> int:
    """The command, after its arguments are parsed."""
    sc = load_sweep(args.config)
    parallel = args.parallel or sc.launcher.parallel
    if parallel < 1:
        raise SweepError(f"--parallel must be >= 1, got {parallel}")
    if sc.launcher.kind == "python" and sc.launcher.nproc != 1:
        raise SweepError("launcher.kind python runs one process; use deepspeed or torchrun for nproc > 1")
    only = dict(parse_overrides(args.point)) if args.point else None
    sweep = plan_sweep(sc, args.set, args.training_free, only)
    if args.emit_wandb_sweep:
        metric = sweep_metric(sweep, args.metric)
        write_atomic(Path(args.emit_wandb_sweep), wandb_sweep_yaml(sc, args.config, args.set, metric))
        log(f"wrote {args.emit_wandb_sweep}: `wandb sweep {args.emit_wandb_sweep}`, then `wandb agent <id>`")
        return 0
    if args.dry_run:
        print(dry_run(sweep, args.gpu_mem_gib))
        return 0
    sweep.folder.mkdir(parents=True, exist_ok=True)
    if only is None:
        write_atomic(sweep.folder / "sweep.yaml", yaml.safe_dump(sc.model_dump(), sort_keys=False))
    command = shlex.join(["python", "launch/sweep.py", *(sys.argv[1:] if argv is None else argv)])
    return execute(sweep, parallel, compare=only is None, command=command)


if __name__ == "__main__":
    exit_process(main())
