"""The run config schema: one pydantic model per YAML section, each field documented.

A YAML file in ``configs/`` mirrors this schema section by section. ``load_run_config(path, overrides)`` reads it,
applies ``--set section.key=value`` overrides (values parsed as YAML), and validates. Any problem becomes one
``ConfigError`` line that names the key and, for unknown keys, the closest valid one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, create_model, model_validator

from data.config import DataConfig
from eval.registry import EVAL_TASKS
from utils.cli import UserError
from utils.schema import MAX_TOKENS, StrictModel, validate


Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


class ConfigError(UserError):
    """A config that cannot run; the message is one line naming the key and the fix."""


class ModelSection(StrictModel):
    name: str
    """The base model: a hub id, a local safetensors folder, a .gguf file, `smollm2-135m`, or a tiny preset
    (`tiny-llama`, `tiny-mistral`, `tiny-qwen2`)."""
    init: Literal["pretrained", "scratch"] = "pretrained"
    """`pretrained` loads the weights; `scratch` builds the architecture with random weights (testbed pretraining)."""
    arch: dict[str, Any] = {}
    """Config fields overriding the base model's (e.g. num_hidden_layers), mainly for `init: scratch`."""
    tokenizer: str | None = None
    """Tokenizer to use instead of the model's own (a name or folder understood by the model loader)."""
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    """Attention kernel; `auto` is flash_attention_2 when installed on a GPU, else sdpa."""
    trust_remote_code: bool = False
    """Run code shipped with a hub model. Off by default: it executes someone else's Python."""
    allow_pickle: bool = False
    """Load a model that has only `.bin` / `.pt` (pickle) weights. Off by default: only safetensors are loaded;
    when on, the pickle is read with `torch.load(weights_only=True)`, which refuses one that would run code."""


class RopeSection(StrictModel):
    method: str = "none"
    """RoPE scaling method, a key of ropescale.methods.ROPE_METHODS (`python -m ropescale inspect --help` lists them
    with one line each)."""
    factor: float = Field(default=1.0, ge=1.0, le=1e4)
    """Scale factor s: the target context is s x the model's original context."""
    params: dict[str, Any] = {}
    """Method parameters (beta_fast, beta_slow, alpha, beta, attention_factor, low_freq_factor, rope_theta, ...)."""
    original_len: int | None = Field(default=None, ge=2, le=MAX_TOKENS)
    """The model's original context; read from the model config when left empty."""
    rebase: bool = False
    """Allow replacing a scaling the base model already carries (computed from its original length, never
    compounded)."""
    layer_types: list[Literal["full_attention", "sliding_attention"]] | None = Field(default=None, min_length=1)
    """Models with one RoPE per layer type (Gemma 3, OLMo 3): the layer types the method scales. Unset: the
    full-attention layers only (Gemma 3's own recipe; the sliding-window layers never see positions further apart
    than their window). Refused for a model with one RoPE for every layer."""

    @model_validator(mode="after")
    def _known_method(self):
        from ropescale.methods import validate_method

        # The original length is checked against the model when the model config is known (train setup).
        validate_method(self.method, self.factor, dict(self.params), self.original_len or 1)
        return self


class LoraSection(StrictModel):
    enabled: bool = True
    """LoRA fine-tuning; false trains every weight (full fine-tuning)."""
    r: int = Field(default=8, ge=1, le=4096)
    """LoRA rank."""
    alpha: int = Field(default=16, ge=1, le=65536)
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Dropout on the LoRA input."""
    target_modules: list[str] = Field(default=["attention"], min_length=1)
    """Modules that get LoRA adapters: `attention` (the model family's attention linears, fused ones included),
    `mlp` (its MLP linears), `all-linear` alone (every linear but the LM head), or module names (models/families.py
    lists each family's; docs/families.md has the table)."""
    trainable_extra: list[str] = []
    """Modules trained in full beside LoRA: `embeddings` (the family's input embedding; a tied LM head follows it),
    `norms` (every norm), or module-name suffixes. LongLoRA, section 3.3: long-context LoRA needs trainable
    embeddings and norms."""


class TrainSection(StrictModel):
    max_steps: int | None = Field(default=100, ge=1, le=10**9)
    """Optimizer steps to run; with max_tokens the run stops at whichever comes first."""
    max_tokens: int | None = Field(default=None, ge=1, le=10**15)
    """Token budget (tokens seen across all ranks)."""
    micro_batch_size: int = Field(default=1, ge=1, le=4096)
    """Sequences per rank per forward pass."""
    grad_accum: int = Field(default=1, ge=1, le=65536)
    """Micro-batches accumulated per optimizer step."""
    lr: float = Field(default=2e-5, gt=0.0, le=1.0)
    """Peak learning rate (YaRN recipe: 2e-5)."""
    betas: tuple[Beta, Beta] = (0.9, 0.95)
    """AdamW betas (YaRN recipe: 0.9, 0.95)."""
    weight_decay: float = Field(default=0.0, ge=0.0, le=10.0)
    """AdamW weight decay (YaRN recipe: none)."""
    warmup_steps: int = Field(default=20, ge=0, le=10**9)
    """Linear warmup steps (YaRN recipe: 20)."""
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    """LR after warmup (YaRN recipe: constant)."""
    grad_clip: float = Field(default=1.0, ge=0.0, le=1e6)
    """Gradient norm clipping (YaRN recipe: 1.0); 0 turns clipping off."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """`auto`: bf16 on GPUs and on CPUs with bf16 matrix units (AMX / AVX512-BF16), fp32 elsewhere."""
    gradient_checkpointing: bool = True
    """Recompute activations in backward; works with LoRA (inputs made to require grad)."""
    checkpoint_keep_attention: bool = True
    """With gradient_checkpointing: keep each layer's attention output (sdpa / flash kernels) from the forward so the
    backward's recompute skips attention, the cost that grows with seq_len^2; costs seq_len x heads x head_dim
    activations (+ a log-sum-exp) per layer."""
    loss_chunk_size: int = Field(default=256, ge=1, le=MAX_TOKENS)
    """Positions per chunk of the lm_head + cross-entropy; the full [seq_len, vocab] logits never exist. A chunk's
    fp32 logits, their softmax and gradient cost ~3 x chunk x vocab x 4 B; 256 keeps that under 150 MB at 49k vocab."""
    sequence_parallel_size: int = Field(default=1, ge=1, le=4096)
    """Ranks that share one row (DeepSpeed Ulysses, docs/launch.md): each holds seq_len / size positions of it and
    attention trades sequence shards for head shards; the launch's process count must be a multiple of it (data
    parallelism runs over the rest). The model's attention heads must divide by it, and its key/value heads divide
    it or divide by it. 1: off."""
    tiled_mlp: bool = False
    """Run each MLP over tiles of the sequence (DeepSpeed's TiledMLP, ceil(positions / hidden_size) tiles): the
    [positions, intermediate_size] activations exist for one tile at a time, at the price of a second MLP forward
    in the backward."""
    offload_checkpoints: bool = False
    """GPUs, with gradient_checkpointing: keep each decoder layer's checkpointed input in pinned CPU memory between
    the forward and the backward (DeepSpeed's CheckpointHiddenStatesOffload, copies on a side stream), instead of
    n_layers x positions x hidden on the GPU."""
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    """Seed for weights (scratch/LoRA init), dropout and data order."""
    save_every: int = Field(default=50, ge=0, le=10**9)
    """Save a checkpoint every N optimizer steps (and always at the end); 0, or a value above max_steps, saves only
    at the end."""
    keep_last: int = Field(default=2, ge=0, le=10**6)
    """Checkpoints kept; older ones are deleted after a newer one is complete (0 keeps every one)."""
    log_every: int = Field(default=1, ge=1, le=10**9)
    """Print a progress line every N steps (metrics.jsonl gets every step)."""

    @model_validator(mode="after")
    def _budget(self):
        if self.max_steps is None and self.max_tokens is None:
            raise ValueError("set train.max_steps or train.max_tokens")
        return self


class DeepSpeedSection(StrictModel):
    config: str = "configs/deepspeed/zero2.json"
    """DeepSpeed JSON (configs/deepspeed/: zero0-3, offload variants); its `auto` values are filled from this
    config."""


class WandbSection(StrictModel):
    enabled: bool = True
    """Log to Weights & Biases."""
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    """`auto` is online when WANDB_API_KEY is set (or a login exists), offline otherwise."""
    project: str = "ropescale"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team or user)."""
    name: str | None = None
    """Run name; defaults to the run folder's name."""
    group: str | None = None
    """Run group (sweeps set it to the sweep's name)."""
    tags: list[str] = []
    """Run tags."""


class EvalSectionBase(StrictModel):
    """The ``eval:`` section: one optional sub-section per evaluation task of eval/registry.py, named after the task
    (``eval.perplexity``, ``eval.passkey``, ``eval.ruler``), whose keys are that task's settings (the same names as
    its command's options). A task whose sub-section is present runs on the merged model after training."""

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, raw):
        # The flat keys of older configs (eval.passkey_lengths, ...) are refused with the key that replaced them.
        if isinstance(raw, dict):
            for name, task in EVAL_TASKS.items():
                for old, new in task.renamed.items():
                    if old in raw and old != name:
                        raise ValueError(f"'{old}' is now 'eval.{name}.{new}' (one eval: sub-section per task, "
                                         f"e.g. eval: {{{name}: {{{new}: ...}}}}); rename it")
        return raw

    @model_validator(mode="after")
    def _some_task(self):
        if not any(getattr(self, name) is not None for name in EVAL_TASKS):
            raise ValueError(f"names no task; give {', '.join('eval.' + n for n in list(EVAL_TASKS)[:-1])} or "
                             f"eval.{list(EVAL_TASKS)[-1]} (`{{}}` runs a task with its defaults), or eval: null for "
                             "no evaluation")
        return self


EvalSection = create_model(
    "EvalSection",
    __base__=EvalSectionBase,
    **{name: (task.settings | None, Field(default=None, description=task.description))
       for name, task in EVAL_TASKS.items()},
)


class OutputSection(StrictModel):
    dir: str
    """The run folder: config.yaml, metrics.jsonl, checkpoints/, adapter/, merged/, eval/."""


class RunConfig(StrictModel):
    model: ModelSection
    """The base model."""
    rope: RopeSection = RopeSection()
    """The RoPE scaling applied before the model is built."""
    data: DataConfig
    """Training data (sources, seq_len, packing mode)."""
    lora: LoraSection = LoraSection()
    """LoRA or full fine-tuning."""
    train: TrainSection = TrainSection()
    """Optimizer, schedule, precision, checkpoints."""
    deepspeed: DeepSpeedSection = DeepSpeedSection()
    """DeepSpeed engine config."""
    wandb: WandbSection = WandbSection()
    """Weights & Biases logging."""
    eval: EvalSection | None = None
    """Evaluation of the merged model after training, one sub-section per task (``eval.passkey``, ...); omitted: no
    evaluation."""
    output: OutputSection
    """Where the run is written."""


def set_dotted(raw: dict, dotted: str, value: Any) -> None:
    """Set ``raw['a']['b'] = value`` for ``dotted='a.b'``, creating sections as needed."""
    *parents, leaf = dotted.split(".")
    node = raw
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{p}' is not a section")
    node[leaf] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["train.max_steps=5", "rope.factor=4"]`` -> [(key, YAML-parsed value)]."""
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value (e.g. train.max_steps=10), got '{item}'")
        out.append((key.strip(), yaml.safe_load(value)))
    return out


def validate_run_config(raw: dict) -> RunConfig:
    """Validate a config dict (already merged with overrides)."""
    return validate(RunConfig, raw, ConfigError)


def load_run_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config, apply ``key=value`` overrides, validate. Raises ConfigError (one line)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (model, rope, data, ...)")
    for key, value in parse_overrides(list(overrides)):
        set_dotted(raw, key, value)
    return validate_run_config(raw)
