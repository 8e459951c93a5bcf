"""What a run leaves on disk, decided here and nowhere else: the run folder, checkpoints (save and load side by side:
model and optimizer through DeepSpeed, step and token counters, per-rank data position and RNG states) and the
exported adapter and merged model.

Every folder is written under a temporary name and renamed once complete, so a crash mid-write leaves the previous
one as the newest complete one. A checkpoint's ``manifest.json`` (every file and its size, written last before the
rename) lets ``--resume auto`` skip a newest checkpoint that was cut off or damaged afterwards. One launch at a time
writes a run folder: ``RunLock``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import shutil
import socket
from pathlib import Path

import torch
import yaml

from configs.schema import RunConfig
from ropescale.serving import EXACT, write_serving_files
from training.model import LossModule, tokenizer_of, trainable_model
from training.runtime import TrainError, log, raise_on_any_rank
from utils.faults import fault_point
from utils.files import replace_dir, write_atomic
from utils.log import rank

CHECKPOINT_PREFIX = "step-"
DS_TAG = "engine"  # DeepSpeed's sub-folder inside each checkpoint
MANIFEST = "manifest.json"
LOCK = "run.lock"

# Keys that may change between a run and its resumption (length of the run, logging, evaluation).
RESUMABLE_CHANGES = {"train.max_steps", "train.max_tokens", "train.save_every", "train.keep_last",
                     "train.log_every", "wandb", "eval"}


# ------------------------------------------------------------------------------------------------------ run folder


def public_config(cfg: RunConfig) -> dict:
    """The resolved config as saved and logged. It holds no secrets by construction: the W&B key is only ever read
    from the environment by wandb itself."""
    return json.loads(cfg.model_dump_json())


def prepare_run_dir(cfg: RunConfig, run: Path, resume: str) -> Path | None:
    """Check the run folder against ``--resume`` (never / auto / a checkpoint path); return the checkpoint to
    resume from, or None. Touches nothing."""
    ckpts = complete_checkpoints(run)
    saved = run / "config.yaml"
    if resume == "never":
        if ckpts or (run / "merged").exists():
            raise TrainError(f"output.dir {run} already holds a run; pass --resume auto to continue it or choose "
                             "another output.dir")
        return None
    if saved.is_file():
        check_same_run(yaml.safe_load(saved.read_text()), public_config(cfg), run)
    if resume == "auto":
        for ckpt in reversed(ckpts):
            problem = checkpoint_problem(ckpt)
            if problem is None:
                return ckpt
            log(f"warning: skipping checkpoint {ckpt}: {problem}; trying the one before it")
        if ckpts:  # never silently start over in a folder that holds checkpoints
            raise TrainError(f"output.dir {run} holds checkpoints but none is complete (see the warnings); resume "
                             "from one with --resume PATH after checking it, or choose another output.dir")
        return None
    path = Path(resume)
    if not (path / DS_TAG).is_dir():
        raise TrainError(f"--resume {path}: not a complete checkpoint folder (expected {path / DS_TAG})")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise TrainError(f"--resume {path}: {problem}; resume from an earlier checkpoint")
    return path


class RunLock:
    """``run/run.lock``, held with ``flock`` by rank 0 from setup to cleanup: one launch per run folder.

    The kernel holds the lock, not the file: it ends when the process ends, however it ends (a SIGKILLed launch
    leaves a file nobody holds, and the next launch takes it with a warning), so neither a reused PID nor a changed
    host name can make a dead launch look alive. The file records the holder's PID and host for the refusal
    message."""

    def __init__(self, run: Path):
        self.path, self.created, self.fd = run / LOCK, not run.exists(), None

    def acquire(self) -> RunLock:
        """Take the lock or raise TrainError naming the launch that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        while True:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held = _lock_holder(fd)
                os.close(fd)
                raise TrainError(f"output.dir {self.path.parent} is in use by another launch ({held}); wait for it "
                                 "or choose another output.dir") from None
            try:  # the file we locked must still be the one at the path (a releasing launch unlinks it)
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _lock_holder(fd)
        if previous != "unknown":
            log(f"warning: taking over the lock {self.path} left by a launch that is gone ({previous})")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        """Remove the file and drop the lock; the run folder too if this launch created it and left it empty."""
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)  # while still holding it: a waiting launch then sees another inode
        os.close(self.fd)
        self.fd = None
        if self.created:
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()  # only when empty


def _lock_holder(fd: int) -> str:
    """``pid N on HOST`` from a lock file's contents, else ``unknown``."""
    try:
        held = json.loads(os.pread(fd, 4096, 0) or b"null")
        return f"pid {int(held['pid'])} on {held['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown"


def check_same_run(saved: dict, now: dict, run: Path) -> None:
    """A resumed run must train the same thing: only ``RESUMABLE_CHANGES`` may differ from the saved config."""
    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict) and v:
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    def resumable(key):
        return key in RESUMABLE_CHANGES or key.split(".")[0] in RESUMABLE_CHANGES

    a, b = dict(flat(saved)), dict(flat(now))
    diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and not resumable(k))
    if diff:
        raise TrainError(f"--resume: the config differs from the one saved in {run / 'config.yaml'} at "
                         f"{', '.join(diff)}; a resumed run must train the same thing (use a new output.dir)")


def write_run_config(cfg: RunConfig, run: Path) -> None:
    """Rank 0: create the run folder and write its resolved ``config.yaml``."""
    run.mkdir(parents=True, exist_ok=True)
    write_atomic(run / "config.yaml", yaml.safe_dump(public_config(cfg), sort_keys=False))


# ----------------------------------------------------------------------------------------------------- checkpoints


def complete_checkpoints(run: Path) -> list[Path]:
    """Complete checkpoints, oldest first. A checkpoint is complete once renamed from its ``.tmp-`` name."""
    folder = run / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if (p / DS_TAG).is_dir())


def write_manifest(folder: Path) -> None:
    """``folder/manifest.json``: every file under ``folder`` (relative path) and its size in bytes."""
    files = {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*")) if f.is_file()}
    write_atomic(folder / MANIFEST, json.dumps(files, indent=1))


def checkpoint_problem(folder: Path) -> str | None:
    """What is wrong with a checkpoint against its manifest (a missing or cut-off file), else None.
    Sizes, not hashes: a multi-GB checkpoint is checked in milliseconds, and a write cut off by a crash or a full
    disk changes the size."""
    try:
        files = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:  # saved before manifests existed: the rename alone marked it complete
        log(f"warning: {folder} has no {MANIFEST} (saved by an older version); its files are not checked")
        return None
    except (OSError, ValueError) as e:
        return f"unreadable {MANIFEST} ({e})"
    for name, size in files.items():
        f = folder / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} is {f.stat().st_size} bytes, {size} when saved (cut off or damaged)"
    return None


def rng_state() -> dict:
    """This process's RNG states as tensors, so that a checkpoint loads with ``weights_only=True``."""
    _, internal, _ = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": torch.tensor(list(internal), dtype=torch.int64)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """The inverse of ``rng_state``."""
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(int(x) for x in state["python"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def arm_deepspeed_faults(engine, step: int) -> None:
    """Fault injection inside DeepSpeed's save (off unless ``ROPESCALE_FAULT`` names a ``checkpoint/`` point of this
    step): rank 0 is SIGKILLed right after DeepSpeed writes its model-states file (``checkpoint/model:N``) or its
    optimizer-states file (``checkpoint/optimizer:N``), by wrapping its checkpoint engine's ``save``."""
    fault = os.environ.get("ROPESCALE_FAULT", "")
    if not (fault.startswith(("checkpoint/model:", "checkpoint/optimizer:")) and fault.endswith(f":{step}")):
        return
    save = engine.checkpoint_engine.save

    def save_then_fault(state_dict, path):
        save(state_dict, path)
        fault_point("checkpoint/optimizer" if "optim_states" in str(path) else "checkpoint/model", step)

    engine.checkpoint_engine.save = save_then_fault


def is_write_error(error: BaseException) -> bool:
    """Whether ``error`` is a failed write (a full disk, a quota, a file size limit): an OSError from Python's own
    writes, a SafetensorError from safetensors, or torch.save's zip writer reporting a short write ("unexpected
    pos", "file write failed") as a RuntimeError. Anything else is not reported as a space problem."""
    from safetensors import SafetensorError

    if isinstance(error, (OSError, SafetensorError)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("unexpected pos" in text or "write failed" in text)


def folder_bytes(folder: Path) -> int:
    """The bytes a checkpoint or export folder holds (its manifest's total when it has one)."""
    try:
        return sum(json.loads((folder / MANIFEST).read_text()).values())
    except (OSError, ValueError):
        return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def write_failure(target: Path, error: BaseException | str, need: int, kept: str) -> TrainError:
    """The one-line error of a save that could not be written (a full disk, a quota, a file size limit): what, why,
    the space free there and the space needed (estimated by the caller), what was kept and how to go on."""
    where = target.parent
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    reason = " ".join(str(error).split())[:200]
    return TrainError(f"could not write {target} ({reason}); {free / 2**20:.1f} MiB free on its disk, about "
                      f"{need / 2**20:.1f} MiB needed; {kept}; free space and rerun with --resume auto")


def save_checkpoint(engine, run: Path, step: int, state: dict, loader, keep_last: int) -> Path:
    """Everything a resumed run needs: DeepSpeed's model/optimizer/scheduler state, ``state`` (step and token
    counters), and per rank the data position and RNG states. Written under ``.tmp-step-N`` and renamed by rank 0
    once every rank has finished; only the newest ``keep_last`` are kept (0: all)."""
    dist, me = torch.distributed, torch.distributed.get_rank()
    folder = run / "checkpoints"
    final = folder / f"{CHECKPOINT_PREFIX}{step:06d}"
    tmp = folder / f".tmp-{final.name}"
    if me == 0:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    previous = complete_checkpoints(run)
    kept = f"the previous checkpoint {previous[-1]} is complete" if previous else "no earlier checkpoint exists"
    need = folder_bytes(previous[-1]) if previous else 0
    failed: BaseException | None = None
    arm_deepspeed_faults(engine, step)
    try:
        # Frozen base weights are not saved: they come back from the base model (a 7B checkpoint shrinks from 14 GB).
        engine.save_checkpoint(str(tmp), tag=DS_TAG, client_state=state, save_latest=False,
                               exclude_frozen_parameters=True)
        torch.save({"loader": loader.state_dict(), "rng": rng_state()}, tmp / f"rank{me:03d}.pt")
    except Exception as e:
        failed = e
    fault_point("checkpoint", step)
    need = need or folder_bytes(tmp)  # the first checkpoint: at least what was written before the failure
    try:  # every rank learns whether any rank's write failed (in place of a barrier)
        raise_on_any_rank(failed, engine.device, "another rank's write failed")
    except Exception as e:
        if me == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if failed is not None and not is_write_error(failed):
            raise
        raise write_failure(final, e, need, kept) from None
    if me == 0:
        try:
            write_manifest(tmp)
            fault_point("checkpoint/rename", step)
            replace_dir(tmp, final)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise write_failure(final, e, need, kept) from None
        for old in complete_checkpoints(run)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old)
    dist.barrier()
    return final


def load_checkpoint(engine, path: Path, loader) -> dict:
    """The inverse of ``save_checkpoint``: restores engine, data position and RNG; returns {step, tokens}."""
    me = torch.distributed.get_rank()
    rank_file = path / f"rank{me:03d}.pt"
    if not rank_file.is_file():
        raise TrainError(f"{path} was saved by fewer processes (no {rank_file.name}); resume with the same number "
                         "of processes")
    loaded, state = engine.load_checkpoint(str(path), tag=DS_TAG, load_optimizer_states=True,
                                           load_lr_scheduler_states=True, load_module_strict=False)
    if loaded is None:
        raise TrainError(f"DeepSpeed could not load {path / DS_TAG}")
    per_rank = torch.load(rank_file, weights_only=True)
    loader.load_state_dict(per_rank["loader"])
    set_rng_state(per_rank["rng"])
    return {"step": state["step"], "tokens": state["tokens"]}  # ours, without DeepSpeed's own entries


# ------------------------------------------------------------------------------------------------------- export


def trained_state(engine, module: LossModule) -> dict[str, torch.Tensor] | None:
    """Rank 0: the trained parameters (LoRA + extras, or every weight for full fine-tuning), gathered from ZeRO-3
    partitions when needed, keyed as in ``module.model``; other ranks: None."""
    names = [n for n, p in module.model.named_parameters() if p.requires_grad]
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        params = [module.model.get_parameter(n) for n in names]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {n: p.detach().clone().float().cpu() for n, p in zip(names, params)} if rank() == 0 else None
    if rank() != 0:
        return None
    return {n: module.model.get_parameter(n).detach().clone().float().cpu() for n in names}


def export(cfg: RunConfig, config, trained: dict[str, torch.Tensor], run: Path) -> None:
    """Rank 0: write ``adapter/`` (LoRA + trainable extras) and ``merged/`` (safetensors, plain transformers).

    The merge starts from a fresh fp32 base built from the same RoPE-scaled ``config``, so ``merged/config.json``
    carries the scaling natively and the merged weights are base + BA (not bf16-rounded training copies). A write
    that fails (a full disk) removes the partial folders and raises one line with the space needed."""
    model = trainable_model(cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"gradient_checkpointing": False})}), config, "fp32", None, dtype=torch.float32)
    missing = [n for n in trained if n not in dict(model.named_parameters())]
    if missing:
        raise TrainError(f"export: trained parameters not found in a fresh model: {missing[:3]}")
    with torch.no_grad():
        for name, value in trained.items():
            model.get_parameter(name).copy_(value)
    for name in ("adapter", "merged"):
        shutil.rmtree(run / f".tmp-{name}", ignore_errors=True)
    try:
        write_export(cfg, config, model, trained, run)
    except Exception as e:
        for name in ("adapter", "merged"):
            shutil.rmtree(run / f".tmp-{name}", ignore_errors=True)
        if not is_write_error(e):
            raise
        # the merged fp32 weights dominate; the adapter is a fraction of them
        need = sum(p.numel() * 4 for p in model.parameters())
        ckpts = complete_checkpoints(run)
        kept = f"the last checkpoint {ckpts[-1]} is complete" if ckpts else "no checkpoint was saved"
        raise write_failure(run / "merged", e, need, kept) from None


def write_export(cfg: RunConfig, config, model, trained: dict[str, torch.Tensor], run: Path) -> None:
    """``export``'s writes: ``adapter/`` then ``merged/``, each under a ``.tmp-`` name until complete."""
    from safetensors.torch import save_file

    if cfg.lora.enabled:
        tmp = run / ".tmp-adapter"
        model.save_pretrained(tmp, safe_serialization=True)
        extras = {n: v.contiguous() for n, v in trained.items() if "lora_" not in n}
        if extras:
            save_file(extras, str(tmp / "trainable_extra.safetensors"))
        # The RoPE-scaled base config: a PEFT adapter alone does not carry the base's RoPE change, and base +
        # adapter reloaded without it gives different logits (docs/notes.md).
        config.save_pretrained(tmp / "base_config")
        replace_dir(tmp, run / "adapter")
        model = model.merge_and_unload()
    model.config.use_cache = True
    tmp = run / ".tmp-merged"
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer_of(cfg).save_pretrained(tmp)
    # The legacy keys older loaders and servers read, and SERVING.md (what each computes of this model).
    for v in write_serving_files(tmp, config):
        if v.status != EXACT:
            log(f"export: {v.loader}: {v.status}: {v.why} (merged/SERVING.md)")
    replace_dir(tmp, run / "merged")
