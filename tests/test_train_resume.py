"""train.py's two reference runs and what is measured against them: LoRA learning under ZeRO 0, 2 and 3, and exact
resumes after a SIGKILL at a random step, a SIGTERM, a SIGKILL inside a checkpoint save, a non-finite loss and a
cut-off checkpoint (docs/reliability.md). Real DeepSpeed processes (gloo on CPU), configs/cpu_tiny.yaml.

The tests of this file share the reference runs (module fixtures); ``make test`` runs each test file on one
pytest-xdist worker, so each reference is trained once.
"""

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import ROOT, losses, shm_left, train, train_cmd, train_env
from utils.cli import free_port

pytestmark = pytest.mark.slow


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    weights.update(load_file(run / "adapter" / "trainable_extra.safetensors"))
    return weights


# The losses every resume test must reproduce come from two uninterrupted runs, one per process count, each built
# once: LoRA dropout is on so that a resume must also restore every rank's RNG, and they save no checkpoint, so a
# resumed run with any save cadence matching them also shows that saving does not change what is trained.
ONE = ("lora.dropout=0.1",)  # cpu_tiny: 10 steps, 2 rows per step
TWO = ("lora.dropout=0.1", "train.micro_batch_size=1")  # 2 processes x 1 row, ZeRO-2 (cpu_tiny's DeepSpeed config)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted one-process run (no checkpoints)."""
    run = tmp_path_factory.mktemp("reference") / "one"
    train(run, *ONE, "train.save_every=0")
    return run


@pytest.fixture(scope="module")
def reference2(tmp_path_factory) -> Path:
    """The uninterrupted two-process run under DeepSpeed ZeRO-2 (no checkpoints)."""
    run = tmp_path_factory.mktemp("reference") / "two"
    train(run, *TWO, "train.save_every=0", nproc=2)
    return run


def _learned(run: Path) -> None:
    got = losses(run)
    assert len(got) == 10
    assert got[-1] < got[0] - 0.5, got
    assert (run / "merged" / "model.safetensors").is_file()


@pytest.mark.parametrize("stage", [0, 3])
def test_two_process_deepspeed_lora_loss_falls(tmp_path, stage):
    run = tmp_path / f"zero{stage}"
    train(run, *TWO, f"deepspeed.config=configs/deepspeed/zero{stage}.json", nproc=2)
    _learned(run)


def test_two_process_deepspeed_lora_loss_falls_under_zero2(reference2):
    _learned(reference2)


def _kill_at_random_step(run: Path, *sets: str, nproc: int, seed: int) -> int:
    """Start a run, SIGKILL its whole process group once a randomly chosen step has been logged."""
    target = random.Random(seed).randint(4, 8)
    port = free_port()
    proc = subprocess.Popen(train_cmd(run, *sets, nproc=nproc, port=port), cwd=ROOT, env=train_env(),
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= target:
            break
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not shm_left(port)  # unlinked at start-up, so a killed run leaves no shared memory either
    return len(metrics.read_text().splitlines())


def _sigkill_and_resume(tmp_path: Path, full: Path, nproc: int) -> None:
    sets = (*(ONE if nproc == 1 else TWO), "train.save_every=3")
    broken = tmp_path / "broken"
    killed_at = _kill_at_random_step(broken, *sets, nproc=nproc, seed=nproc)
    assert killed_at < 10 and not (broken / "merged").exists()
    train(broken, *sets, nproc=nproc, resume="auto")
    a, b = losses(full), losses(broken)
    assert len(b) == 10
    wa, wb = _adapter(full), _adapter(broken)
    assert wa.keys() == wb.keys()
    if nproc == 1:  # bit-exact
        assert a == b
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    else:
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5
        assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_sigkill_and_resume_auto_reproduce_the_uninterrupted_run_one_process(tmp_path, reference):
    _sigkill_and_resume(tmp_path, reference, nproc=1)


def test_sigkill_and_resume_auto_reproduce_the_uninterrupted_run_two_processes(tmp_path, reference2):
    _sigkill_and_resume(tmp_path, reference2, nproc=2)


def test_sigterm_saves_exits_cleanly_and_resumes_exactly(tmp_path, reference):
    sets = (*ONE, "train.save_every=0")
    stopped = tmp_path / "stopped"
    proc = subprocess.Popen(train_cmd(stopped, *sets), cwd=ROOT, env=train_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = stopped / "metrics.jsonl"
    while proc.poll() is None and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 4):
        pass
    proc.send_signal(signal.SIGTERM)  # a scheduler's preemption
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    step = len(losses(stopped))
    assert 4 <= step < 10 and "Traceback" not in err
    assert f"SIGTERM: saved {stopped / 'checkpoints' / f'step-{step:06d}'}" in out
    assert not (stopped / "merged").exists()
    train(stopped, *sets, resume="auto")
    assert losses(stopped) == losses(reference)


# SIGKILL at each point of the step-10 save: after DeepSpeed's model states, after its optimizer states, after
# every rank's data position and RNG, after the manifest (just before the rename)
@pytest.mark.parametrize("point", ["checkpoint/model", "checkpoint/optimizer", "checkpoint", "checkpoint/rename"])
def test_kill_during_checkpoint_write_leaves_the_previous_one_loadable(tmp_path, reference, point):
    sets = (*ONE, "train.save_every=5")
    broken = tmp_path / "broken"
    r = train(broken, *sets, check=False, ROPESCALE_FAULT=f"{point}:10")
    assert r.returncode == -signal.SIGKILL
    ckpts = sorted(p.name for p in (broken / "checkpoints").iterdir())
    assert ckpts == [".tmp-step-000010", "step-000005"]  # the half-written one never got its final name
    train(broken, *sets, resume="auto")
    assert losses(broken) == losses(reference)
    assert sorted(p.name for p in (broken / "checkpoints").iterdir()) == ["step-000005", "step-000010"]


def test_nan_loss_stops_and_a_cut_off_newest_checkpoint_is_skipped_with_a_warning(tmp_path, reference):
    sets = (*ONE, "train.save_every=2")
    cut = tmp_path / "cut"
    r = train(cut, *sets, check=False, ROPESCALE_FAULT="nan_loss:7")
    # a non-finite loss stops the run before the optimizer step, naming the last checkpoint
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "error: non-finite loss (nan) at step 7; stopped before the optimizer step" in r.stderr
    assert "step-000006" in r.stderr and len(losses(cut)) == 6
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["step-000004", "step-000006"]  # keep_last 2
    newest = cut / "checkpoints" / "step-000006"
    victim = newest / "rank000.pt"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # a write cut off by a crash or full disk
    r = train(cut, *sets, resume="auto")
    assert f"warning: skipping checkpoint {newest}: rank000.pt is" in r.stdout
    assert f"resumed from {cut / 'checkpoints' / 'step-000004'} at step 4" in r.stdout
    assert losses(cut) == losses(reference)
