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

This file is the recipe only: every building block is a public function of ``training/`` (and ``models/``, ``data/``),
which launch/, bench/ and the tests call too. Nothing imports this file.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from configs.schema import RunConfig, load_run_config
from data.loader import PackedLoader
from data.pack import build_packed
from training.checkpoint import (
    RunLock,
    export,
    load_checkpoint,
    prepare_run_dir,
    save_checkpoint,
    trained_state,
    write_run_config,
)
from training.engine import optimizer_step, tokens_per_step, total_steps, trainable_engine
from training.evaluate import evaluate_run
from training.memory import dry_run
from training.metrics import MetricsLog
from training.parallel import data_parallel_size, shard_rows
from training.preflight import preflight
from training.runtime import (
    Preempted,
    StopSignal,
    TrainError,
    device,
    init_distributed,
    log,
    peak_memory_gib,
    raise_on_any_rank,
    shutdown,
)
from utils.cli import exit_process, run_cli
from utils.faults import fault_point
from utils.log import rank


class Recipe:
    """One run of ``cfg``: ``setup()``, ``train()``, ``save()``, ``evaluate()``, ``cleanup()``, in that order."""

    def __init__(self, cfg: RunConfig, resume: str = "never"):
        self.cfg, self.resume = cfg, resume
        self.run, self.device = Path(cfg.output.dir), device()
        self.state = {"step": 0, "tokens": 0}  # what a checkpoint restores besides DeepSpeed's own state
        self.last_ckpt: Path | None = None
        self.lock: RunLock | None = None  # run.lock, held by rank 0 from setup to cleanup

    # ------------------------------------------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Everything that can be refused is checked before the processes rendezvous and the run folder is touched;
        then the process group, the model (RoPE method in its config, LoRA), the packed data and the engine."""
        cfg = self.cfg
        checked = preflight(cfg, self.resume)
        resume_from, precision, why, attn = (checked.resume_from, checked.precision, checked.precision_reason,
                                             checked.attn)
        self.model_config, self.tokenizer, ds = checked.model_config, checked.tokenizer, checked.ds
        if rank() == 0:  # one launch per run folder; a second one is refused here, before the rendezvous
            self.lock = RunLock(self.run).acquire()
            # the folder may have changed between the check and the lock (another launch just finished)
            if prepare_run_dir(cfg, self.run, self.resume) != resume_from:
                raise TrainError(f"output.dir {self.run} changed while this launch started; run it again")

        self.rank, self.world = init_distributed(self.device)
        self.sp = cfg.train.sequence_parallel_size  # ranks sharing one row (training/parallel.py)
        self.dp_rank, self.dp = self.rank // self.sp, data_parallel_size(cfg, self.world)
        self.stop = StopSignal()
        log(f"{self.world} process(es) on {self.device.type}"
            + (f" ({self.dp} data-parallel x {self.sp} sequence-parallel)" if self.sp > 1 else "")
            + f"; precision {precision} ({why}); attention {attn}; {torch.get_num_threads()} thread(s) per process")
        self.total = total_steps(cfg, self.world)
        self.module, self.engine = trainable_engine(cfg, self.model_config, precision, attn, ds, self.total)
        n_train = sum(p.numel() for p in self.module.parameters() if p.requires_grad)
        log(f"model {cfg.model.name} ({cfg.model.init}); rope {cfg.rope.method} x{cfg.rope.factor}; "
            f"{n_train:,} trainable parameters")
        # the ranks of a sequence-parallel group read the same rows: the loader shards over data-parallel ranks
        self.loader = PackedLoader(self.packed_data(), batch_size=cfg.train.micro_batch_size, rank=self.dp_rank,
                                   world_size=self.dp, seed=cfg.train.seed)
        if self.rank == 0:  # the run folder is written once the data is packed: a bad document leaves no trace
            write_run_config(cfg, self.run)
        if resume_from is not None:
            self.state = load_checkpoint(self.engine, resume_from, self.loader)
            self.last_ckpt = resume_from
            log(f"resumed from {resume_from} at step {self.state['step']}")
        self.metrics = MetricsLog(cfg, self.run, self.total, self.state["step"], resumed=resume_from is not None,
                                  active=self.rank == 0)

    def packed_data(self):
        """The packed rows: rank 0 builds (or reuses) the cache, then the other ranks read it."""
        dataset, failed = None, None
        if self.rank == 0:
            try:
                dataset = build_packed(self.cfg.data, self.tokenizer)
            except Exception as e:  # a bad document: the other ranks must not wait for rank 0 forever
                failed = e
        raise_on_any_rank(failed, self.device, "rank 0 could not pack the data")
        return dataset if self.rank == 0 else build_packed(self.cfg.data, self.tokenizer)

    # ------------------------------------------------------------------------------------------------------ train

    def train(self) -> None:
        """Optimizer steps until the total; each step: grad_accum micro-batches through the engine (forward with the
        chunked loss, NaN guard, backward), then its record, a checkpoint when due, and a stop on SIGTERM."""
        cfg, batches = self.cfg, iter(self.loader)
        if self.sp > 1:  # each rank of a group keeps its positions of the group's rows
            batches = (shard_rows(b, self.rank % self.sp, self.sp) for b in batches)
        self.engine.train()
        while self.state["step"] < self.total:
            t0 = time.perf_counter()
            lr = self.engine.get_lr()[0]  # the rate this step uses (the scheduler advances inside engine.step)
            loss_sum = optimizer_step(self.engine, batches, cfg.train.grad_accum, self.device, guard=self.guard,
                                      offload_checkpoints=cfg.train.offload_checkpoints)
            grad_norm = self.checked_grad_norm()
            torch.distributed.all_reduce(loss_sum)
            self.state["step"] += 1
            self.state["tokens"] += tokens_per_step(cfg, self.world)
            self.metrics.record(self.step_record(loss_sum, lr, grad_norm, time.perf_counter() - t0))
            self.checkpoint_if_due()
        self.metrics.close()

    def guard(self, loss: torch.Tensor) -> torch.Tensor:
        """All ranks agree: a non-finite loss on any rank stops the run before the optimizer step."""
        if fault_point("nan_loss", self.state["step"] + 1):
            loss = loss * float("nan")
        bad = torch.tensor([0.0 if torch.isfinite(loss).all() else 1.0], device=loss.device)
        torch.distributed.all_reduce(bad)
        if bad.item():
            raise TrainError(f"non-finite loss ({loss.item()}) at step {self.state['step'] + 1}; stopped before the "
                             f"optimizer step, {self.where_to_resume()}. Lower train.lr, check the data, or use "
                             "train.precision=fp32")
        return loss

    def checked_grad_norm(self) -> float | None:
        """The step's global gradient norm (None where DeepSpeed does not report one); a non-finite one stops."""
        norm = self.engine.get_global_grad_norm()
        if norm is not None and not math.isfinite(float(norm)):
            raise TrainError(f"non-finite gradient norm at step {self.state['step'] + 1}; stopped before saving "
                             f"anything more, {self.where_to_resume()}. Lower train.lr or keep train.grad_clip > 0")
        return None if norm is None else float(norm)

    def where_to_resume(self) -> str:
        return f"the last good checkpoint is {self.last_ckpt}" if self.last_ckpt else "no checkpoint was written yet"

    def step_record(self, loss_sum: torch.Tensor, lr: float, grad_norm: float | None, seconds: float) -> dict:
        """One line of metrics.jsonl: the mean loss over all ranks and micro-batches, and the step's cost. (Under
        sequence parallelism a group's ranks hold shares of its rows' mean that add up to it.)"""
        return {
            "step": self.state["step"],
            "loss": loss_sum.item() / (self.dp * self.cfg.train.grad_accum),
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_step(self.cfg, self.world) / seconds,
            "peak_mem_gib": peak_memory_gib(self.device),
            "tokens_seen": self.state["tokens"],
            "step_time_s": seconds,
        }

    def checkpoint_if_due(self) -> None:
        """Save every ``train.save_every`` steps, at the last step, and when any rank got SIGTERM (then stop)."""
        step, every = self.state["step"], self.cfg.train.save_every
        stop = self.stop.requested(self.device)
        if (every and step % every == 0) or step == self.total or stop:
            self.last_ckpt = save_checkpoint(self.engine, self.run, step, dict(self.state), self.loader,
                                             self.cfg.train.keep_last)
        if stop and step < self.total:
            self.metrics.close()
            raise Preempted(f"SIGTERM: saved {self.last_ckpt} at step {step}; continue with --resume auto")

    # ------------------------------------------------------------------------------------------------------- save

    def save(self) -> None:
        """The adapter (LoRA + trainable extras) and the merged model, written by rank 0."""
        trained, failed = trained_state(self.engine, self.module), None
        if self.rank == 0:
            try:
                export(self.cfg, self.model_config, trained, self.run)
            except Exception as e:  # a full disk: the other ranks must not wait for rank 0 forever
                failed = e
            else:
                log(f"saved {self.run / 'adapter'} and {self.run / 'merged'}" if self.cfg.lora.enabled
                    else f"saved {self.run / 'merged'}")
        raise_on_any_rank(failed, self.device, f"rank 0 could not write {self.run / 'merged'}")

    # ------------------------------------------------------------------------------------------------------- eval

    def evaluate(self) -> None:
        """The config's ``eval:`` section on the merged model (rank 0): results in ``<run>/eval/``, summary metrics
        in ``<run>/eval/summary.json`` and the W&B run's summary."""
        if self.cfg.eval is not None and self.rank == 0:
            summary, files = evaluate_run(self.cfg, self.run)
            self.metrics.record_eval(summary, files, self.run / "eval")
        self.metrics.finish()
        torch.distributed.barrier()

    # ---------------------------------------------------------------------------------------------------- cleanup

    def cleanup(self) -> None:
        """A clean shutdown of the process group (gloo aborts the process otherwise), then the run folder's lock is
        released (and the folder removed if the run was refused before writing anything into it). The progress
        bar is ended first, so that an error line starts a line of its own."""
        try:
            if getattr(self, "metrics", None) is not None:
                self.metrics.close()
            shutdown()
        finally:
            if self.lock is not None:
                self.lock.release()


def train(cfg: RunConfig, resume: str = "never") -> Path:
    """Run the whole recipe for ``cfg``; returns the run folder."""
    recipe = Recipe(cfg, resume)
    try:
        recipe.setup()
        recipe.train()
        recipe.save()
        recipe.evaluate()
    finally:
        recipe.cleanup()
    return recipe.run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="LoRA fine-tuning of a RoPE-scaled model under DeepSpeed")
    ap.add_argument("--config", required=True, help="YAML run config (see configs/)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set rope.factor=4 (repeatable)")
    ap.add_argument("--resume", default="never", metavar="auto|never|PATH",
                    help="auto: continue from the newest complete checkpoint in the run folder, if any")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the resolved config and the per-GPU memory plan (training/memory.py), then exit")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def run(_) -> int:
        cfg = load_run_config(args.config, args.set)
        if args.dry_run:  # nothing distributed starts; the plan uses WORLD_SIZE when a launcher set it
            checked = preflight(cfg, resume=None, plan_only=True)  # a dry run refuses what the run would refuse
            dry_run(cfg, checked.notes)
            return 0
        try:
            train(cfg, resume=args.resume)
        except Preempted as e:
            log(str(e))
            return 143  # 128 + SIGTERM, as a shell reports a terminated job
        return 0

    return run_cli(run)


if __name__ == "__main__":
    exit_process(main())
