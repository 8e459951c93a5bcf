"""The training paths that bench/train_throughput.py and bench/max_seq_len.py compare, and the worker that runs one.

    python bench/train_paths.py --variant ours --model tiny-llama --lengths 256,512 --threads 1   # one worker, JSON out

Variants (``VARIANTS``):

- ``ours*``: train.py's own training step, built by the public functions the recipe calls (``training.runtime``
  ``choose_precision`` / ``attn_implementation`` / ``init_distributed``, ``training.model.model_config``,
  ``training.engine.ds_config`` / ``trainable_engine`` / ``optimizer_step``): LoRA + trainable extras,
  non-reentrant gradient checkpointing, the chunked loss, the DeepSpeed engine of the config (ZeRO-2 for the three
  models here), one optimizer step of ``engine(batch)`` / ``engine.backward`` / ``engine.step``. ``ours`` is the
  default precision (``train.precision: auto``); ``ours-zero2x2`` is the same with two processes (one row each,
  data parallel).
- ``trainer*``: what a user would run instead: transformers ``Trainer`` + a peft ``LoraConfig`` with the same
  r / alpha / targets (``training.model.lora_config``) and the same trainable extras, ``activation_checkpointing=True``
  (formerly ``gradient_checkpointing``), one sequence per step, the model's own loss from ``labels`` (full logits),
  the same model with the same RoPE scaling (``training.model.model_config``) and attention kernel. ``trainer`` is the
  Trainer's default fp32, ``trainer-bf16`` adds ``bf16=True`` (autocast over fp32 weights).

Both get the same tokens: the first tokens of the bundled train split (``bench/common.corpus_tokens``), one row per
step, positions 0..L-1, all-ones attention mask (plain causal attention). The worker runs its rows in the order given
(a short warm-up row first: first-call allocations, kernel selection and the optimizer's states are created there)
and measures each optimizer step: wall time, and the peak RSS during the step (VmHWM reset before it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import corpus_tokens, parse_list, reset_peak, run_children, status_mib  # noqa: E402
from models.build import build_model  # noqa: E402
from models.load import load_tokenizer  # noqa: E402
from ropescale.apply import head_dim_of  # noqa: E402
from training.engine import ds_config, optimizer_step, trainable_engine  # noqa: E402
from training.model import extra_param_names, lora_config, model_config  # noqa: E402
from training.parallel import check_offload_checkpoints, data_parallel_size, sequence_parallel_sizes, shard_rows  # noqa: E402
from training.runtime import attn_implementation, choose_precision, device, init_distributed, shutdown  # noqa: E402
from utils.cli import exit_process, free_port  # noqa: E402
from utils.schema import Length  # noqa: E402


class Variant(NamedTuple):
    kind: str  # "ours" or "trainer"
    precision: str  # "auto" (our default), "fp32" or "bf16"
    procs: int
    label: str
    sets: tuple[str, ...] = ()  # run-config overrides of this variant


VARIANTS = {
    "ours-fp32": Variant("ours", "fp32", 1, "ours fp32"),
    "ours": Variant("ours", "auto", 1, "ours default"),
    "ours-bf16": Variant("ours", "bf16", 1, "ours bf16"),
    "ours-zero2x2": Variant("ours", "auto", 2, "ours default, ZeRO-2 x2 procs"),
    # one row split over the fewest processes the model's heads split over (procs 0: ``sp_size``; SmolLM2-135M's
    # 9 heads and 3 key/value heads: 3, tiny-llama: 2), DeepSpeed Ulysses (training/parallel.py); tiled MLPs
    "ours-tiled": Variant("ours", "auto", 1, "ours default, tiled MLP", ("train.tiled_mlp=true",)),
    "ours-sp": Variant("ours", "auto", 0, "ours default, seq. parallel"),
    "ours-sp-tiled": Variant("ours", "auto", 0, "ours default, seq. par. + tiled MLP", ("train.tiled_mlp=true",)),
    "ours-offload": Variant("ours", "auto", 1, "ours default, checkpoints in CPU memory",  # GPUs only
                            ("train.offload_checkpoints=true",)),
    "trainer": Variant("trainer", "fp32", 1, "Trainer default (fp32)"),
    "trainer-bf16": Variant("trainer", "bf16", 1, "Trainer bf16=True"),
}


class ModelSpec(NamedTuple):
    config: str
    lengths: tuple[int, ...]
    overrides: tuple[str, ...]
    note: str


MODELS = {
    "smollm2-135m": ModelSpec("configs/smollm2/yarn_16k.yaml", (2048, 4096, 8192), (),
                              "SmolLM2-135M-Instruct, YaRN s=2, LoRA r=8 + trainable embedding and norms"),
    # The testbed architecture (configs/testbed/base.yaml: 4 layers, hidden 256, vocab 4096) with random weights
    # (speed and memory do not depend on them) and the byte-level tokenizer (its ids fit the vocabulary), so that
    # no testbed needs to be built first; LoRA as in configs/testbed/yarn_8x.yaml.
    "testbed": ModelSpec("configs/testbed/yarn_8x.yaml", (1024, 2048, 4096), ("model.tokenizer=tiny-llama",),
                         "testbed architecture, random init, YaRN s=8, LoRA r=16 + trainable embedding and norms"),
    "tiny-llama": ModelSpec("configs/cpu_tiny.yaml", (256, 512), (),
                            "tiny-llama preset (2 layers, hidden 64), YaRN s=2, LoRA r=8 (for the tests)"),
}

# Both paths train one sequence per step with checkpointing; concat rows (positions 0..L-1, plain causal attention)
# so that the Trainer path sees exactly what ours sees.
_COMMON_OVERRIDES = ("train.micro_batch_size=1", "train.grad_accum=1", "train.gradient_checkpointing=true",
                     "data.mode=concat", "data.block_cross_doc=false", "wandb.enabled=false", "eval=null")


def run_config(model: str, sets: tuple[str, ...] = ()):
    """The RunConfig the bench trains ``model`` with, plus a variant's ``sets`` (data.seq_len is left as configured:
    it only has to reach the model's original context, and the rows' lengths come from the bench)."""
    import yaml

    from configs.schema import load_run_config

    spec = MODELS[model]
    overrides = list(spec.overrides)
    if model == "testbed":
        section = yaml.safe_load((ROOT / "configs/testbed/base.yaml").read_text())["model"]
        overrides.insert(0, "model=" + json.dumps({k: section[k] for k in ("name", "init", "arch")}))
    return load_run_config(ROOT / spec.config, [*overrides, *_COMMON_OVERRIDES, *sets])


def sp_size(model: str) -> int:
    """The smallest sequence-parallel size above 1 that ``model``'s heads split over (training/parallel.py)."""
    return sequence_parallel_sizes(model_config(run_config(model)))[1]


def variant_setup(variant: str, model: str) -> tuple[int, tuple[str, ...]]:
    """(processes, run-config overrides) of ``variant`` on ``model``."""
    v = VARIANTS[variant]
    if v.procs:
        return v.procs, v.sets
    size = sp_size(model)
    return size, (*v.sets, f"train.sequence_parallel_size={size}")


def parse_lengths(text: str) -> list[int]:
    """``--lengths``: comma-separated token counts."""
    return parse_list(text, Length, "--lengths")


def check_choice(value: str, choices, flag: str) -> list[str]:
    """Comma-separated names, each one of ``choices``."""
    names = [v for v in value.split(",") if v]
    bad = [v for v in names if v not in choices]
    if bad or not names:
        raise SystemExit(f"error: {flag}: unknown '{','.join(bad) or value}'; choose from {', '.join(choices)}")
    return names


def flops_per_token(info: dict, seq_len: int) -> float:
    """Model FLOPs per trained token, PaLM's convention (appendix B): 6 N + 12 n_layers d_attn L, no recompute.

    N counts the weights that take part in matmuls: every parameter except a separate input embedding (a lookup);
    a tied embedding is counted once, as the LM head. d_attn = heads x head_dim. With LoRA the frozen weights need
    no weight gradients, so 6 N overstates the work done; the convention is kept so that figures compare with
    published MFU, and both paths are counted alike.
    """
    return 6 * info["n_params_flops"] + 12 * info["n_layers"] * info["attn_dim"] * seq_len


# ------------------------------------------------------------------------------------------------------ launching


def launch(variant: str, model: str, lengths: list[int], warmup_len: int, threads: int,
           cap_mib: float | None = None):
    """Run ``variant`` in its own process(es); returns (combined result or None, the children)."""
    v = VARIANTS[variant]
    procs, _ = variant_setup(variant, model)
    per_proc = max(1, threads // procs)
    base_env = {k: x for k, x in os.environ.items()
                if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    # OMP_NUM_THREADS per process: oversubscribed threads cost 30x on a few cores (docs/notes.md); with it set,
    # training.runtime.init_distributed leaves the thread count alone.
    base_env["OMP_NUM_THREADS"] = str(per_proc)
    port = str(free_port())
    cmds, envs = [], []
    for rank in range(procs):
        env = dict(base_env)
        if procs > 1:
            env.update(RANK=str(rank), WORLD_SIZE=str(procs), LOCAL_RANK=str(rank),
                       LOCAL_WORLD_SIZE=str(procs), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        cmds.append([sys.executable, __file__, "--variant", variant, "--model", model,
                     "--lengths", ",".join(map(str, lengths)), "--warmup-len", str(warmup_len),
                     "--threads", str(per_proc)])
        envs.append(env)
    children = run_children(cmds, f"{v.label} on {model}", envs, cap_mib=cap_mib)
    if cap_mib is not None and (children[0].over_cap or any(c.returncode for c in children)):
        return None, children
    return combine([c.result() for c in children]), children


def combine(ranks: list[dict]) -> dict:
    """One result from the ranks of a multi-process run: a step lasts as long as its slowest rank, trains every
    rank's row, and its peak RSS is the sum of the ranks' peaks (each also kept)."""
    out = dict(ranks[0])
    out["steps"] = []
    for steps in zip(*(r["steps"] for r in ranks)):
        out["steps"].append({
            "seq_len": steps[0]["seq_len"],
            "tokens": sum(s["tokens"] for s in steps),
            "seconds": max(s["seconds"] for s in steps),
            "peak_rss_mib": sum(s["peak_rss_mib"] for s in steps),
            "peak_rss_mib_per_proc": [s["peak_rss_mib"] for s in steps],
            "start_rss_mib": sum(s["start_rss_mib"] for s in steps),
            "peak_dev_mib": steps[0]["peak_dev_mib"],
            "loss": steps[0]["loss"],
        })
    out["load_peak_rss_mib"] = sum(r["load_peak_rss_mib"] for r in ranks)
    return out


# --------------------------------------------------------------------------------------------------------- worker


class _StepMeter:
    """Wall time and peak memory of one optimizer step (RSS high-water mark; on GPUs also the allocator's peak)."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.start_rss = reset_peak()
        self.t0 = time.perf_counter()

    def stop(self) -> dict:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - self.t0
        dev = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else None
        return {"seconds": seconds, "peak_rss_mib": status_mib("VmHWM"), "start_rss_mib": self.start_rss,
                "peak_dev_mib": dev}


def _model_info(model) -> dict:
    """What flops_per_token needs, from the base model under any peft wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    n = sum(p.numel() for name, p in base.named_parameters() if "lora_" not in name)  # tied weights counted once
    embed, head = base.get_input_embeddings().weight, base.get_output_embeddings().weight
    if embed is not head:
        n -= embed.numel()
    return {"n_params_flops": n, "n_layers": cfg.num_hidden_layers,
            "attn_dim": cfg.num_attention_heads * head_dim_of(cfg),
            "n_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def ours_steps(cfg, precision: str, batches: list[dict], dev: torch.device) -> dict:
    """The recipe's setup and optimizer step (the same public functions train.py's ``Recipe`` calls, in the same
    order; its bookkeeping, logging and checkpointing are left out), one step per batch of ``batches`` (dicts of
    input_ids, labels, position_ids ``[B, L]``), each timed."""
    precision, why = choose_precision(precision, dev)
    config = model_config(cfg)
    attn = attn_implementation(cfg, dev, config)
    check_offload_checkpoints(cfg, dev)
    ds = ds_config(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    rank, world = init_distributed(dev)
    try:
        module, engine = trainable_engine(cfg, config, precision, attn, ds, len(batches))
        engine.train()
        load_peak = status_mib("VmHWM")
        meter, steps = _StepMeter(dev), []
        for batch in batches:
            torch.distributed.barrier()  # ranks start each timed step together
            meter.start()
            loss = optimizer_step(engine, iter([batch]), 1, dev, offload_checkpoints=cfg.train.offload_checkpoints)
            steps.append({**meter.stop(), "loss": loss.item()})
        info = _model_info(module.model)
    finally:
        shutdown()
    return {"precision": precision, "precision_reason": why, "attn": attn, "rank": rank, "world": world,
            "load_peak_rss_mib": load_peak, "steps": steps, **info}


def _run_ours(cfg, precision: str, rows: list[torch.Tensor], dev: torch.device) -> dict:
    """``ours_steps`` on ``rows`` in order: one row per step, positions 0..L-1, labels = inputs."""
    batches = [{"input_ids": r[None], "labels": r[None], "position_ids": torch.arange(len(r))[None]} for r in rows]
    sp = cfg.train.sequence_parallel_size
    if sp > 1:  # this rank's positions of each row (sequence parallelism)
        batches = [shard_rows(b, int(os.environ.get("RANK", "0")) % sp, sp) for b in batches]
    return ours_steps(cfg, precision, batches, dev)


def _run_trainer(cfg, precision: str, rows: list[torch.Tensor], dev: torch.device) -> dict:
    """transformers Trainer + peft on ``rows`` in order, one optimizer step each, timed by a callback."""
    from peft import get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    config = model_config(cfg)
    attn = attn_implementation(cfg, dev, config)
    model = build_model(cfg.model.name, config, dtype=torch.float32, attn_implementation=attn,
                        trust_remote_code=cfg.model.trust_remote_code, seed=cfg.train.seed,
                        scratch=cfg.model.init == "scratch")
    if hasattr(model.config, "quantization_config"):
        # models.load drops the entry a GGUF-converted model keeps; Trainer refuses to train a model that carries it
        # ("quantization method do not support training"), so a loader that let it through is named here.
        raise SystemExit(f"error: {cfg.model.name} still carries quantization_config; Trainer would refuse it")
    model = get_peft_model(model, lora_config(cfg, config))
    for name in extra_param_names(model, config, cfg.lora.trainable_extra):  # the same trainable set as ours
        model.get_parameter(name).requires_grad_(True)
    meter, steps, losses = _StepMeter(dev), [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            meter.start()

        def on_step_end(self, args, state, control, **kwargs):
            steps.append(meter.stop())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    data = [{"input_ids": r, "labels": r, "attention_mask": torch.ones_like(r)} for r in rows]
    load_peak = status_mib("VmHWM")
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=1, max_steps=len(rows), activation_checkpointing=True,
            bf16=precision == "bf16", use_cpu=dev.type == "cpu", train_sampling_strategy="sequential",
            dataloader_num_workers=0, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
            logging_strategy="steps", logging_steps=1)  # each step's loss, through on_log
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[Timer()])
        trainer.remove_callback(PrinterCallback)  # it would print every log dict to stdout
        trainer.train()
    steps = [{**s, "loss": loss} for s, loss in zip(steps, losses)]
    return {"precision": precision, "precision_reason": "TrainingArguments(bf16=...)", "attn": attn, "rank": 0,
            "world": 1, "load_peak_rss_mib": load_peak, "steps": steps, **_model_info(model)}


def worker(variant: str, model: str, lengths: list[int], warmup_len: int, threads: int) -> dict:
    """Run ``variant`` on a warm-up row of ``warmup_len`` tokens, then on one row per length, in that order."""
    torch.set_num_threads(threads)
    v = VARIANTS[variant]
    cfg, dev = run_config(model, variant_setup(variant, model)[1]), device()
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    sp = cfg.train.sequence_parallel_size
    longest = max([warmup_len, *lengths])
    # Each data-parallel rank trains its own row: data-parallel rank d reads its rows from the d-th stretch of the
    # corpus (the ranks of a sequence-parallel group share one, each training its part of the positions).
    dp_rank, dp = rank // sp, data_parallel_size(cfg, world)
    ids = corpus_tokens(tokenizer, dp * longest)[dp_rank * longest:]
    # a row splits into equal parts: under sequence parallelism each length is cut to a multiple of the group size
    trained = [n - n % sp for n in [warmup_len, *lengths]]
    rows = [ids[:n] for n in trained]
    run = _run_ours if v.kind == "ours" else _run_trainer
    result = run(cfg, v.precision, rows, dev)
    for step, n in zip(result["steps"], trained):
        step.update(seq_len=n, tokens=n // sp)  # a row counted once over its group's ranks
    return {"variant": variant, "label": v.label, "model": model, "threads": threads, "device": str(dev),
            **result}


def main() -> None:
    ap = argparse.ArgumentParser(description="Run one training path on a warm-up row and then one row per length; "
                                             "prints one JSON object")
    ap.add_argument("--variant", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--lengths", required=True)
    ap.add_argument("--warmup-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    check_choice(args.variant, VARIANTS, "--variant")
    check_choice(args.model, MODELS, "--model")
    print(json.dumps(worker(args.variant, args.model, parse_lengths(args.lengths), args.warmup_len, args.threads)),
          flush=True)


if __name__ == "__main__":
    main()
    exit_process(0)
