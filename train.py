"""Fine-tune a RoPE-scaled model on packed long sequences under DeepSpeed: the recipe.

    deepspeed --num_gpus 2 train.py --config configs/cpu_tiny.yaml [--set train.max_steps=20 ...]
    python train.py --config configs/cpu_tiny.yaml            # one process, no launcher
    torchrun --nproc_per_node 8 train.py --config configs/ntk_parts_32k.yaml

setup (config, distributed, precision, model with the RoPE method applied before it is built, LoRA, data, engine)
-> resume (``--resume auto``: the newest complete checkpoint) -> train (chunked loss, NaN guard, checkpoints every
``train.save_every`` steps, written to a temporary folder and renamed) -> save (adapter with trainable extras, merged
safetensors model whose config carries the scaling) -> eval (when the config has an ``eval:`` section) -> cleanup.

The run folder (``output.dir``): config.yaml (resolved, no secrets), metrics.jsonl (one JSON object per optimizer
step), checkpoints/step-NNNNNN/, adapter/, merged/, eval/, wandb/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import resource
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import torch
import yaml

from configs.schema import ConfigError, RunConfig, load_run_config

CHECKPOINT_PREFIX = "step-"
_DS_TAG = "engine"  # DeepSpeed's sub-folder inside each checkpoint


def _log(msg: str) -> None:
    if _rank() == 0:
        print(f"[train] {msg}", flush=True)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


class TrainError(ValueError):
    """A run that cannot go on; ``main`` prints it as one ``error:`` line and exits with status 2."""


class Preempted(Exception):
    """SIGTERM arrived (a scheduler's preemption): the run saved a checkpoint and stops; ``main`` exits 143."""


_SIGTERM = {"received": False}


def _on_sigterm(signum, frame) -> None:
    # Only note it: the step in flight finishes, then every rank saves together (see _stop_requested).
    _SIGTERM["received"] = True


def _stop_requested(device: torch.device) -> bool:
    """True on every rank once any rank got SIGTERM (the launcher may signal only some of them)."""
    flag = torch.tensor([1.0 if _SIGTERM["received"] else 0.0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def _fail(msg: str) -> None:
    raise TrainError(msg)


# ----------------------------------------------------------------------------------------------------------- setup


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="LoRA fine-tuning of a RoPE-scaled model under DeepSpeed")
    ap.add_argument("--config", required=True, help="YAML run config (see configs/)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set rope.factor=4 (repeatable)")
    ap.add_argument("--resume", default="never", metavar="auto|never|PATH",
                    help="auto: continue from the newest complete checkpoint in the run folder, if any")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the resolved config and the per-GPU memory plan (launch/memory.py), then exit")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def _device() -> torch.device:
    """This process's device: its local GPU under a launcher, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _init_distributed(device: torch.device) -> tuple[int, int]:
    """Start torch.distributed through DeepSpeed: gloo on CPU, NCCL on GPUs. Works under the deepspeed launcher,
    torchrun, and plain ``python`` (one process: the rendezvous variables are set here, FIELD_NOTES)."""
    import deepspeed

    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
        if "OMP_NUM_THREADS" not in os.environ:
            # Several processes on a few cores: oversubscribed threads cost 30x here (FIELD_NOTES).
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    deepspeed.init_distributed(dist_backend=backend)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _choose_precision(requested: str, device: torch.device) -> tuple[str, str]:
    """Return (precision, reason). ``auto``: bf16 where the hardware has bf16 matrix units."""
    if requested != "auto":
        return requested, "set by train.precision"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", f"auto: {torch.cuda.get_device_name(device)} supports bf16"
        return "fp32", "auto: this GPU has no bf16 support"
    units = cpu_bf16_units()
    if units:
        return "bf16", f"auto: this CPU has bf16 matrix units ({', '.join(units)})"
    return "fp32", "auto: this CPU has no bf16 matrix units (no amx_bf16 or avx512_bf16 in /proc/cpuinfo)"


def cpu_bf16_units() -> list[str]:
    """The bf16 matrix units this CPU lists in /proc/cpuinfo (``amx_bf16``, ``avx512_bf16``); empty elsewhere."""
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    return sorted(flags & {"amx_bf16", "avx512_bf16"})


def _attn_implementation(requested: str, device: torch.device) -> str:
    if requested != "auto":
        if requested == "flash_attention_2" and (device.type != "cuda" or not _has_flash_attn()):
            _fail("model.attn_implementation=flash_attention_2 needs a CUDA GPU and `pip install -r "
                  "requirements-gpu.txt`; use sdpa")
        return requested
    return "flash_attention_2" if device.type == "cuda" and _has_flash_attn() else "sdpa"


def _has_flash_attn() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def _model_config(cfg: RunConfig):
    """The base config with ``model.arch`` overrides and the RoPE method applied: the one config every artifact of
    this run (checkpoints, adapter base, merged model) is built from."""
    from ropescale.apply import apply_rope, original_context
    from ropescale.models import load_config

    base = load_config(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
    for key, value in cfg.model.arch.items():
        if not hasattr(base, key):
            _fail(f"model.arch.{key}: {type(base).__name__} has no such field")
        setattr(base, key, value)
    original = cfg.rope.original_len or original_context(base)
    target = cfg.data.pose_target_len or cfg.data.seq_len
    if cfg.rope.method != "none" and target < original:
        _fail(f"data.seq_len {target} is below the model's original context {original}: context extension trains "
              f"at or beyond it; raise data.seq_len (or data.pose_target_len for PoSE)")
    return apply_rope(base, cfg.rope.method, cfg.rope.factor, dict(cfg.rope.params),
                      original_len=cfg.rope.original_len, rebase=cfg.rope.rebase)


def _build_model(cfg: RunConfig, model_config, precision: str, attn: str, dtype: torch.dtype | None = None):
    """The trainable model: base (weights loaded, or scratch), gradient checkpointing, then LoRA + trainable extras.

    With LoRA and bf16 the frozen base weights are stored in bf16 (half the memory); LoRA weights and trainable
    extras stay fp32 so that small updates (lr 2e-5) are not rounded away. Compute runs under bf16 autocast.
    """
    from ropescale.models import load_model

    if dtype is None:
        dtype = torch.bfloat16 if (precision == "bf16" and cfg.lora.enabled) else torch.float32
    model = load_model(cfg.model.name, config=model_config, dtype=dtype, attn_implementation=attn,
                       trust_remote_code=cfg.model.trust_remote_code, seed=cfg.train.seed,
                       scratch=cfg.model.init == "scratch")
    model.config.use_cache = False
    if cfg.rope.method == "dynamic_yarn":
        # transformers has no dynamic YaRN: swap in our rotary module (a plain reload of the saved config runs
        # static YaRN at the target factor; see docs/ropescale.md).
        from ropescale.runtime import enable_dynamic_yarn

        enable_dynamic_yarn(model)
    if cfg.train.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad, so it works with frozen embeddings + LoRA
        # (YaRN's script turns checkpointing off under LoRA; its users then run out of memory).
        kwargs = {"use_reentrant": False}
        if cfg.train.checkpoint_keep_attention:
            kwargs["context_fn"] = _keep_attention_outputs
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    if not cfg.lora.enabled:
        model.float().requires_grad_(True)
        return model
    from peft import get_peft_model

    model = get_peft_model(model, lora_config(cfg))
    for name in extra_param_names(model, cfg.lora.trainable_extra):
        param = model.get_parameter(name)
        param.data = param.data.float()
        param.requires_grad_(True)
    embed = model.get_input_embeddings()
    if dtype != torch.float32 and embed.weight.dtype == torch.float32:
        # A trainable fp32 embedding would make the whole residual stream fp32 (twice the checkpointed
        # activations); hand the layers the base dtype, as an untouched bf16 embedding would.
        embed.register_forward_hook(lambda module, args, out: out.to(dtype))
    return model


def attention_ops() -> list:
    """The fused attention kernels whose outputs ``train.checkpoint_keep_attention`` keeps: sdpa's CPU and CUDA
    kernels, and flash-attn's when it is installed and registered (its ops exist once flash_attn is imported)."""
    names = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
    ops = [getattr(torch.ops.aten, n).default for n in names if hasattr(torch.ops.aten, n)]
    flash = torch.ops.flash_attn
    return ops + [getattr(flash, n).default for n in ("_flash_attn_forward", "_flash_attn_varlen_forward")
                  if hasattr(flash, n)]


def _keep_attention_outputs():
    """Selective activation checkpointing (the ``context_fn`` of torch.utils.checkpoint): the attention kernels'
    outputs are saved in the forward and every other op is recomputed in the backward. Recomputing a layer then
    costs its linears and elementwise ops only; attention, quadratic in seq_len, runs once forward and once backward
    instead of twice forward (full checkpointing) and once backward."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(attention_ops())


def lora_config(cfg: RunConfig):
    """The peft LoraConfig of a run (also used by launch/memory.py to plan the same model)."""
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(cfg.lora.target_modules), bias="none", task_type="CAUSAL_LM")


def extra_param_names(model, patterns: list[str]) -> list[str]:
    """Names of base parameters trained in full beside LoRA: those whose module name ends with a pattern
    (``norm`` matches every RMSNorm, ``embed_tokens`` the embedding; a tied LM head follows the embedding)."""
    names = []
    for pattern in patterns:
        found = [n for n, _ in model.named_parameters()
                 if "lora_" not in n and n.rsplit(".", 1)[0].endswith(pattern)]
        if not found:
            _fail(f"lora.trainable_extra: no module of {type(model.get_base_model()).__name__} ends with "
                  f"'{pattern}' (e.g. embed_tokens, norm)")
        names += found
    return sorted(set(names))


class _LossModule(torch.nn.Module):
    """What the DeepSpeed engine wraps: the model plus the chunked loss, so that one ``engine(batch)`` call runs the
    decoder and the LM head chunk by chunk (the ``[seq_len, vocab]`` logits never exist)."""

    def __init__(self, model, chunk_size: int, autocast_dtype: torch.dtype | None, block_cross_doc: bool):
        super().__init__()
        self.model, self.chunk_size, self.autocast_dtype = model, chunk_size, autocast_dtype
        self.block_cross_doc = block_cross_doc

    def forward(self, input_ids, labels, position_ids):
        """input_ids, labels, position_ids: [B, seq_len] -> (mean token loss, scored token count)."""
        from data.loader import forward_kwargs
        from ropescale.loss import causal_lm_loss

        # The packing mode decides the attention mask: None + use_cache=False isolates documents (reset rows with
        # block_cross_doc), all ones keeps plain causal attention across the row (data/loader.py).
        kwargs = forward_kwargs({"input_ids": input_ids, "position_ids": position_ids}, self.block_cross_doc)
        with torch.autocast(input_ids.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            loss_sum, n = causal_lm_loss(self.model, input_ids, labels, position_ids=position_ids,
                                         attention_mask=kwargs["attention_mask"], chunk_size=self.chunk_size)
        return loss_sum / n.clamp(min=1), n


def _ds_config(cfg: RunConfig, world: int) -> dict:
    """The DeepSpeed JSON with its ``auto`` values filled from our config; any ``auto`` left is an error."""
    path = Path(cfg.deepspeed.config)
    if not path.is_file():
        _fail(f"deepspeed.config: {path} not found (see configs/deepspeed/)")
    ds = json.loads(path.read_text())
    if ds.get("bf16", {}).get("enabled") or ds.get("fp16", {}).get("enabled"):
        _fail(f"{path}: set precision with train.precision, not in the DeepSpeed JSON (bf16/fp16 sections)")
    fills = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": cfg.train.micro_batch_size * cfg.train.grad_accum * world,
        "gradient_clipping": cfg.train.grad_clip,
        "lr": cfg.train.lr,
        "betas": list(cfg.train.betas),
        "weight_decay": cfg.train.weight_decay,
    }

    def fill(node, where):
        if isinstance(node, dict):
            return {k: (fills[k] if v == "auto" and k in fills else fill(v, f"{where}.{k}")) for k, v in node.items()}
        if node == "auto":
            _fail(f"{path}: no value to fill the 'auto' at {where.lstrip('.')}")
        return node

    ds = fill(ds, "")
    ds.setdefault("steps_per_print", 10**9)
    if "optimizer" in ds and ds["optimizer"].get("type", "").lower() not in ("adamw", "adam"):
        _fail(f"{path}: optimizer type {ds['optimizer']['type']} is not supported; use AdamW")
    return ds


def _lr_lambda(cfg: RunConfig, total_steps: int):
    """Linear warmup, then constant (YaRN recipe), cosine or linear decay to 0 at ``total_steps``."""
    warm, kind = cfg.train.warmup_steps, cfg.train.schedule

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress

    return factor


def _build_engine(cfg: RunConfig, ds: dict, module: _LossModule, total_steps: int):
    import deepspeed

    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = None
    if "optimizer" not in ds:  # a client optimizer; the offload configs let DeepSpeed build its CPU Adam instead
        optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, betas=cfg.train.betas,
                                      weight_decay=cfg.train.weight_decay)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=module, model_parameters=params, optimizer=optimizer, config=ds,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, total_steps)))
    return engine, scheduler


def _total_steps(cfg: RunConfig, world: int) -> int:
    tokens_per_step = cfg.data.seq_len * cfg.train.micro_batch_size * cfg.train.grad_accum * world
    steps = [s for s in (cfg.train.max_steps,
                         cfg.train.max_tokens and math.ceil(cfg.train.max_tokens / tokens_per_step)) if s]
    return min(steps)


# ------------------------------------------------------------------------------------------------ run folder, logs


def _prepare_run_dir(cfg: RunConfig, run: Path, resume: str) -> Path | None:
    """Check the run folder against ``--resume``; return the checkpoint to resume from (or None)."""
    ckpts = complete_checkpoints(run)
    saved = run / "config.yaml"
    if resume == "never":
        if ckpts or (run / "merged").exists():
            _fail(f"output.dir {run} already holds a run; pass --resume auto to continue it or choose another "
                  "output.dir")
        return None
    if saved.is_file():
        _check_same_run(yaml.safe_load(saved.read_text()), _public_config(cfg), run)
    if resume == "auto":
        return ckpts[-1] if ckpts else None
    path = Path(resume)
    if not (path / _DS_TAG).is_dir():
        _fail(f"--resume {path}: not a complete checkpoint folder (expected {path / _DS_TAG})")
    return path


# Keys that may change between a run and its resumption (length of the run, logging, evaluation).
_RESUMABLE_CHANGES = {"train.max_steps", "train.max_tokens", "train.save_every", "train.keep_last",
                      "train.log_every", "wandb", "eval"}


def _check_same_run(saved: dict, now: dict, run: Path) -> None:
    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict) and v:
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    def resumable(key):
        return key in _RESUMABLE_CHANGES or key.split(".")[0] in _RESUMABLE_CHANGES

    a, b = dict(flat(saved)), dict(flat(now))
    diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and not resumable(k))
    if diff:
        _fail(f"--resume: the config differs from the one saved in {run / 'config.yaml'} at {', '.join(diff)}; "
              "a resumed run must train the same thing (use a new output.dir)")


def _public_config(cfg: RunConfig) -> dict:
    """The resolved config as saved and logged. It holds no secrets by construction: the W&B key is only ever read
    from the environment by wandb itself."""
    return json.loads(cfg.model_dump_json())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _init_wandb(cfg: RunConfig, run: Path, resumed: bool):
    """W&B on rank 0. ``mode: auto`` is online only when an API key is configured, else offline (no network here)."""
    if not cfg.wandb.enabled or cfg.wandb.mode == "disabled":
        return None
    mode = cfg.wandb.mode
    if mode == "auto":
        has_key = bool(os.environ.get("WANDB_API_KEY")) or _netrc_has_wandb()
        mode = "online" if has_key else "offline"
        _log(f"wandb: {mode} ({'an API key is configured' if has_key else 'no API key configured'})")
    import wandb

    return wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, name=cfg.wandb.name or run.name,
                      group=cfg.wandb.group, tags=list(cfg.wandb.tags), config=_public_config(cfg), dir=str(run),
                      mode=mode, id=_wandb_id(run), resume="allow" if resumed else None)


def _netrc_has_wandb() -> bool:
    import netrc

    with contextlib.suppress(Exception):
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    return False


def _wandb_id(run: Path) -> str:
    """One W&B run id per run folder, kept across resumes."""
    path = run / ".wandb_id"
    if not path.is_file():
        import uuid

        _write_atomic(path, uuid.uuid4().hex[:12])
    return path.read_text().strip()


def _peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPUs (reset each step), max RSS on CPU (high-water mark
    since the process started; Linux reports KiB)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ------------------------------------------------------------------------------------------------------ checkpoints


def complete_checkpoints(run: Path) -> list[Path]:
    """Complete checkpoints, oldest first. A checkpoint is complete once renamed from its ``.tmp-`` name."""
    folder = run / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if (p / _DS_TAG).is_dir())


def _save_checkpoint(engine, run: Path, step: int, state: dict, loader, keep_last: int) -> Path:
    """Everything a resumed run needs: DeepSpeed's model/optimizer/scheduler state, the step and token counters,
    and per rank the data position and RNG states. Written under ``.tmp-step-N`` and renamed by rank 0 once every
    rank has finished, so a crash mid-write leaves the previous checkpoint as the newest complete one."""
    dist, rank = torch.distributed, torch.distributed.get_rank()
    folder = run / "checkpoints"
    final = folder / f"{CHECKPOINT_PREFIX}{step:06d}"
    tmp = folder / f".tmp-{final.name}"
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    # Frozen base weights are not saved: they come back from the base model (a 7B checkpoint shrinks from 14 GB).
    engine.save_checkpoint(str(tmp), tag=_DS_TAG, client_state=state, save_latest=False,
                           exclude_frozen_parameters=True)
    torch.save({"loader": loader.state_dict(), "rng": _rng_state()}, tmp / f"rank{rank:03d}.pt")
    _fault_point("checkpoint", step)
    dist.barrier()
    if rank == 0:
        os.replace(tmp, final)
        for old in complete_checkpoints(run)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old)
    dist.barrier()
    return final


def _load_checkpoint(engine, path: Path, loader) -> dict:
    """The inverse of ``_save_checkpoint``: restores engine, data position and RNG; returns {step, tokens}."""
    rank = torch.distributed.get_rank()
    rank_file = path / f"rank{rank:03d}.pt"
    if not rank_file.is_file():
        _fail(f"{path} was saved by fewer processes (no {rank_file.name}); resume with the same number of processes")
    loaded, state = engine.load_checkpoint(str(path), tag=_DS_TAG, load_optimizer_states=True,
                                           load_lr_scheduler_states=True, load_module_strict=False)
    if loaded is None:
        _fail(f"DeepSpeed could not load {path / _DS_TAG}")
    per_rank = torch.load(rank_file, weights_only=True)
    loader.load_state_dict(per_rank["loader"])
    _set_rng_state(per_rank["rng"])
    return {"step": state["step"], "tokens": state["tokens"]}  # ours, without DeepSpeed's own entries


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": _py_rng_bytes()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _py_rng_bytes() -> torch.Tensor:
    # Python's RNG state as a tensor so that the checkpoint loads with weights_only=True.
    _, internal, _ = random.getstate()
    return torch.tensor(list(internal), dtype=torch.int64)


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(int(x) for x in state["python"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fault_point(where: str, step: int) -> bool:
    """Fault injection for the crash tests, off unless ``ROPESCALE_FAULT`` is set: ``checkpoint:5`` SIGKILLs rank 0
    in the middle of writing the step-5 checkpoint (after DeepSpeed wrote its files, before the rename);
    ``nan_loss:3`` returns True on every rank at step 3 (the caller then turns the loss into NaN)."""
    if os.environ.get("ROPESCALE_FAULT") != f"{where}:{step}":
        return False
    if where == "checkpoint" and _rank() == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return True


# ------------------------------------------------------------------------------------------------------- export


def _full_trained_state(engine, module: _LossModule) -> dict[str, torch.Tensor] | None:
    """Rank 0: the trained parameters (LoRA + extras, or every weight for full fine-tuning), gathered from ZeRO-3
    partitions when needed, keyed as in ``module.model``; other ranks: None."""
    names = [n for n, p in module.model.named_parameters() if p.requires_grad]
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        params = [module.model.get_parameter(n) for n in names]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            state = {n: p.detach().clone().float().cpu() for n, p in zip(names, params)} if _rank() == 0 else None
        return state
    if _rank() != 0:
        return None
    return {n: module.model.get_parameter(n).detach().clone().float().cpu() for n in names}


def _export(cfg: RunConfig, model_config, trained: dict[str, torch.Tensor], run: Path) -> None:
    """Rank 0: write ``adapter/`` (LoRA + trainable extras) and ``merged/`` (safetensors, plain transformers).

    The merge starts from a fresh fp32 base built from the same RoPE-scaled config, so ``merged/config.json`` carries
    the scaling natively and the merged weights are base + BA (not bf16-rounded training copies)."""
    from safetensors.torch import save_file

    model = _build_model(cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"gradient_checkpointing": False})}), model_config, "fp32", "sdpa", dtype=torch.float32)
    missing = [n for n in trained if n not in dict(model.named_parameters())]
    if missing:
        _fail(f"export: trained parameters not found in a fresh model: {missing[:3]}")
    with torch.no_grad():
        for name, value in trained.items():
            model.get_parameter(name).copy_(value)
    for name in ("adapter", "merged"):
        shutil.rmtree(run / f".tmp-{name}", ignore_errors=True)
    if cfg.lora.enabled:
        tmp = run / ".tmp-adapter"
        model.save_pretrained(tmp, safe_serialization=True)
        extras = {n: v.contiguous() for n, v in trained.items() if "lora_" not in n}
        if extras:
            save_file(extras, str(tmp / "trainable_extra.safetensors"))
        model_config.save_pretrained(tmp / "base_config")  # the RoPE-scaled base config: a PEFT adapter alone
        # does not carry the base's RoPE change (FIELD_NOTES)
        _replace_dir(tmp, run / "adapter")
        model = model.merge_and_unload()
    model.config.use_cache = True
    tmp = run / ".tmp-merged"
    model.save_pretrained(tmp, safe_serialization=True)
    _tokenizer(cfg).save_pretrained(tmp)
    _replace_dir(tmp, run / "merged")


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def _tokenizer(cfg: RunConfig):
    from ropescale.models import load_tokenizer

    return load_tokenizer(cfg.model.tokenizer or cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)


# ----------------------------------------------------------------------------------------------------------- train


def _check_finite(loss: torch.Tensor, step: int, last_ckpt: Path | None) -> None:
    """All ranks agree: a non-finite loss on any rank stops the run before the optimizer step."""
    bad = torch.tensor([0.0 if torch.isfinite(loss).all() else 1.0], device=loss.device)
    torch.distributed.all_reduce(bad)
    if bad.item():
        where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
        _fail(f"non-finite loss ({loss.item()}) at step {step + 1}; stopped before the optimizer step, {where}. "
              "Lower train.lr, check the data, or use train.precision=fp32")


def train(cfg: RunConfig, resume: str = "never") -> Path:
    """Run the whole recipe for ``cfg``; returns the run folder."""
    from data.loader import PackedLoader
    from data.pack import build_packed

    # setup: everything that can be refused is checked before processes rendezvous and the run folder is touched
    run, device = Path(cfg.output.dir), _device()
    resume_from = _prepare_run_dir(cfg, run, resume)
    precision, why = _choose_precision(cfg.train.precision, device)
    attn = _attn_implementation(cfg.model.attn_implementation, device)
    if attn == "flash_attention_2" and cfg.data.block_cross_doc and cfg.train.micro_batch_size > 1:
        # transformers derives flash-attention varlen boundaries from position_ids only for a batch of one row;
        # with more rows documents would attend to each other silently (docs/data.md).
        _fail("data.block_cross_doc with flash_attention_2 needs train.micro_batch_size: 1 (raise train.grad_accum "
              "instead)")
    model_config = _model_config(cfg)
    ds_config = _ds_config(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    rank, world = _init_distributed(device)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if rank == 0:
            run.mkdir(parents=True, exist_ok=True)
            _write_atomic(run / "config.yaml", yaml.safe_dump(_public_config(cfg), sort_keys=False))
        _log(f"{world} process(es) on {device.type}; precision {precision} ({why}); attention {attn}; "
             f"{torch.get_num_threads()} thread(s) per process")
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
        model = _build_model(cfg, model_config, precision, attn)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        _log(f"model {cfg.model.name} ({cfg.model.init}); rope {cfg.rope.method} x{cfg.rope.factor}; "
             f"{n_train:,} trainable parameters")
        tokenizer = _tokenizer(cfg)
        if rank == 0:
            dataset = build_packed(cfg.data, tokenizer)
        torch.distributed.barrier()
        if rank != 0:
            dataset = build_packed(cfg.data, tokenizer)  # rank 0 built the cache; the others reuse it
        loader = PackedLoader(dataset, batch_size=cfg.train.micro_batch_size, rank=rank, world_size=world,
                              seed=cfg.train.seed)
        module = _LossModule(model, cfg.train.loss_chunk_size, torch.bfloat16 if precision == "bf16" else None,
                             cfg.data.block_cross_doc)
        total = _total_steps(cfg, world)
        engine, _ = _build_engine(cfg, ds_config, module, total)
        state = {"step": 0, "tokens": 0}
        last_ckpt = None
        if resume_from is not None:
            state = _load_checkpoint(engine, resume_from, loader)
            last_ckpt = resume_from
            _log(f"resumed from {resume_from} at step {state['step']}")
        wb = _init_wandb(cfg, run, resumed=resume_from is not None) if rank == 0 else None

        # train
        batches = iter(loader)
        if rank == 0 and (run / "metrics.jsonl").is_file():
            _truncate_metrics(run / "metrics.jsonl", state["step"])
        metrics = open(run / "metrics.jsonl", "a") if rank == 0 else None
        bar = _progress(total, state["step"]) if rank == 0 else None
        engine.train()
        while state["step"] < total:
            t0 = time.perf_counter()
            lr = engine.get_lr()[0]  # the rate this step uses (the scheduler advances inside engine.step)
            loss_sum = torch.zeros((), device=device)
            for micro in range(cfg.train.grad_accum):
                batch = {k: v.to(device) for k, v in next(batches).items()}
                loss, _ = engine(batch["input_ids"], batch["labels"], batch["position_ids"])
                if _fault_point("nan_loss", state["step"] + 1):
                    loss = loss * float("nan")
                _check_finite(loss, state["step"], last_ckpt)
                engine.backward(loss)
                engine.step()
                loss_sum += loss.detach()
            grad_norm = engine.get_global_grad_norm()
            if grad_norm is not None and not math.isfinite(float(grad_norm)):
                where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
                _fail(f"non-finite gradient norm at step {state['step'] + 1}; stopped before saving anything more, "
                      f"{where}. Lower train.lr or keep train.grad_clip > 0")
            torch.distributed.all_reduce(loss_sum)
            step_tokens = cfg.data.seq_len * cfg.train.micro_batch_size * cfg.train.grad_accum * world
            state["step"] += 1
            state["tokens"] += step_tokens
            dt = time.perf_counter() - t0
            record = {
                "step": state["step"],
                "loss": loss_sum.item() / (world * cfg.train.grad_accum),
                "lr": lr,
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "tokens_per_s": step_tokens / dt,
                "peak_mem_gib": _peak_memory_gib(device),
                "tokens_seen": state["tokens"],
                "step_time_s": dt,
            }
            if rank == 0:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                if wb is not None:
                    wb.log(record, step=state["step"])
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                if state["step"] % cfg.train.log_every == 0:
                    bar.write(f"[train] step {state['step']}/{total} loss {record['loss']:.4f} "
                              f"lr {record['lr']:.2e} {record['tokens_per_s']:.0f} tok/s "
                              f"peak {record['peak_mem_gib']:.2f} GiB")
            stop = _stop_requested(device)
            if (cfg.train.save_every and state["step"] % cfg.train.save_every == 0) or state["step"] == total or stop:
                last_ckpt = _save_checkpoint(engine, run, state["step"], dict(state), loader, cfg.train.keep_last)
            if stop and state["step"] < total:
                if rank == 0:
                    bar.close()
                    metrics.close()
                raise Preempted(f"SIGTERM: saved {last_ckpt} at step {state['step']}; continue with --resume auto")
        if bar is not None:
            bar.close()
            metrics.close()

        # save
        trained = _full_trained_state(engine, module)
        if rank == 0:
            _export(cfg, model_config, trained, run)
            _log(f"saved {run / 'adapter'} and {run / 'merged'}" if cfg.lora.enabled else f"saved {run / 'merged'}")
        torch.distributed.barrier()

        # eval
        if cfg.eval is not None and rank == 0:
            _evaluate(cfg, run)
        if wb is not None:
            wb.finish()
        torch.distributed.barrier()
    finally:
        # cleanup: a clean shutdown of the process group (gloo aborts the process otherwise)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return run


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics lines of steps after the resumed checkpoint (they will be logged again)."""
    lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    _write_atomic(path, "".join(ln + "\n" for ln in lines))


def _progress(total: int, done: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc="train", unit="step", dynamic_ncols=True, mininterval=2.0)


def _evaluate(cfg: RunConfig, run: Path) -> None:
    """Run the eval CLIs on the merged model; results go to ``<run>/eval/`` where eval.compare and sweeps read them.
    The held-out split of the bundled corpus is the default text (training never reads it)."""
    from eval import passkey, perplexity

    e, common = cfg.eval, ["--model", str(run), "--out", str(run / "eval")]
    if e.perplexity_lengths:
        argv = common + ["--lengths", ",".join(map(str, e.perplexity_lengths)), "--mode", e.perplexity_mode]
        perplexity.main(argv + (["--stride", str(e.stride)] if e.stride else []))
    if e.passkey_lengths:
        passkey.main(common + ["--lengths", ",".join(map(str, e.passkey_lengths)),
                               "--depths", ",".join(map(str, e.passkey_depths)), "--trials", str(e.passkey_trials)])


def main(argv: list[str] | None = None) -> int:
    from data.config import DataError
    from ropescale.methods import RopeConfigError
    from ropescale.models import ModelLoadError

    args = _parse_args(argv)
    try:
        cfg = load_run_config(args.config, args.set)
        if args.dry_run:  # nothing distributed starts; the plan uses WORLD_SIZE when a launcher set it
            from launch.memory import dry_run

            dry_run(cfg)
            return 0
        train(cfg, resume=args.resume)
    except (ConfigError, DataError, ModelLoadError, RopeConfigError, TrainError) as e:
        # Input problems: one line naming the problem and the fix, no traceback.
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        _log(str(e))
        return 143  # 128 + SIGTERM, as a shell reports a terminated job
    return 0


if __name__ == "__main__":
    sys.exit(main())
