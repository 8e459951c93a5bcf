"""launch/sweep.py: grid expansion, validation and commands (fast), then real sweeps of train.py runs on the tiny
model (slow): 3 methods x 2 factors end to end with the table and plots, a rerun that skips everything, a sweep
killed mid-run and restarted that reproduces the uninterrupted results, an eval-only sweep, and the W&B sweep file."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from configs.schema import parse_overrides
from launch.sweep import (
    Launcher,
    SweepError,
    device_slots,
    eval_commands,
    load_sweep,
    plan_sweep,
    run_name,
    train_command,
    yaml_value,
)
from launch.sweep import main as sweep_main  # in-process: the CLI without a new interpreter
from tests.helpers import losses

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "configs/sweeps/cpu_tiny.yaml"


# ------------------------------------------------------------------------------------------------ fast: planning


def test_grid_gives_one_run_per_point_with_the_sweep_folder_group_and_overrides(tmp_path):
    sweep = plan_sweep(load_sweep(SWEEP), [f"output.dir={tmp_path}/s", "train.seed=3"])
    assert [r.name for r in sweep.runs] == [
        "method-linear_factor-2", "method-linear_factor-4", "method-ntk_aware_factor-2",
        "method-ntk_aware_factor-4", "method-yarn_factor-2", "method-yarn_factor-4"]
    assert sweep.folder == tmp_path / "s"
    for run in sweep.runs:
        cfg = run.cfg
        assert (cfg.rope.method, cfg.rope.factor) == (run.point["rope.method"], run.point["rope.factor"])
        assert Path(cfg.output.dir) == tmp_path / "s" / run.name
        assert cfg.wandb.group == "cpu_tiny" and cfg.train.seed == 3 and cfg.train.max_steps == 6
        assert cfg.eval.passkey.lengths == [512, 1024]


def test_set_values_round_trip_through_yaml():
    for value in ["yarn", 4, 2.5, True, None, [1, 2], {"a": [0.5, "x"]}, "yes", "1e3", "a: b"]:
        assert parse_overrides([f"k={yaml_value(value)}"]) == [("k", value)]


def test_run_names():
    assert run_name({"rope.method": "ntk_by_parts", "rope.factor": 8.0}) == "method-ntk_by_parts_factor-8"
    assert run_name({"rope.factor": 2.5, "train.lr": 1e-4}) == "factor-2.5_lr-0.0001"
    assert run_name({"rope.params.alpha": 1, "x.alpha": 2}) == "rope-params-alpha-1_x-alpha-2"


@pytest.mark.parametrize("text,sets,message", [
    ("grid: {rope.method: []}", [], "grid: 'rope.method' has no values"),
    ("grid: {rope.factor: [2, 2]}", [], "lists a value twice"),
    ("grid: {rope.factor: [2]}\nbogus: 1", [], "unknown sweep key 'bogus'; valid keys: "),
    ("grid: {rope.factor: [2]}", ["rope.factor=3"], "'rope.factor' is both a grid key and an override"),
    ("grid: {rope.factr: [2]}", [], "unknown config key 'rope.factr'; did you mean 'rope.factor'?"),
    ("grid: {rope.factor: [0.5]}", [], "run factor-0.5: rope"),
    ("grid: {output.dir: [a, b]}", [], "set by the sweep itself"),
])
def test_bad_sweeps_fail_with_one_line(tmp_path, text, sets, message):
    path = tmp_path / "s.yaml"
    path.write_text(f"name: s\nbase: configs/cpu_tiny.yaml\n{text}\n")
    with pytest.raises(SweepError) as err:
        plan_sweep(load_sweep(path), sets)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_training_free_grid_only_takes_rope_keys_and_builds_eval_commands(tmp_path):
    sc = load_sweep(SWEEP)
    sweep = plan_sweep(sc, [f"output.dir={tmp_path}"], training_free=True)
    assert sweep.folder == tmp_path / "training-free"
    ppl, pk = eval_commands(sweep.runs[-1])
    assert ppl[:10] == ["-m", "eval.perplexity", "--model", "tiny-llama", "--rope", "yarn", "--factor", "4.0",
                        "--out", str(tmp_path / "training-free" / "method-yarn_factor-4")]
    assert ppl[-4:] == ["--lengths", "256,512,1024", "--mode", "truncate"]
    assert pk[1] == "eval.passkey" and "512,1024" in pk
    bad = sc.model_copy(update={"grid": {"rope.factor": [2], "train.lr": [1e-3]}})
    with pytest.raises(SweepError, match="drop train.lr"):
        plan_sweep(bad, [], training_free=True)


@pytest.mark.parametrize("path", sorted((ROOT / "configs/sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_every_sweep_config_plans_in_both_modes_and_opens_with_its_command(path, tmp_path):
    head = path.read_text().splitlines()[:2]
    assert head[0].startswith("# Launch:") and str(path.relative_to(ROOT)) in head[0]
    assert head[1].startswith("# Override:") and "--set" in head[1]
    sc = load_sweep(path)
    assert plan_sweep(sc, [f"output.dir={tmp_path}"]).runs
    assert plan_sweep(sc, [f"output.dir={tmp_path}"], training_free=True).runs


def test_linked_grid_keys_change_together_and_training_free_keeps_their_rope_keys(tmp_path):
    sc = load_sweep(ROOT / "configs/sweeps/testbed.yaml")
    runs = plan_sweep(sc, [f"output.dir={tmp_path}"]).runs
    assert [r.name for r in runs][:2] == ["method-linear_factor-4", "method-linear_factor-8"] and len(runs) == 8
    assert {(r.cfg.rope.factor, r.cfg.data.seq_len, r.cfg.train.micro_batch_size) for r in runs} == {
        (4.0, 4096, 1), (8.0, 8192, 1)}
    free = plan_sweep(sc, [f"output.dir={tmp_path}"], training_free=True).runs
    assert [r.name for r in free] == [r.name for r in runs]
    assert all(not any(s.startswith(("data.seq_len=", "train.micro")) for s in r.sets) for r in free)
    assert {r.cfg.rope.factor for r in free} == {4.0, 8.0}
    bad = sc.model_copy(update={"grid": {"train.lr,train.seed": [[1e-3, 1]]}})
    with pytest.raises(SweepError, match="drop train.lr,train.seed"):
        plan_sweep(bad, [], training_free=True)


def test_a_linked_value_must_give_one_value_per_key(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\nbase: configs/cpu_tiny.yaml\ngrid: {'rope.factor,data.seq_len': [[2, 512], [4]]}\n")
    with pytest.raises(SweepError, match=r"links 2 keys: each value must be a list of 2 values") as err:
        load_sweep(path)
    assert "\n" not in str(err.value)


def test_launch_commands_and_gpu_slots(tmp_path):
    run = plan_sweep(load_sweep(SWEEP), [f"output.dir={tmp_path}"]).runs[0]
    ds = train_command(run, Launcher(kind="deepspeed", nproc=2), [2, 3])
    assert ds[1:3] == ["--include", "localhost:2,3"] and ds[3] == "--master_port"
    assert ds[5].endswith("train.py") and ds[-2:] == ["--resume", "auto"]
    tr = train_command(run, Launcher(kind="torchrun", nproc=4), None)
    assert tr[1:3] == ["--nproc_per_node", "4"] and "--set" in tr
    assert device_slots(Launcher(nproc=2, devices=[0, 1, 2, 3]), 2) == [[0, 1], [2, 3]]
    with pytest.raises(SweepError, match="need 6 GPUs, 4 available"):
        device_slots(Launcher(nproc=3, devices=[0, 1, 2, 3]), 2)
    assert device_slots(Launcher(devices=[]), 3) == [None, None, None]


# ------------------------------------------------------------------------------------------- slow: real sweeps


def _env():
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def _sweep(*args, config=SWEEP, check=True):
    r = subprocess.run([sys.executable, "launch/sweep.py", "--config", str(config), *args], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=900)
    if check and r.returncode != 0:
        raise AssertionError(f"sweep failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r



def _table(folder: Path) -> dict[tuple, dict]:
    """compare.csv keyed by (method, factor), without the columns that name folders."""
    with open(folder / "compare.csv") as f:
        return {(r["method"], float(r["factor"])): {k: v for k, v in r.items() if k not in ("run", "model")}
                for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def full_sweep(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep") / "cpu_tiny"
    r = _sweep("--set", f"output.dir={folder}", "--parallel", "2")
    return folder, r


@pytest.mark.slow
def test_cpu_sweep_of_three_methods_by_two_factors_writes_table_and_plots(full_sweep):
    folder, r = full_sweep
    table = _table(folder)
    assert set(table) == {(m, f) for m in ("linear", "ntk_aware", "yarn") for f in (2.0, 4.0)}
    for row in table.values():
        assert row["fine_tuned"] == "True"
        assert all(float(row[f"ppl@{L}"]) > 1 for L in (256, 512, 1024))
        assert row["passkey@512"] != "" and row["passkey@1024"] != ""
    assert (folder / "perplexity.png").stat().st_size > 1000 and (folder / "passkey.png").stat().st_size > 1000
    summary = json.loads((folder / "sweep.json").read_text())
    assert [x["status"] for x in summary["runs"]] == ["finished"] * 6
    for run in (folder / x["name"] for x in summary["runs"]):
        saved = yaml.safe_load((run / "config.yaml").read_text())
        assert saved["wandb"]["group"] == "cpu_tiny" and saved["output"]["dir"] == str(run)
        assert len(losses(run)) == 6 and (run / "merged" / "config.json").is_file()
        # the in-run evaluation's summary metrics: in eval/summary.json and in the W&B run (its summary)
        summary = json.loads((run / "eval" / "summary.json").read_text())
        assert set(summary) == {"eval/ppl@256", "eval/ppl@512", "eval/ppl@1024", "eval/passkey@512",
                                "eval/passkey@1024", "eval/passkey_all"}
        row = table[(saved["rope"]["method"], float(saved["rope"]["factor"]))]
        assert summary["eval/ppl@1024"] == float(row["ppl@1024"])
        [wandb_file] = (run / "wandb").glob("offline-run-*/run-*.wandb")
        assert b"eval/ppl@1024" in wandb_file.read_bytes() and b"eval/passkey@1024" in wandb_file.read_bytes()
    # the scaling is the run's: factor 4 runs export a config that says so
    merged = json.loads((folder / "method-yarn_factor-4" / "merged" / "config.json").read_text())
    assert merged["rope_parameters"]["factor"] == 4.0


@pytest.mark.slow
def test_rerun_skips_every_finished_run(full_sweep):
    folder, _ = full_sweep
    logs = {p: p.stat().st_size for p in (folder / "logs").glob("*.log")}
    markers = {p: p.stat().st_mtime_ns for p in folder.glob("*/sweep_run.json")}
    before = _table(folder)
    r = _sweep("--set", f"output.dir={folder}")
    assert len(re.findall(r"\[sweep \d+s\] skip ", r.stdout)) == 6 and not re.search(r"\[sweep \d+s\] start ", r.stdout)
    assert {p: p.stat().st_size for p in logs} == logs  # no run was launched
    assert {p: p.stat().st_mtime_ns for p in markers} == markers
    assert _table(folder) == before  # the table is rebuilt from the same results


@pytest.mark.slow
def test_sweep_killed_mid_run_and_restarted_gives_the_same_results(full_sweep, tmp_path):
    reference, _ = full_sweep
    # One of the six points (same settings, so the same run as in the full sweep), killed while it trains.
    spec = yaml.safe_load(SWEEP.read_text())
    spec["grid"] = {"rope.method": ["yarn"], "rope.factor": [4]}
    config = tmp_path / "one.yaml"
    config.write_text(yaml.safe_dump(spec, sort_keys=False))
    folder = tmp_path / "one"
    victim = folder / "method-yarn_factor-4"
    sets = ["--set", f"output.dir={folder}", "--set", "wandb.enabled=false"]
    proc = subprocess.Popen([sys.executable, "launch/sweep.py", "--config", str(config), *sets], cwd=ROOT,
                            env=_env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        metrics = victim / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:  # past the step-2 checkpoint
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the sweep ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its train.py, as a node failure would
    proc.wait()
    assert not (victim / "sweep_run.json").exists() and not (victim / "merged").exists()
    assert list((victim / "checkpoints").glob("step-*"))

    r = _sweep(*sets, config=config)
    assert re.search(r"\[sweep \d+s\] start method-yarn_factor-4 \(resumes from step-", r.stdout)
    assert losses(victim) == losses(reference / victim.name)
    assert _table(folder) == {("yarn", 4.0): _table(reference)[("yarn", 4.0)]}
    assert re.search(r"\[sweep \d+s\] skip method-yarn_factor-4", _sweep(*sets, config=config).stdout)


@pytest.mark.slow
def test_training_free_sweep_evaluates_the_base_model(tmp_path):
    spec = yaml.safe_load(SWEEP.read_text())
    spec["grid"] = {"rope.method": ["linear", "yarn"], "rope.factor": [4]}
    config = tmp_path / "tf.yaml"
    config.write_text(yaml.safe_dump(spec, sort_keys=False))
    _sweep("--set", f"output.dir={tmp_path}", "--set", "eval.passkey=null", "--training-free", config=config)
    table = _table(tmp_path / "training-free")
    assert set(table) == {("linear", 4.0), ("yarn", 4.0)}
    assert all(row["fine_tuned"] == "False" for row in table.values())
    # different methods give different perplexities at 4x the native context
    assert table[("linear", 4.0)]["ppl@1024"] != table[("yarn", 4.0)]["ppl@1024"]
    assert not list(tmp_path.glob("training-free/*/merged"))

    # A training sweep into the same folder: its table and results page hold both kinds of rows.
    spec["grid"] = {"rope.method": ["yarn"], "rope.factor": [4]}
    config.write_text(yaml.safe_dump(spec, sort_keys=False))
    _sweep("--set", f"output.dir={tmp_path}", "--set", "eval.passkey=null", "--set", "wandb.enabled=false",
           config=config)
    with open(tmp_path / "compare.csv") as f:
        rows = {(r["method"], r["fine_tuned"]): r for r in csv.DictReader(f)}
    assert set(rows) == {("linear", "False"), ("yarn", "False"), ("yarn", "True")}
    assert rows[("yarn", "False")]["ppl@1024"] == table[("yarn", 4.0)]["ppl@1024"]
    page = (tmp_path / "results.md").read_text()
    assert f"python launch/sweep.py --config {config}" in page and "--training-free" in page
    assert "| method-yarn_factor-4 | finished |" in page and "![perplexity](perplexity.png)" in page
    assert page.count("| yarn |") == 2  # fine-tuned and training-free rows of eval.compare's table


@pytest.mark.slow
def test_emitted_wandb_sweep_runs_the_same_point_through_this_script(tmp_path, capsys):
    out = tmp_path / "wandb_sweep.yaml"
    args = ["--config", str(SWEEP), "--set", f"output.dir={tmp_path}/s", "--emit-wandb-sweep", str(out)]
    assert sweep_main(args) == 0
    doc = yaml.safe_load(out.read_text())
    assert doc["method"] == "grid" and doc["program"] == "launch/sweep.py"
    # the objective: by default the perplexity at the longest length the runs evaluate, not the training loss
    assert doc["metric"] == {"name": "eval/ppl@1024", "goal": "minimize"}
    assert sweep_main(args + ["--metric", "eval/passkey@512"]) == 0
    assert yaml.safe_load(out.read_text())["metric"] == {"name": "eval/passkey@512", "goal": "maximize"}
    for metric, message in [("eval/ruler@4096", "got 'eval/ruler@4096' (choices: eval/ppl@256, "),
                            ("accuracy", "--metric must be a metric every run evaluates or loss")]:
        assert sweep_main(args + ["--metric", metric]) == 2
        assert message in capsys.readouterr().err
    assert sweep_main(args) == 0
    assert doc["parameters"] == {"rope.method": {"values": ["linear", "ntk_aware", "yarn"]},
                                 "rope.factor": {"values": [2, 4]}}
    # what `wandb agent` runs for one point: ${args_no_hyphens} becomes key=value words
    command = [{"${env}": None, "${interpreter}": sys.executable, "${program}": doc["program"]}.get(a, a)
               for a in doc["command"]]
    command = [a for a in command if a is not None]
    i = command.index("${args_no_hyphens}")
    command[i:i + 1] = ["rope.method=ntk_aware", "rope.factor=4"]
    r = subprocess.run(command + ["--dry-run"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "1 run(s)" in r.stdout and "method-ntk_aware_factor-4: new" in r.stdout
    assert f"output.dir={tmp_path}/s/method-ntk_aware_factor-4" in r.stdout


def test_sweep_dry_run_prints_commands_configs_and_memory_plans(tmp_path, capsys):
    assert sweep_main(["--config", str(SWEEP), "--set", f"output.dir={tmp_path}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("memory per GPU") == 6 and "memory plan per GPU" in out
    assert "resolved config of" in out and "group: cpu_tiny" in out
    assert not any(tmp_path.iterdir())  # nothing ran, nothing was written
