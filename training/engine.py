"""The DeepSpeed side of a run: its JSON config with ``auto`` values filled, the LR schedule, the engine, and one
optimizer step (the step the recipe and the training benchmark both run)."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from configs.schema import RunConfig
from training.model import LossModule, trainable_model
from training.parallel import (data_parallel_size, enable_sequence_parallel, gradient_scale, offloaded_checkpoints,
                               tile_mlps)
from training.runtime import TrainError


def ds_config(cfg: RunConfig, world: int) -> dict:
    """The DeepSpeed JSON of ``deepspeed.config`` with its ``auto`` values filled from the run config for ``world``
    processes (the batch counts data-parallel ranks: world / train.sequence_parallel_size); an ``auto`` left without
    a value, bf16/fp16 sections (precision is ``train.precision``'s) or a non-Adam optimizer are TrainErrors."""
    path = Path(cfg.deepspeed.config)
    if not path.is_file():
        raise TrainError(f"deepspeed.config: {path} not found (see configs/deepspeed/)")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TrainError(f"deepspeed.config: {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if ds.get("bf16", {}).get("enabled") or ds.get("fp16", {}).get("enabled"):
        raise TrainError(f"{path}: set precision with train.precision, not in the DeepSpeed JSON (bf16/fp16 sections)")
    fills = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": cfg.train.micro_batch_size * cfg.train.grad_accum * data_parallel_size(cfg, world),
        "gradient_clipping": cfg.train.grad_clip,
        "lr": cfg.train.lr,
        "betas": list(cfg.train.betas),
        "weight_decay": cfg.train.weight_decay,
    }

    def fill(node, where):
        if isinstance(node, dict):
            return {k: (fills[k] if v == "auto" and k in fills else fill(v, f"{where}.{k}")) for k, v in node.items()}
        if node == "auto":
            raise TrainError(f"{path}: no value to fill the 'auto' at {where.lstrip('.')}")
        return node

    ds = fill(ds, "")
    ds.setdefault("steps_per_print", 10**9)
    if "optimizer" in ds and ds["optimizer"].get("type", "").lower() not in ("adamw", "adam"):
        raise TrainError(f"{path}: optimizer type {ds['optimizer']['type']} is not supported; use AdamW")
    return ds


def lr_lambda(cfg: RunConfig, total: int) -> Callable[[int], float]:
    """The LR multiplier per step: linear warmup, then constant (the YaRN recipe), cosine or linear decay to 0 at
    ``total`` steps."""
    warm, kind = cfg.train.warmup_steps, cfg.train.schedule

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress

    return factor


def build_engine(cfg: RunConfig, ds: dict, module: LossModule, total: int, mpu=None):
    """The DeepSpeed engine over ``module``'s trainable parameters: AdamW from the run config (unless the DeepSpeed
    JSON names its own optimizer, as the offload configs do for DeepSpeed's CPU Adam), the LR schedule, and the
    sequence-parallel groups (``mpu``) when rows are split."""
    import deepspeed

    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = None
    if "optimizer" not in ds:
        optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, betas=cfg.train.betas,
                                      weight_decay=cfg.train.weight_decay)
    engine, *_ = deepspeed.initialize(
        model=module, model_parameters=params, optimizer=optimizer, config=ds, mpu=mpu,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total)))
    return engine


def trainable_engine(cfg: RunConfig, config, precision: str, attn: str, ds: dict, total: int):
    """(loss module, engine) of a run: seeds (``train.seed``), the trainable model built from ``config`` (tiled
    MLPs with ``train.tiled_mlp``), Ulysses attention and its groups with ``train.sequence_parallel_size`` > 1, the
    loss module and the DeepSpeed engine. The recipe and the training benchmark both build their step with this;
    the process group must be up."""
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    model = trainable_model(cfg, config, precision, attn)
    if cfg.train.tiled_mlp:
        tile_mlps(model)
    mpu = enable_sequence_parallel(model, cfg, attn)
    group = None if mpu is None else mpu.get_sequence_parallel_group()
    module = LossModule.of(cfg, model, precision, group, gradient_scale(ds, cfg.train.sequence_parallel_size))
    return module, build_engine(cfg, ds, module, total, mpu)


def tokens_per_step(cfg: RunConfig, world: int) -> int:
    """Tokens one optimizer step trains on, over all ``world`` processes: each row counted once, not once per
    sequence-parallel shard."""
    return cfg.data.seq_len * cfg.train.micro_batch_size * cfg.train.grad_accum * data_parallel_size(cfg, world)


def total_steps(cfg: RunConfig, world: int) -> int:
    """Optimizer steps of the run: ``train.max_steps`` or ``train.max_tokens``' worth, whichever is fewer."""
    per_step = tokens_per_step(cfg, world)
    steps = [s for s in (cfg.train.max_steps, cfg.train.max_tokens and math.ceil(cfg.train.max_tokens / per_step))
             if s]
    return min(steps)


def optimizer_step(engine, micro_batches: Iterator[dict], grad_accum: int, dev: torch.device,
                   guard: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   offload_checkpoints: bool = False) -> torch.Tensor:
    """One optimizer step: ``grad_accum`` micro-batches (dicts of input_ids, labels, position_ids ``[B, seq_len]``),
    each forward through the engine (decoder + chunked loss), ``guard`` (it may stop the run on a bad loss),
    backward (both with the layers' checkpointed inputs in CPU memory with ``offload_checkpoints``), and
    ``engine.step()`` (DeepSpeed applies the optimizer at the accumulation boundary). Returns the sum of the
    micro-batch losses of this process (a detached scalar)."""
    loss_sum = torch.zeros((), device=dev)
    for _ in range(grad_accum):
        batch = {k: v.to(dev) for k, v in next(micro_batches).items()}
        with offloaded_checkpoints(offload_checkpoints):
            loss = engine(batch["input_ids"], batch["labels"], batch["position_ids"])
            if guard is not None:
                loss = guard(loss)
            engine.backward(loss)
        engine.step()
        loss_sum += loss.detach()
    return loss_sum
