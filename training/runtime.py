"""Where and how this process runs: device, process group, precision, attention kernel, SIGTERM, fault injection.

Errors that stop a run are ``TrainError`` (one ``error:`` line, exit 2, printed by the recipe's runner); a SIGTERM
(a scheduler's preemption) becomes ``Preempted`` once every rank has saved (exit 143).
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import os
import platform
import resource
import signal
from pathlib import Path

import torch

from configs.schema import RunConfig
from models.families import auto_kernel, check_kernel, family_of
from utils.cli import UserError, free_port
from utils.log import Log


class TrainError(UserError):
    """A run that cannot go on; printed as one ``error:`` line, exit status 2."""


class Preempted(Exception):
    """SIGTERM arrived (a scheduler's preemption): the run saved a checkpoint and stops; the recipe exits 143."""


log = Log("train", rank0=True)
"""Training progress, printed by rank 0 only."""


def device() -> torch.device:
    """This process's device: its local GPU under a launcher, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_distributed(dev: torch.device) -> tuple[int, int]:
    """Start torch.distributed through DeepSpeed: gloo on CPU, NCCL on GPUs; returns (rank, world size). Works under
    the deepspeed launcher, torchrun, and plain ``python``: DeepSpeed then looks for mpi4py unless RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR and MASTER_PORT are set, so they are set here for the one-process case."""
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"
        if "OMP_NUM_THREADS" not in os.environ:
            # Several processes on a few cores: with 2 threads in each of 2 processes on 2 cores a 20-step run took
            # 21.5 s instead of 0.6 s (docs/notes.md), so the cores are shared out.
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    deepspeed.init_distributed(dist_backend=backend)
    rank_, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if backend == "gloo" and world > 1:
        unlink_shm_workspace(rank_)
    return rank_, world


SHM_WORKSPACE_PREFIX = "deepspeed_allreduce_buffer"  # DeepSpeed's CPU all-reduce workspace: 66 MiB per rank


def unlink_shm_workspace(rank_: int) -> None:
    """Unlink this rank's shared-memory workspace once every rank has mapped every workspace (the barrier: DeepSpeed
    maps them all inside ``init_distributed``). DeepSpeed 0.19 never unlinks it, so each multi-process CPU run left
    66 MiB of RAM per rank in /dev/shm after it ended (13 GiB after one session of tests and benchmarks here, until the
    kernel's OOM killer stopped a benchmark far below its cap). Unlinked, the mappings stay valid and the memory
    goes back when the run's last process exits, however it exits (SIGKILL included)."""
    torch.distributed.barrier()
    # the name DeepSpeed's shm_initialize gives it (created when its launcher sets LOCAL_SIZE to the world size)
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    (Path("/dev/shm") / f"{SHM_WORKSPACE_PREFIX}_{os.getuid()}_{addr}_{port}_{rank_}").unlink(missing_ok=True)


# oneDNN (torch's CPU bf16 matmuls) uses no more of the CPU than ONEDNN_MAX_CPU_ISA allows: below AVX512_CORE_BF16 it
# emulates bf16 as on a CPU without the units, so the cap hides them from `auto` too (and lets a machine with them
# stand in for one without: docs/testing.md).
ISA_BF16_UNITS = {"AVX512_CORE_BF16": {"avx512_bf16"}, "AVX512_CORE_FP16": {"avx512_bf16"},
                  "AVX10_1_512": {"avx512_bf16"}}


def cpu_bf16_units() -> list[str]:
    """The bf16 matrix units this CPU lists in /proc/cpuinfo (``amx_bf16``, ``avx512_bf16``) that oneDNN may use
    under ``ONEDNN_MAX_CPU_ISA`` (unset, ``ALL`` or an AMX level: all of them); empty elsewhere."""
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    units = flags & {"amx_bf16", "avx512_bf16"}
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").strip().upper()
    if cap not in ("", "ALL", "DEFAULT") and "AMX" not in cap:
        units &= ISA_BF16_UNITS.get(cap, set())
    return sorted(units)


def machine() -> dict:
    """What a figure was measured on: CPU model, cores, GPU, library versions, date, load average."""
    import transformers

    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "bf16_units": cpu_bf16_units(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "load_average": round(os.getloadavg()[0], 2),
    }


def choose_precision(requested: str, dev: torch.device) -> tuple[str, str]:
    """(precision, reason). ``auto``: bf16 where the hardware has bf16 matrix units; a CPU without them emulates
    bf16 matmuls at about 1/150 of its fp32 rate (docs/notes.md), so fp32 there."""
    if requested != "auto":
        return requested, "set by train.precision"
    if dev.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", f"auto: {torch.cuda.get_device_name(dev)} supports bf16"
        return "fp32", "auto: this GPU has no bf16 support"
    units = cpu_bf16_units()
    if units:
        return "bf16", f"auto: this CPU has bf16 matrix units ({', '.join(units)})"
    capped = f", or ONEDNN_MAX_CPU_ISA={os.environ['ONEDNN_MAX_CPU_ISA']} hides them" \
        if os.environ.get("ONEDNN_MAX_CPU_ISA") else ""
    return "fp32", f"auto: this CPU has no bf16 matrix units (no amx_bf16 or avx512_bf16 in /proc/cpuinfo{capped})"


def has_flash_attn() -> bool:
    """Whether the flash-attn package is installed (``requirements-gpu.txt``)."""
    return importlib.util.find_spec("flash_attn") is not None


def attn_implementation(cfg: RunConfig, dev: torch.device, config) -> str:
    """The attention kernel of a run on a model with ``config``: ``model.attn_implementation``, where ``auto`` is
    flash_attention_2 on a GPU with flash-attn installed, else the family's first choice (sdpa; eager for Gemma 2,
    models.families). Refuses a kernel this machine lacks or the family cannot run, and flash attention with document
    isolation over several rows: transformers derives flash-attention varlen boundaries from position_ids only for a
    batch of one row, so with more rows documents would attend to each other silently (docs/data.md)."""
    requested = cfg.model.attn_implementation
    if requested == "flash_attention_2" and (dev.type != "cuda" or not has_flash_attn()):
        raise TrainError("model.attn_implementation=flash_attention_2 needs a CUDA GPU and `pip install -r "
                         "requirements-gpu.txt`; use sdpa")
    if requested == "auto":
        requested = auto_kernel(config, dev.type == "cuda" and has_flash_attn())
    check_kernel(config, requested)
    if requested == "flash_attention_2" and cfg.data.block_cross_doc and cfg.train.micro_batch_size > 1:
        raise TrainError("data.block_cross_doc with flash_attention_2 needs train.micro_batch_size: 1 (raise "
                         "train.grad_accum instead)")
    return requested


def launch_world(cfg: RunConfig, plan_only: bool = False) -> int:
    """The number of processes a launch runs: ``WORLD_SIZE`` as deepspeed/torchrun set it, else 1, or for a plan
    made without a launcher (``--dry-run``) the smallest launch the config runs on, one sequence-parallel group."""
    default = cfg.train.sequence_parallel_size if plan_only else 1
    return int(os.environ.get("WORLD_SIZE", default))


def planned_attention(cfg: RunConfig, config) -> str:
    """The kernel a GPU run of ``cfg`` is planned with (``--dry-run``, the memory plan), whatever this machine has:
    ``model.attn_implementation``, where ``auto`` is sdpa (flash_attention_2 needs no more memory), or flash attention
    for a family that cannot run sdpa (Gemma 2); checked against the family."""
    requested = cfg.model.attn_implementation
    if requested == "auto":
        requested = "sdpa" if "sdpa" in family_of(config).kernels else auto_kernel(config, flash=True)
    check_kernel(config, requested)
    return requested


def raise_on_any_rank(error: BaseException | None, dev: torch.device, message: str) -> None:
    """In place of a barrier after work that can fail on some ranks only (rank 0 packing the data, writing the
    export): every rank learns whether any failed, and then all raise, this rank's own error or TrainError(message),
    so that no rank waits forever for one that left."""
    flag = torch.tensor([0.0 if error is None else 1.0], device=dev)
    torch.distributed.all_reduce(flag)
    if flag.item() > 0:
        raise error if error is not None else TrainError(message)


def peak_memory_gib(dev: torch.device) -> float:
    """Peak memory of this process: the CUDA allocator's peak on GPUs (reset at each call), max RSS on CPU
    (high-water mark since the process started; Linux reports KiB)."""
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) / 2**30
        torch.cuda.reset_peak_memory_stats(dev)
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def shutdown() -> None:
    """A clean end of the process group, if one was started (gloo aborts the process otherwise)."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class StopSignal:
    """SIGTERM, noted and agreed on: the handler only notes it, so the step in flight finishes; ``requested()``
    then tells every rank once any rank got it (a launcher may signal only some of them)."""

    def __init__(self):
        self.received = False
        signal.signal(signal.SIGTERM, self._note)

    def _note(self, signum, frame) -> None:
        self.received = True

    def requested(self, dev: torch.device) -> bool:
        flag = torch.tensor([1.0 if self.received else 0.0], device=dev)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


