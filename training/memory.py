"""The per-GPU memory plan of a ``train.py`` run, computed before the run from the model's shape and the run config.

    python -m launch.memory --config configs/ntk_parts_32k.yaml --world-size 8 [--gpu-mem-gib 80] [--set k=v ...]
    python train.py --config configs/cpu_tiny.yaml --dry-run             # one process: world size 1
    deepspeed --num_gpus 8 train.py --config configs/ntk_parts_32k.yaml --dry-run   # WORLD_SIZE from the launcher

Each line of the plan is one kind of memory, in bytes per GPU (docs/launch.md derives every formula):

- weights: the frozen base in bf16 (LoRA under ``train.precision`` bf16/auto) or fp32, and the trainable parameters
  (LoRA, ``lora.trainable_extra``, or every weight) in fp32. train.py runs bf16 through autocast and keeps trainable
  weights in fp32, so DeepSpeed takes its fp32 path: no separate master copy. ZeRO-3 splits all weights over the GPUs.
- gradients (fp32, trainable only; split for ZeRO >= 2) and AdamW's two fp32 moments (split for ZeRO >= 1); the
  offload configs move them (and, for ``offload_param``, the weights) to CPU memory.
- activations with gradient checkpointing: every decoder layer's input is kept, and with
  ``train.checkpoint_keep_attention`` (sdpa / flash) its attention output and log-sum-exp; one layer at a time is
  recomputed in the backward, with the tensors autograd saves for it (counted from what PyTorch actually saves, see
  ``layer_activation_bytes``) and its gradients. sdpa and flash attention add no L x L term; ``eager`` keeps the
  attention probabilities (heads x L^2); a document mask (``data.block_cross_doc`` with sdpa/eager) is L^2.
- the loss: the final hidden states and the chunked LM head (``models.loss``: 3 x chunk x vocab fp32 floats).

Not modelled, and the reason a plan fits only with 10% of the GPU left free: the CUDA context, NCCL buffers,
DeepSpeed's communication buckets and allocator fragmentation.

The model's shape comes from its config (``models.load.load_config``); for a few hub models whose config cannot
be fetched (no network, gated repository) a built-in table of their published shapes is used, and the plan says so.
Parameter counts come from building the exact model train.py builds (base + LoRA + trainable extras) on PyTorch's
``meta`` device: no memory, no weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import yaml

from configs.schema import ConfigError, RunConfig
from models.build import apply_arch
from models.families import PUBLISHED, family_of, head_counts, lora_targets, published_config
from ropescale.apply import head_dim_of
from training.checkpoint import public_config
from training.engine import ds_config
from training.model import extra_param_names, lora_config  # the same LoRA and trainable extras as the run
from training.parallel import check_sequence_parallel
from training.runtime import launch_world, planned_attention
from utils.log import rank

GIB = 2**30
RESERVE = 0.10  # fraction of GPU memory left for what the plan does not model (see module docstring)

class MemoryPlanError(ConfigError):
    """A config the memory plan cannot be computed for; one line naming the problem and the fix."""


@dataclass(frozen=True)
class Shape:
    """The decoder's sizes and its family's linears (name -> role, models.families.Family.linears): a layer is
    attention (inputs, then an output projection) + an MLP (inputs, then an output projection) + norms."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    linears: dict[str, str]
    gated_mlp: bool = True

    def in_features(self, linear: str) -> int:
        """Input width of a linear: the attention output for ``attn_out``, the MLP's for ``mlp_out``, else hidden."""
        role = self.linears[linear]
        return {"attn_out": self.heads * self.head_dim, "mlp_out": self.intermediate}.get(role, self.hidden)


@dataclass(frozen=True)
class Params:
    """Parameter counts of the model train.py builds, and which parts of it train."""

    total: int
    trainable: int
    lora: int
    largest_module: int  # the most parameters ZeRO-3 gathers at once: one decoder layer, or the embedding
    trainable_linears: frozenset[str]  # the family's linears that train (LoRA targets, or all in full fine-tuning)
    embed_trainable: bool
    norm_trainable: bool


@dataclass(frozen=True)
class Setup:
    """The run settings that decide memory."""

    world: int
    micro_batch: int
    seq_len: int
    precision: str  # bf16 | fp32
    lora: bool
    lora_r: int
    lora_dropout: float
    zero_stage: int
    offload_optimizer: bool
    offload_param: bool
    checkpointing: bool
    keep_attention: bool  # train.checkpoint_keep_attention: each layer's attention output kept under checkpointing
    attention: str  # sdpa | eager | flash_attention_2
    doc_mask: bool  # documents isolated inside a row by an L x L mask (block_cross_doc with sdpa/eager)
    loss_chunk: int
    sp: int = 1  # train.sequence_parallel_size: ranks sharing one row, each holding seq_len / sp positions
    tiled_mlp: bool = False  # train.tiled_mlp: MLP activations for one tile of ~hidden positions at a time
    offload_checkpoints: bool = False  # train.offload_checkpoints: layer inputs in CPU memory between fwd and bwd


@dataclass(frozen=True)
class Item:
    name: str
    gpu: float  # bytes per GPU
    cpu: float  # bytes per process in CPU memory (offload)
    how: str


@dataclass(frozen=True)
class MemoryPlan:
    items: list[Item]
    gpu_mem_gib: float
    header: list[str]
    notes: list[str]

    @property
    def total(self) -> float:
        return sum(i.gpu for i in self.items)

    @property
    def cpu_total(self) -> float:
        return sum(i.cpu for i in self.items)

    @property
    def fits(self) -> bool:
        return self.total <= (1 - RESERVE) * self.gpu_mem_gib * GIB


# --------------------------------------------------------------------------------------------------- model shape


def planned_config(cfg: RunConfig):
    """(config, where it came from): the base model's config with ``model.arch`` overrides applied."""
    from models.load import ModelLoadError, load_config

    name = cfg.model.name
    try:
        config = load_config(name, trust_remote_code=cfg.model.trust_remote_code)
        source = "the model's config"
    except ModelLoadError as e:
        if name not in PUBLISHED:
            raise MemoryPlanError(f"{e}; the memory plan needs the model's config (offline it knows only "
                                  f"{', '.join(PUBLISHED)})") from None
        config = published_config(name)
        source = "models/families.py's table of published shapes: the config could not be read here"
    return apply_arch(config, dict(cfg.model.arch)), source


def shape_of(config) -> Shape:
    needed = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    missing = [k for k in needed if getattr(config, k, None) is None]
    if missing:
        raise MemoryPlanError(f"{type(config).__name__} has no {', '.join(missing)}: the memory plan knows "
                              "decoders with attention + MLP blocks (models/families.py)")
    heads, kv_heads = head_counts(config)
    family = family_of(config)
    return Shape(hidden=config.hidden_size, layers=config.num_hidden_layers, heads=heads, kv_heads=kv_heads,
                 head_dim=head_dim_of(config), intermediate=config.intermediate_size, vocab=config.vocab_size,
                 linears=family.linears, gated_mlp=family.gated_mlp)


def count_params(cfg: RunConfig, config) -> Params:
    """Build the model train.py builds (base, LoRA with the same settings, trainable extras) on the meta device and
    count its parameters."""
    import warnings

    import torch
    from transformers import AutoModelForCausalLM


    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    base = model
    if cfg.lora.enabled:
        from peft import get_peft_model

        with warnings.catch_warnings():  # peft calls a transformers accessor deprecated in v5: noise here
            warnings.simplefilter("ignore", FutureWarning)
            model = get_peft_model(model, lora_config(cfg, config))
        for name in extra_param_names(model, config, cfg.lora.trainable_extra):
            model.get_parameter(name).requires_grad_(True)
    else:
        model.requires_grad_(True)
    named = dict(model.named_parameters())
    trainable = {n: p for n, p in named.items() if p.requires_grad}
    modules = {n.rsplit(".", 1)[0] for n in trainable}
    family = family_of(config)
    linears = frozenset(lin for lin in family.linears if any(lin in m.split(".") for m in modules))
    layer = base.get_decoder().layers[0] if hasattr(base, "get_decoder") else None
    embed = base.get_input_embeddings()
    largest = max(sum(p.numel() for p in layer.parameters()) if layer is not None else 0,
                  embed.weight.numel())
    return Params(
        total=sum(p.numel() for p in named.values()),
        trainable=sum(p.numel() for p in trainable.values()),
        lora=sum(p.numel() for n, p in trainable.items() if "lora_" in n),
        largest_module=largest,
        trainable_linears=linears,
        embed_trainable=any(family.embedding in m for m in modules),
        norm_trainable=any(m.endswith(family.norm) for m in modules),
    )


# ----------------------------------------------------------------------------------------------------- settings


def setup_of(cfg: RunConfig, world: int, config) -> Setup:
    """The memory-relevant settings of ``cfg`` on ``world`` GPUs for a model with ``config``. ``auto`` precision is
    planned as bf16 (every current data-centre GPU has it) and the attention kernel as ``planned_attention`` says."""
    zero = ds_config(cfg, world).get("zero_optimization", {})

    def on_cpu(key: str) -> bool:
        return str(zero.get(key, {}).get("device", "none")).lower() == "cpu"

    attention = planned_attention(cfg, config)
    return Setup(
        world=world, micro_batch=cfg.train.micro_batch_size, seq_len=cfg.data.seq_len,
        precision="bf16" if cfg.train.precision == "auto" else cfg.train.precision,
        lora=cfg.lora.enabled, lora_r=cfg.lora.r, lora_dropout=cfg.lora.dropout,
        zero_stage=int(zero.get("stage", 0)), offload_optimizer=on_cpu("offload_optimizer"),
        offload_param=on_cpu("offload_param"), checkpointing=cfg.train.gradient_checkpointing,
        keep_attention=cfg.train.checkpoint_keep_attention and attention != "eager",
        attention=attention, doc_mask=cfg.data.block_cross_doc and attention != "flash_attention_2",
        loss_chunk=cfg.train.loss_chunk_size, sp=cfg.train.sequence_parallel_size, tiled_mlp=cfg.train.tiled_mlp,
        offload_checkpoints=cfg.train.offload_checkpoints and cfg.train.gradient_checkpointing)


# --------------------------------------------------------------------------------------------------- the formula


def dtype_bytes(p: Params, s: Setup) -> dict[str, int]:
    """Bytes per element: ``frozen`` base weights; ``act`` matmul outputs (bf16 under autocast); ``resid`` the
    residual stream, which takes the embedding output's dtype (train.py casts a trainable fp32 embedding's output
    to the bf16 base dtype, so it is fp32 only with an fp32 base); ``norm`` RMSNorm outputs (weight x input: a
    trainable fp32 norm weight promotes them to fp32)."""
    frozen = 2 if s.precision == "bf16" and s.lora else 4
    act = 2 if s.precision == "bf16" else 4
    resid = 4 if frozen == 4 else 2
    norm = 4 if (p.norm_trainable or resid == 4) else 2
    return dict(frozen=frozen, act=act, resid=resid, norm=norm)


def layer_activation_bytes(shape: Shape, p: Params, s: Setup) -> int:
    """Bytes per token that autograd saves inside one decoder layer (its input excluded), sdpa/flash attention.

    Counted from the tensors PyTorch saves (checked against saved-tensor hooks in tests/test_launch_memory.py):
    - each RMSNorm saves its input upcast to fp32 (the first one shares the layer input when that is fp32) and a
      per-token rsqrt; a trainable norm also keeps its normalized input, cast back to the residual dtype, for its
      weight gradient;
    - frozen linears save no input; a trainable one (LoRA or full fine-tuning) saves its input: under bf16 autocast
      each module its own bf16 copy, in fp32 one shared tensor per input (q/k/v share one, gate/up share one, o's
      is the attention output); LoRA dropout adds its mask and output in the input's dtype per module; lora_A's
      output (r features) is saved for lora_B;
    - attention keeps q, k, v, its output (act dtype) and a per-head fp32 log-sum-exp; under sequence parallelism
      (Ulysses) a rank holds heads / sp of them over all positions, the same bytes per local token, except that
      key/value heads fewer than sp are replicated to one per rank (max(kv, sp) per local token);
    - the MLP keeps gate, up and silu(gate) outputs; tiled (TiledMLP) only its input, the tiles' activations being
      recomputed in the backward one tile at a time (``plan_items``' "tiled MLP, one tile").
    """
    b = dtype_bytes(p, s)
    h, i, heads, kv, d = shape.hidden, shape.intermediate, shape.heads, shape.kv_heads, shape.head_dim
    norms = (0 if b["resid"] == 4 else 4 * h) + 4 * h + 2 * 4
    if p.norm_trainable:
        norms += 2 * b["resid"] * h
    in_bytes = {lin: b["norm"] if role in ("attn_in", "mlp_in") else b["act"] for lin, role in shape.linears.items()}
    dropout = s.lora and s.lora_dropout > 0
    if b["act"] == 2:
        linears = sum(shape.in_features(lin) * (2 + (2 * in_bytes[lin] if dropout else 0))
                      for lin in p.trainable_linears)
    elif dropout:
        linears = sum(shape.in_features(lin) * 2 * 4 for lin in p.trainable_linears)
    else:
        # one shared fp32 input per role: the attention inputs share the normed residual, the MLP inputs too
        groups = [{n for n, r in shape.linears.items() if r == role} for role in ("attn_in", "mlp_in", "mlp_out")]
        linears = sum(4 * shape.in_features(next(iter(g))) for g in groups if p.trainable_linears & g)
    lora_out = len(p.trainable_linears) * s.lora_r * b["act"] if s.lora else 0
    kv = max(kv, s.sp) if s.sp > 1 else kv
    attention = (2 * heads * d + 2 * kv * d) * b["act"] + heads * 4
    mlp = h * b["norm"] if s.tiled_mlp else (3 if shape.gated_mlp else 2) * i * b["act"]
    return norms + linears + lora_out + attention + mlp


def plan_items(shape: Shape, p: Params, s: Setup) -> list[Item]:
    """The plan's lines (bytes per GPU), from the model shape, parameter counts and settings."""
    b = dtype_bytes(p, s)
    # T: the positions this GPU holds (a row's seq_len / sp under sequence parallelism); ZeRO shards over all W
    # ranks (DeepSpeed's sequence-data-parallel group).
    W, T, L = s.world, s.micro_batch * s.seq_len // s.sp, s.seq_len
    h, i, V = shape.hidden, shape.intermediate, shape.vocab
    frozen = p.total - p.trainable
    split_w = W if s.zero_stage == 3 else 1
    split_g = W if s.zero_stage >= 2 else 1
    split_o = W if s.zero_stage >= 1 else 1

    def place(nbytes: float, on_cpu: bool) -> tuple[float, float]:
        return (0.0, nbytes) if on_cpu else (nbytes, 0.0)

    zero = f"ZeRO-{s.zero_stage}"
    items = [
        Item("frozen weights", *place(frozen * b["frozen"] / split_w, s.offload_param),
             f"{frozen:,} x {b['frozen']} B" + (f" / {W} ({zero})" if split_w > 1 else "")
             + (" on CPU (offload_param)" if s.offload_param else "")),
        Item("trainable weights (fp32)", *place(p.trainable * 4 / split_w, s.offload_param),
             f"{p.trainable:,} x 4 B" + (f" / {W}" if split_w > 1 else "")),
        Item("gradients (fp32)", *place(p.trainable * 4 / split_g, s.offload_optimizer),
             f"{p.trainable:,} x 4 B" + (f" / {W} ({zero})" if split_g > 1 else "")
             + (" on CPU (offload_optimizer)" if s.offload_optimizer else "")),
        Item("optimizer states (AdamW, fp32)", *place(p.trainable * 8 / split_o, s.offload_optimizer),
             f"{p.trainable:,} x 2 moments x 4 B" + (f" / {W} ({zero})" if split_o > 1 else "")
             + (" on CPU (offload_optimizer)" if s.offload_optimizer else "")),
    ]
    if s.zero_stage == 3:
        items.append(Item("ZeRO-3 gathered module", p.largest_module * b["frozen"], 0.0,
                          f"the largest layer or embedding gathered whole: {p.largest_module:,} x {b['frozen']} B"))
    per_layer = layer_activation_bytes(shape, p, s)
    rope = 2 * shape.head_dim * b["resid"]  # cos and sin, shared by all layers
    if s.checkpointing:
        if s.offload_checkpoints:  # DeepSpeed keeps the newest one on the GPU (keep_last_count 1)
            items.append(Item("layer inputs (checkpoints)", T * (h * b["resid"] + rope),
                              T * (shape.layers - 1) * h * b["resid"],
                              f"{T:,} tokens x ({h} x {b['resid']} B + cos/sin) on the GPU, {shape.layers - 1} "
                              "layers' inputs in CPU memory (train.offload_checkpoints)"))
        else:
            items.append(Item("layer inputs (checkpoints)", T * (shape.layers * h * b["resid"] + rope), 0.0,
                              f"{T:,} tokens x ({shape.layers} layers x {h} x {b['resid']} B + cos/sin)"))
        if s.keep_attention:
            kept = shape.heads * shape.head_dim * b["act"] + shape.heads * 4  # output + fp32 log-sum-exp
            items.append(Item("attention outputs (kept)", T * shape.layers * kept, 0.0,
                              f"{T:,} tokens x {shape.layers} layers x ({shape.heads} x {shape.head_dim} x "
                              f"{b['act']} + {shape.heads} x 4) B (train.checkpoint_keep_attention)"))
        items.append(Item("one layer recomputed", T * per_layer, 0.0,
                          f"{T:,} tokens x {per_layer:,} B saved by autograd in a layer"))
    else:
        items.append(Item("activations (no checkpointing)", T * (shape.layers * (per_layer + h * b["resid"]) + rope),
                          0.0, f"{T:,} tokens x {shape.layers} layers x ({per_layer:,} + {h * b['resid']}) B"))
    mlp_grads = 0 if s.tiled_mlp else 2 * i * b["act"]
    items.append(Item("backward gradient buffers", T * (2 * h * b["resid"] + mlp_grads), 0.0,
                      f"{T:,} tokens x (2 x {h} x {b['resid']}" + (f" + 2 x {i} x {b['act']}" if mlp_grads else "")
                      + ") B (estimate)"))
    if s.tiled_mlp:
        tile = -(-T // max(1, -(-T // h)))  # ceil(T / ceil(T / hidden)) positions per tile
        items.append(Item("tiled MLP, one tile", tile * 5 * i * b["act"], 0.0,
                          f"{tile:,} positions x (3 saved + 2 gradient) x {i} x {b['act']} B (train.tiled_mlp)"))
    if s.sp > 1:
        kv = max(shape.kv_heads, s.sp)
        exchange = 2 * T * (2 * shape.heads + 2 * kv) * shape.head_dim * b["act"]
        items.append(Item("Ulysses all-to-all buffers", exchange, 0.0,
                          f"send + receive of one layer's q, k, v and output: 2 x {T:,} x ({2 * shape.heads} + "
                          f"{2 * kv}) x {shape.head_dim} x {b['act']} B (sequence parallel {s.sp})"))
    layers_alive = 1 if s.checkpointing else shape.layers
    if s.attention == "eager":
        per = 4 + (2 if b["act"] == 2 else 0)  # fp32 softmax output, plus its bf16 copy under autocast
        probs = layers_alive * s.micro_batch * shape.heads * L * L * per
        items.append(Item("eager attention probabilities (L^2)", probs, 0.0,
                          f"{layers_alive} layer(s) x {s.micro_batch} x {shape.heads} heads x {L}^2 x {per} B"))
    if s.doc_mask:
        per = 1 if s.attention == "sdpa" else b["act"]  # sdpa: boolean mask; eager: additive mask
        items.append(Item("document mask (L^2)", s.micro_batch * L * L * per, 0.0,
                          f"{s.micro_batch} x {L}^2 x {per} B (data.block_cross_doc with {s.attention})"))
    chunk = min(s.loss_chunk, T)
    head_in = T * h * (4 + 2 * b["norm"] + (4 if p.norm_trainable else 0))
    items.append(Item("loss (final norm + chunked LM head)", head_in + 3 * chunk * V * 4, 0.0,
                      f"{T:,} x {h} hidden copies + 3 x {chunk} x {V:,} x 4 B logits chunk"))
    return items


def full_logits_bytes(shape: Shape, s: Setup) -> float:
    """What a plain ``model(..., labels=...)`` loss would hold instead of the chunked head: the [T, V] logits in the
    compute dtype, their fp32 upcast and its fp32 gradient."""
    act = 2 if s.precision == "bf16" else 4
    return s.micro_batch * s.seq_len * shape.vocab * (act + 4 + 4)


def plan_memory(cfg: RunConfig, world: int = 1, gpu_mem_gib: float = 80.0) -> MemoryPlan:
    """The memory plan of ``cfg`` on ``world`` GPUs of ``gpu_mem_gib`` GiB each."""
    if world < 1:
        raise MemoryPlanError(f"world size must be >= 1, got {world}")
    config, source = planned_config(cfg)
    shape, p, s = shape_of(config), count_params(cfg, config), setup_of(cfg, world, config)
    check_sequence_parallel(cfg, config, s.attention, world)  # the plan of a run train.py would refuse is refused
    b = dtype_bytes(p, s)
    targets = lora_targets(config, list(cfg.lora.target_modules))
    what = (f"LoRA r={cfg.lora.r} on {targets if isinstance(targets, str) else ','.join(targets)}"
            + (f" + {','.join(cfg.lora.trainable_extra)}" if cfg.lora.trainable_extra else "")
            if s.lora else "full fine-tuning")
    header = [
        f"model {cfg.model.name}: hidden {shape.hidden}, {shape.layers} layers, {shape.heads} heads "
        f"({shape.kv_heads} KV) x {shape.head_dim}, MLP {shape.intermediate}, vocab {shape.vocab:,} (from {source})",
        f"{p.total - p.lora:,} base + {p.lora:,} LoRA parameters; {p.trainable:,} trainable ({what})",
        f"ZeRO-{s.zero_stage}{' + optimizer offload' if s.offload_optimizer else ''}"
        f"{' + parameter offload' if s.offload_param else ''} over {world} GPU(s); {s.precision} "
        f"(base weights {b['frozen']} B, activations {b['act']} B, residual stream {b['resid']} B); "
        f"micro-batch {s.micro_batch} x seq_len {s.seq_len:,}; attention {s.attention}; "
        f"gradient checkpointing {'on' if s.checkpointing else 'off'}"
        + (f"; sequence parallel {s.sp} ({s.seq_len // s.sp:,} positions per GPU, {world // s.sp} data-parallel)"
           if s.sp > 1 else "") + ("; tiled MLP" if s.tiled_mlp else ""),
    ]
    notes = [f"a plain full-logits loss would add {full_logits_bytes(shape, s) / GIB:.2f} GiB (train.py uses the "
             f"chunked head)"]
    if cfg.train.precision == "auto":
        notes.append("train.precision auto is planned as bf16 (GPUs with bf16 support)")
    if cfg.model.attn_implementation == "auto":
        notes.append(f"attention auto is planned as {s.attention}"
                     + ("; flash_attention_2 needs no more" if s.attention == "sdpa" else ""))
    return MemoryPlan(items=plan_items(shape, p, s), gpu_mem_gib=gpu_mem_gib, header=header, notes=notes)


def format_plan(plan: MemoryPlan) -> str:
    """The plan as text: header, one line per item, total and verdict."""
    width = max(len(i.name) for i in plan.items)
    unit, scale = ("GiB", GIB) if plan.total >= GIB else ("MiB", 2**20)  # tiny test models: MiB
    lines = ["memory plan per GPU", *(f"  {h}" for h in plan.header)]
    for it in plan.items:
        where = f"{it.gpu / scale:9.3f} {unit}" if not it.cpu else f"{it.cpu / scale:9.3f} {unit} CPU"
        if it.gpu and it.cpu:  # split between the two (offloaded checkpoints)
            where = f"{it.gpu / scale:9.3f} {unit} + {it.cpu / scale:.3f} {unit} CPU"
        lines.append(f"  {it.name:<{width}}  {where}  {it.how}")
    budget = (1 - RESERVE) * plan.gpu_mem_gib
    verdict = "fits" if plan.fits else "does NOT fit"
    lines.append(f"  {'total':<{width}}  {plan.total / scale:9.3f} {unit}  {verdict} in {plan.gpu_mem_gib:g} GiB "
                 f"(budget {budget:.1f} GiB: {RESERVE:.0%} kept for CUDA context, NCCL and DeepSpeed buffers, "
                 "fragmentation)")
    if plan.cpu_total:
        lines.append(f"  {'CPU memory per process':<{width}}  {plan.cpu_total / scale:9.3f} {unit}  (offloaded)")
    lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ dry runs


def _gpu_memory_gib() -> float:
    """This machine's GPU memory, or 80 GiB (an A100/H100) where there is none."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / GIB
    return 80.0


def dry_run_text(cfg: RunConfig, world: int, gpu_mem_gib: float) -> str:
    """The resolved config (as train.py would save it) followed by the memory plan."""
    resolved = yaml.safe_dump(public_config(cfg), sort_keys=False)
    return f"resolved config:\n{resolved}\n{format_plan(plan_memory(cfg, world, gpu_mem_gib))}"


def dry_run(cfg: RunConfig, notes: list[str] = ()) -> None:
    """``train.py --dry-run``: print the resolved config and the plan for the launch this process runs under
    (``launch_world``: ``WORLD_SIZE`` set by deepspeed/torchrun, else one sequence-parallel group; this machine's GPU
    memory, else 80 GiB), then ``notes`` (what the preflight could not check here). Only rank 0 prints. Starts
    nothing distributed."""
    world = launch_world(cfg, plan_only=True)
    text = dry_run_text(cfg, world, _gpu_memory_gib()) + "".join(f"\n  note: {n}" for n in notes)
    if rank() == 0:
        print(text, flush=True)
