"""The evaluation-task registry: each task's settings are one schema for the config section and the command line,
its declared metrics and files are what a real run reports and writes, old flat config keys are refused with the new
name, and adding a task is one module plus one registry line (a copy of the repository gets a toy task, and a
training run's evaluation, a sweep's table, compare's columns and a training-free sweep all show it)."""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from configs.schema import ConfigError, load_run_config
from eval.common import EvalError, load_eval_model
from eval.registry import EVAL_TASKS, TASK_MODULES, configured
from eval.task import EvalTask, add_settings_args, settings_argv, settings_from_args
from tests.helpers import train
from training.evaluate import evaluate_run

ROOT = Path(__file__).resolve().parents[1]

# Settings with every field away from its default, per task (a field added to a task must be added here); but
# perplexity's mode stays `sliding`, the default: stride and max_tokens are for that mode only.
NON_DEFAULT = {
    "perplexity": dict(lengths=[64, 128], mode="sliding", stride=32, data=[str(ROOT / "pyproject.toml")],
                       split="validation", text_field="body", max_docs=1, batch_size=2, chunk_size=64, buckets=4,
                       max_tokens=4096),
    "passkey": dict(lengths=[512], depths=[0.0, 0.75], trials=1, seed=7, max_new_tokens=8, shared_prefix=False),
    "ruler": dict(tasks=["niah_single", "vt"], lengths=[512], depths=[0.25], samples=1, seed=3, threshold=0.5,
                  chat_template=True, shared_prefix=False),
}


def parse(task, argv: list[str]):
    ap = argparse.ArgumentParser()
    add_settings_args(ap, task.settings)
    return settings_from_args(task.settings, ap.parse_args(argv))


def test_the_registry_lists_each_task_module_once():
    assert list(EVAL_TASKS) == ["perplexity", "passkey", "ruler"]
    assert [t.module for t in EVAL_TASKS.values()] == list(TASK_MODULES)
    assert all(t.files[0] == t.result_file == f"{name}.json" for name, t in EVAL_TASKS.items())


@pytest.mark.parametrize("name", list(EVAL_TASKS))
def test_settings_round_trip_through_the_command_line(name):
    task = EVAL_TASKS[name]
    assert set(NON_DEFAULT[name]) == set(task.settings.model_fields), "every field, off its default"
    settings = task.settings(**NON_DEFAULT[name])
    for field, value in NON_DEFAULT[name].items():
        if (name, field) != ("perplexity", "mode"):
            assert value != task.settings.model_fields[field].get_default(call_default_factory=True), field
    assert parse(task, settings_argv(settings)) == settings
    assert parse(task, []) == task.settings() and settings_argv(task.settings()) == []


def test_command_line_values_are_checked_with_the_option_named():
    passkey, perplexity = EVAL_TASKS["passkey"], EVAL_TASKS["perplexity"]
    for task, argv, message in [
        (passkey, ["--depths", "0,1.5"], "--depths: Input should be less than or equal to 1"),
        (passkey, ["--trials", "0"], "--trials: Input should be greater than or equal to 1"),
        (passkey, ["--lengths", "4k"], "--lengths: Input should be a valid integer"),
        (perplexity, ["--mode", "truncate", "--stride", "8"], "stride applies to mode sliding only"),
        (perplexity, ["--lengths", "64", "--stride", "64"], "stride must be below the shortest length (64)"),
        (perplexity, ["--lengths", "64", "--max-tokens", "32"], "max_tokens applies to mode sliding only"),
        (perplexity, ["--data", "no/such.txt"], "data file not found: no/such.txt"),
    ]:
        with pytest.raises(EvalError, match=message.replace("(", r"\(").replace(")", r"\)")):
            parse(task, argv)


def test_old_flat_eval_keys_are_refused_with_their_new_name(tmp_path):
    for name, task in EVAL_TASKS.items():
        for old, new in task.renamed.items():
            with pytest.raises(ConfigError) as e:
                load_run_config("configs/cpu_tiny.yaml", [f"eval.{old}=[512]"])
            assert str(e.value).startswith(f"eval: '{old}' is now 'eval.{name}.{new}'")
    with pytest.raises(ConfigError, match="'eval.passkey.trails'; did you mean 'eval.passkey.trials'"):
        load_run_config("configs/cpu_tiny.yaml", ["eval.passkey.trails=2"])
    with pytest.raises(ConfigError, match="unknown config key 'eval.passky'; did you mean 'eval.passkey'"):
        load_run_config("configs/cpu_tiny.yaml", ["eval.passky.trials=2"])
    with pytest.raises(ConfigError, match="eval.perplexity.data: List should have at least 1 item"):
        load_run_config("configs/cpu_tiny.yaml", ["eval.perplexity.data=[]"])
    with pytest.raises(ConfigError, match="eval: names no task; give eval.perplexity, eval.passkey or eval.ruler"):
        load_run_config("configs/cpu_tiny.yaml", ["eval={}"])
    with pytest.raises(ConfigError, match="eval.perplexity: stride applies to mode sliding only"):
        load_run_config("configs/cpu_tiny.yaml", ["eval.perplexity={mode: truncate, stride: 8}"])
    cfg = load_run_config("configs/cpu_tiny.yaml", ["eval.ruler.samples=3", "eval.passkey={}"])
    assert [t.name for t, _ in configured(cfg.eval)] == ["passkey", "ruler"]  # registry order, present ones only
    assert cfg.eval.ruler.samples == 3 and cfg.eval.passkey == EVAL_TASKS["passkey"].settings()


def test_each_task_reports_the_metrics_it_declares_and_writes_its_files(tmp_path):
    """A real run of every task on the tiny random Llama: ``summary`` has exactly ``metrics(settings)``, ``kind`` is
    the task, the files match ``files`` and the JSON reads back as the result."""
    (tmp_path / "doc.txt").write_text("The river ran past the mill and under the old stone bridge. " * 60)
    settings = {
        "perplexity": dict(lengths=[64, 128], data=[str(tmp_path / "doc.txt")]),
        "passkey": dict(lengths=[512], depths=[0.0, 1.0], trials=1),
        "ruler": dict(tasks=["niah_single", "fwe"], lengths=[512], depths=[0.5], samples=1),
    }
    em = load_eval_model("tiny-llama", {})
    for name, task in EVAL_TASKS.items():
        s = task.settings(**settings[name])
        result = task.run(em, s)
        assert result["kind"] == name and result["model"] == em.info and result["definition"]
        assert list(task.summary(result)) == task.metrics(s)
        folder = tmp_path / "out" / name
        task.write(result, folder)
        for pattern in task.files:
            assert list(folder.glob(pattern)), (name, pattern)
        assert json.loads((folder / task.result_file).read_text())["kind"] == name


@pytest.mark.slow
def test_in_run_evaluation_gives_each_task_the_table_its_own_command_would(tmp_path, monkeypatch):
    """Dynamic NTK keeps the largest table a model has seen: after perplexity at 4x the native length, a task that
    scores 2x must see the model as a fresh load does (the recipe loads the model again for such methods). The probe
    task (registered here beside the real ones) records the summed logits of one 512-token window."""
    run = tmp_path / "run"
    train(run, "rope.method=dynamic_ntk", "train.max_steps=2", "wandb.enabled=false")
    ids = torch.randint(0, 200, (1, 512), generator=torch.Generator().manual_seed(0))

    def probe(em, settings) -> dict:
        with torch.inference_mode():
            return dict(kind="probe", model=em.info, definition="probe", logits=float(em.model(input_ids=ids).logits
                                                                                         .double().sum()))

    monkeypatch.setitem(EVAL_TASKS, "probe", EvalTask(
        name="probe", module="tests.test_eval_registry", description="probe", settings=dict, run=probe,
        write=lambda result, folder: None, summary=lambda result: {"logits": result["logits"]},
        metrics=lambda s: ["logits"], goal="maximize", files=()))
    sections = {name: None for name in EVAL_TASKS}
    sections.update(perplexity=EVAL_TASKS["perplexity"].settings(lengths=[1024], mode="truncate"), probe={})
    summary, _ = evaluate_run(SimpleNamespace(eval=SimpleNamespace(**sections)), run)
    fresh = probe(load_eval_model(str(run), {}), {})["logits"]
    assert summary["eval/logits"] == fresh and "eval/ppl@1024" in summary


TOY = '''"""Next-token top-1 accuracy over the first tokens of a fixed text (a toy evaluation task)."""

import torch

from eval.common import EvalModel
from eval.task import EvalTask, task_main
from utils.cli import exit_process, run_cli
from utils.files import write_json
from utils.schema import Length, StrictModel

TEXT = "The river ran past the mill and under the old stone bridge, then on to the sea. " * 40


class Top1Settings(StrictModel):
    lengths: list[Length] = [64]
    """Window lengths in tokens."""


def run(em: EvalModel, s: Top1Settings) -> dict:
    ids = torch.tensor([em.tokenizer(TEXT).input_ids])
    acc = {}
    with torch.inference_mode():
        for n in s.lengths:
            x = ids[:, :n]
            logits = em.model(input_ids=x).logits
            acc[str(n)] = float((logits[0, :-1].argmax(-1) == x[0, 1:]).float().mean())
    return dict(kind="top1", model=em.info, settings=s.model_dump(), definition="top1: greedy next-token accuracy",
                by_length=acc)


EVAL_TASK = EvalTask(
    name="top1", module="eval.top1", description="Next-token top-1 accuracy (a toy task).", settings=Top1Settings,
    run=run, write=lambda result, folder: write_json(folder / "top1.json", result),
    summary=lambda result: {f"top1@{n}": v for n, v in result["by_length"].items()},
    metrics=lambda s: [f"top1@{n}" for n in s.lengths], goal="maximize", files=("top1.json",),
    formats=(("top1@", ".3f"),),
)


def main(argv=None):
    return task_main(EVAL_TASK, argv, __doc__)


if __name__ == "__main__":
    exit_process(run_cli(main))
'''


@pytest.mark.slow
def test_a_new_task_is_one_module_and_one_registry_line(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "results", "wandb", "docs",
                                                               "tests", "bench", "__pycache__", "testbed"))
    (repo / "eval" / "top1.py").write_text(TOY)
    registry = repo / "eval" / "registry.py"
    text = registry.read_text()
    assert text.count('    "eval.ruler",\n') == 1
    registry.write_text(text.replace('    "eval.ruler",\n', '    "eval.ruler",\n    "eval.top1",\n'))
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "toy", "base": "configs/cpu_tiny.yaml", "grid": {"rope.factor": [2]},
        "overrides": {"output.dir": str(tmp_path / "sweep"), "train.max_steps": 2, "wandb.enabled": False,
                      "eval": {"top1": {"lengths": [64, 128]}, "perplexity": {"lengths": [256], "mode": "truncate"}}},
    }))

    env = {**{k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}, "OMP_NUM_THREADS": "1"}

    def run_sweep(*extra: str) -> subprocess.CompletedProcess:
        r = subprocess.run([sys.executable, "launch/sweep.py", "--config", str(sweep), *extra], cwd=repo,
                           capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        return r

    run_sweep()
    run = tmp_path / "sweep" / "factor-2"
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert {"eval/top1@64", "eval/top1@128", "eval/ppl@256"} <= set(summary)  # the run's in-run evaluation
    header = (tmp_path / "sweep" / "compare.csv").read_text().splitlines()[0].split(",")
    assert header[-3:] == ["ppl@256", "top1@64", "top1@128"]  # compare's columns, in registry order
    assert "| top1@64 | top1@128 |" in (tmp_path / "sweep" / "results.md").read_text()  # the sweep's page

    # a finished run is one whose every configured task wrote its result
    next(run.glob("eval/*/top1.json")).unlink()
    assert "factor-2: finished" not in run_sweep("--dry-run").stdout
    run_sweep()
    assert list(run.glob("eval/*/top1.json"))

    # training-free: the task's own command, `python -m eval.top1`, with the settings as options
    run_sweep("--training-free")
    assert list((tmp_path / "sweep" / "training-free" / "factor-2").glob("*/top1.json"))



@pytest.mark.parametrize("override,message", [
    ("eval.passkey.lengths=[128]", "error: eval.passkey: length 128 is too short for a passkey prompt"),
    ("eval.ruler={lengths: [256], tasks: [cwe]}", "error: eval.ruler: length 256 is too short for cwe"),
])
def test_a_prompt_that_cannot_fit_is_refused_before_training(tmp_path, override, message):
    """``EvalTask.check`` runs in the preflight (here through ``--dry-run``), not after the training it would waste."""
    r = subprocess.run([sys.executable, "train.py", "--config", "configs/cpu_tiny.yaml", "--set", override, "--set",
                        f"output.dir={tmp_path / 'run'}", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(message), r.stderr[-500:]
    assert not (tmp_path / "run").exists()
