"""The multi-node launch files: shell syntax, every variable set or documented, the hostfile as DeepSpeed parses it,
and the SLURM and torchrun scripts run for real on this CPU machine (one node, two gloo processes; `scontrol` and
`srun` stand-ins on PATH play the scheduler, which cannot exist here)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from deepspeed.launcher.runner import fetch_hostfile
from utils.cli import free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = [ROOT / "launch/slurm_deepspeed.sbatch", ROOT / "launch/torchrun.sh"]
SPECIAL = {"0", "@", "*", "#", "?", "$", "!", "-", "BASH_SOURCE", "PWD"}  # set by bash itself


def _code_and_header(path: Path) -> tuple[list[str], str]:
    """(code lines without comments, the header comment block)."""
    lines = path.read_text().splitlines()
    header = "\n".join(ln for ln in lines[: next(i for i, ln in enumerate(lines) if ln and not ln.startswith("#"))])
    code = []
    for ln in lines:
        if ln.lstrip().startswith("#"):
            continue
        # drop trailing comments (" # ..."), keeping '#' inside expansions such as ${#x} or '^lo'
        code.append(re.sub(r"\s+#\s.*$", "", ln))
    return code, header


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_shell_syntax_and_strict_mode(path):
    r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    code, _ = _code_and_header(path)
    assert "set -euo pipefail" in code  # an unset variable or a failing step stops the job


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_every_variable_is_set_or_documented(path):
    code, header = _code_and_header(path)
    text = "\n".join(code)
    used = set(re.findall(r"\$\{?#?([A-Za-z_][A-Za-z0-9_]*|[0-9@*#?$!-])", text)) - SPECIAL
    assigned = set(re.findall(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=", text, re.M))
    from_env = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):?-", text))  # ${NAME:-default}: read from outside
    for name in sorted((used - assigned) | from_env):
        assert re.search(rf"\b{name}\b", header), f"{path.name}: ${name} is neither set nor documented in the header"


def test_sbatch_directives_come_before_the_first_command():
    lines = (ROOT / "launch/slurm_deepspeed.sbatch").read_text().splitlines()
    first_command = next(i for i, ln in enumerate(lines) if ln and not ln.startswith("#"))
    directives = [i for i, ln in enumerate(lines) if ln.startswith("#SBATCH")]
    assert directives and max(directives) < first_command  # sbatch ignores #SBATCH after the first command
    assert any("--ntasks-per-node=1" in lines[i] for i in directives)  # one DeepSpeed launcher per node


def test_hostfile_example_parses_with_deepspeed_and_is_shown_in_the_docs():
    pool = fetch_hostfile(str(ROOT / "launch/hostfile.example"))
    assert list(pool.items()) == [("node-01", 8), ("node-02", 8)]
    assert "deepspeed --hostfile launch/hostfile.example" in (ROOT / "docs/launch.md").read_text()



def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "SLURM_", "RANK", "WORLD_SIZE"))}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               VENV=str(Path(sys.executable).parent.parent), MASTER_PORT=str(free_port()), **extra)
    return env


TRAIN_ARGS = ["--set", "train.max_steps=3", "--set", "train.micro_batch_size=1", "--set", "wandb.enabled=false"]


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_torchrun_script_trains_with_two_processes(tmp_path):
    run = tmp_path / "run"
    args = ["--config", "configs/cpu_tiny.yaml", "--set", f"output.dir={run}", *TRAIN_ARGS]
    dry = subprocess.run(["launch/torchrun.sh", *args], cwd=ROOT, env=_env(NPROC_PER_NODE="2", DRY_RUN="1"),
                         capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert "--nnodes 1 --node_rank 0 --nproc_per_node 2 --master_addr 127.0.0.1" in dry.stdout
    r = subprocess.run(["launch/torchrun.sh", *args], cwd=ROOT, env=_env(NPROC_PER_NODE="2"),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "2 process(es)" in r.stdout and _steps(run) == [1, 2, 3]
    assert (run / "merged" / "config.json").is_file()


@pytest.mark.slow
def test_slurm_script_writes_the_hostfile_and_trains_through_deepspeed(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # Stand-ins for the scheduler: a one-node allocation named localhost; srun runs its command once as node 0.
    (bin_dir / "scontrol").write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames localhost" ] && echo localhost\n')
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nSLURM_NODEID=0 exec "$@"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    run, hostfile = tmp_path / "run", tmp_path / "hosts"
    env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="42", SLURM_JOB_NODELIST="localhost",
               SLURM_SUBMIT_DIR=str(ROOT), GPUS_PER_NODE="2", HOSTFILE=str(hostfile),
               CONFIG="configs/cpu_tiny.yaml")
    cmd = ["bash", str(ROOT / "launch/slurm_deepspeed.sbatch"), "--set", f"output.dir={run}", *TRAIN_ARGS]
    dry = subprocess.run(cmd, cwd=tmp_path, env=dict(env, DRY_RUN="1"), capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert hostfile.read_text() == "localhost slots=2\n"
    assert "--no_ssh --master_addr localhost" in dry.stdout and "--config configs/cpu_tiny.yaml" in dry.stdout
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "2 process(es)" in r.stdout and _steps(run) == [1, 2, 3]
    assert (run / "merged" / "config.json").is_file()
