"""Everything a run can refuse, checked before any process group starts and before the run folder is touched.

``preflight(cfg, resume)`` is the first step of the recipe's setup and of ``train.py --dry-run``: the run folder
against ``--resume``, the model config with the RoPE method applied (and the training length against the model's original context),
the precision and attention kernel this machine (and the model's family) can give, the modules LoRA and the
trainable extras name, sequence parallelism against the
model's heads, the process count and the rows (training/parallel.py), the weights' format (pickles only with
``model.allow_pickle``), the tokenizer, the evaluation tasks' prompts against it (``EvalTask.check``: a length too
short for a prompt and its answer), the files the data sources name, and the DeepSpeed JSON with its ``auto``
values filled. Each refusal is a UserError (one ``error:`` line, exit status 2); nothing is written. (What only
reading the documents can find, such as a truncated ``.gz``, is found when rank 0 packs the data: still before the
run folder is written, see train.py's setup.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from configs.schema import RunConfig
from data.sources import expand_files
from eval.common import EvalError
from eval.registry import configured
from models.families import published_config
from models.load import ModelLoadError, check_weights_format
from training.checkpoint import prepare_run_dir
from training.engine import ds_config
from training.model import check_model_modules, model_config, tokenizer_of
from training.parallel import check_offload_checkpoints, check_sequence_parallel
from training.runtime import (
    TrainError,
    attn_implementation,
    choose_precision,
    device,
    launch_world,
    planned_attention,
)


@dataclass
class Preflight:
    """What setup needs from the checks: the checkpoint to resume from (None: a fresh run), the precision and the
    reason it was chosen, the attention kernel, the model config, the tokenizer, the DeepSpeed JSON; ``notes``: what
    a dry run could not check here, and why."""

    resume_from: Path | None
    precision: str
    precision_reason: str
    attn: str
    model_config: object
    tokenizer: object
    ds: dict
    notes: list[str]


def preflight(cfg: RunConfig, resume: str | None, plan_only: bool = False) -> Preflight:
    """Check ``cfg`` for a launch of ``launch_world`` processes; ``resume`` None skips the run
    folder check (a dry run writes nothing, so it may look at a folder that holds a run).

    ``plan_only`` (``train.py --dry-run``, often on a machine without the run's GPUs or the hub): the attention
    kernel is checked against the family, not against this machine; a hub config that cannot be fetched is taken
    from the published shapes (models/families.py), and then the tokenizer checks are skipped. Each such step is
    returned in ``notes``."""
    resume_from = None if resume is None else prepare_run_dir(cfg, Path(cfg.output.dir), resume)
    dev = device()
    precision, why = choose_precision(cfg.train.precision, dev)
    notes: list[str] = []
    try:
        config = model_config(cfg)
    except ModelLoadError as e:
        base = published_config(cfg.model.name) if plan_only else None
        if base is None:
            raise
        config = model_config(cfg, base=base)
        notes.append(f"model config: {str(e).rstrip('.')}; checked with models/families.py's published shape of {cfg.model.name}, "
                     "and the tokenizer not checked")
    attn = planned_attention(cfg, config) if plan_only else attn_implementation(cfg, dev, config)
    check_model_modules(cfg, config)
    world = launch_world(cfg, plan_only)
    check_sequence_parallel(cfg, config, attn, world)
    check_offload_checkpoints(cfg, dev)
    if cfg.model.init == "pretrained":
        check_weights_format(cfg.model.name, cfg.model.allow_pickle)
    tokenizer = None if notes else tokenizer_of(cfg)
    for task, settings in configured(cfg.eval):
        if task.check is not None and tokenizer is not None:
            try:
                task.check(settings, tokenizer)
            except EvalError as e:
                raise TrainError(f"eval.{task.name}: {e}") from None
    for spec in cfg.data.sources:
        if spec.kind == "files":
            expand_files(spec.path)  # a glob that matches nothing, a missing file, an unsupported type
    ds = ds_config(cfg, world)
    return Preflight(resume_from, precision, why, attn, config, tokenizer, ds, notes)
