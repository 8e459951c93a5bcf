"""Small helpers shared by the tests that launch real processes (train.py, sweeps, launcher scripts)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from training.runtime import SHM_WORKSPACE_PREFIX
from utils.cli import free_port

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
DEEPSPEED = str(Path(PY).parent / "deepspeed")


def losses(run: Path) -> list[float]:
    """The per-step losses a train.py run logged in its metrics.jsonl."""
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_env(**extra: str) -> dict[str, str]:
    """A training process's environment: this one without W&B settings (the config decides), one thread per
    process, unbuffered output, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def train_cmd(run: Path, *sets: str, nproc: int = 1, resume: str | None = None, port: int | None = None) -> list[str]:
    """The command line of a ``configs/cpu_tiny.yaml`` run into ``run``: plain ``python`` for one process, the
    ``deepspeed`` launcher (on ``port``, a free one by default) for more."""
    launcher = [PY] if nproc == 1 else [DEEPSPEED, "--num_gpus", str(nproc), "--master_port", str(port or free_port())]
    cmd = launcher + ["train.py", "--config", "configs/cpu_tiny.yaml", "--set", f"output.dir={run}"]
    for s in sets:
        cmd += ["--set", s]
    return cmd + (["--resume", resume] if resume else [])


def shm_left(port: int) -> list[Path]:
    """DeepSpeed shared-memory workspaces of the run on ``port`` still in /dev/shm (``training.runtime``
    unlinks them; each would hold 66 MiB of RAM until the machine reboots)."""
    return sorted(Path("/dev/shm").glob(f"{SHM_WORKSPACE_PREFIX}_*_{port}_*"))


def train(run: Path, *sets: str, nproc: int = 1, resume: str | None = None, check: bool = True,
          **env: str) -> subprocess.CompletedProcess:
    """Run ``train_cmd`` to the end; with ``check``, a failed run fails the test with its output's tail. A
    multi-process run that succeeded must leave no shared-memory workspace behind."""
    port = free_port()
    r = subprocess.run(train_cmd(run, *sets, nproc=nproc, resume=resume, port=port), cwd=ROOT,
                       env=train_env(**env), capture_output=True, text=True, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"train.py failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    if nproc > 1 and r.returncode == 0:
        left = shm_left(port)
        assert not left, f"shared memory left in /dev/shm: {left}"
    return r
