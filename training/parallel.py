"""Sequence parallelism (DeepSpeed Ulysses, the attention of Arctic Long Sequence Training) and tiled MLPs: what
lets one row be longer than one device's memory holds.

Layout. With ``train.sequence_parallel_size`` = P > 1 and W processes, ranks ``[g*P, (g+1)*P)`` form sequence-parallel
group g (DeepSpeed's ``parallel_state_sp`` layout) and g is their data-parallel rank, of W / P. Every rank of a
group reads the same rows (the loader runs with the data-parallel rank and size) and keeps positions
``[r*T/P, (r+1)*T/P)`` of each row, with those positions' ``position_ids``: RoPE positions are global positions, so
PoSE's skips and reset rows survive the split, and YaRN's temperature, inside cos/sin, needs nothing more.

Attention. DeepSpeed's ``UlyssesSPAttentionHF`` takes the place of the kernel in transformers' attention registry:
an all-to-all turns ``[T/P positions, all heads]`` into ``[T positions, heads/P]`` before the kernel (key/value heads
are replicated when there are fewer than P) and back after it. It drops attention masks (a ``[T, T]`` mask is what
long rows cannot afford) and sdpa then runs plain causal attention over the whole row; only flash attention, which
reads document starts from the gathered ``position_ids``, keeps packed documents apart (``data.block_cross_doc``).

Loss. Labels are shifted on the whole row before the split (a shard's last position predicts the next shard's
first token); each rank returns its NLL sum over the row's label count in the group (``LossModule``). DeepSpeed sums
the gradients of the P ranks of a group and averages over the data-parallel ranks only, so the step's gradient is
that of the exact mean over every label of the row, as without sequence parallelism.
"""

from __future__ import annotations

import contextlib
import math
import types

import torch
import torch.nn.functional as F

from configs.schema import RunConfig
from data.pack import IGNORE_INDEX
from models.families import family_of, head_counts, sliding_window
from training.runtime import TrainError


def data_parallel_size(cfg: RunConfig, world: int) -> int:
    """Data-parallel groups in a world of ``world`` processes (rank r is in group r // sequence_parallel_size)."""
    return max(1, world // cfg.train.sequence_parallel_size)


def sequence_parallel_sizes(config) -> list[int]:
    """Every ``train.sequence_parallel_size`` a model's heads split over, ascending (1 included): divisors of the
    attention heads whose key/value heads divide them or divide by them (DeepSpeed splits or replicates those)."""
    heads, kv = head_counts(config)
    return [p for p in range(1, heads + 1) if heads % p == 0 and (kv % p == 0 or p % kv == 0)]


def check_sequence_parallel(cfg: RunConfig, config, attn: str, world: int) -> None:
    """Refuse, before any process group starts, a sequence-parallel run that cannot work: heads that do not split
    over the group, a world that is not a whole number of groups, rows that do not split evenly, eager attention,
    sliding-window layers without flash attention, and
    document isolation with a kernel that cannot keep documents apart once the masks are dropped."""
    size = cfg.train.sequence_parallel_size
    if size == 1:
        return
    sizes = sequence_parallel_sizes(config)
    if size not in sizes:
        heads, kv = head_counts(config)
        why = (f"does not divide the model's {heads} attention heads (each rank of a group computes heads / size of "
               "them)" if heads % size else f"and the model's {kv} key/value heads: one must divide the other "
               "(DeepSpeed splits or replicates them)")
        raise TrainError(f"train.sequence_parallel_size {size} {why}; use one of {', '.join(map(str, sizes))}")
    if world % size:
        raise TrainError(f"{world} process(es) is not a multiple of train.sequence_parallel_size {size}; launch a "
                         f"multiple of {size} processes (data parallelism runs over the rest)")
    if cfg.data.seq_len % size:
        raise TrainError(f"data.seq_len {cfg.data.seq_len} does not split over train.sequence_parallel_size {size}; "
                         f"use a multiple of {size}")
    if attn == "eager":
        raise TrainError("model.attn_implementation=eager cannot run under sequence parallelism (it needs the full "
                         "[seq_len, seq_len] mask, which Ulysses drops); use sdpa or flash_attention_2")
    window = sliding_window(config)
    if window and attn != "flash_attention_2" and window < cfg.data.seq_len:
        raise TrainError(f"{config.model_type} has sliding-window attention ({window:,} positions) and sequence "
                         f"parallelism drops the attention masks that {attn} keeps the window with: its sliding "
                         "layers would attend over the whole row; use model.attn_implementation: flash_attention_2 "
                         "(the window is a kernel argument there)")
    if cfg.data.block_cross_doc and attn != "flash_attention_2":
        raise TrainError(f"data.block_cross_doc with {attn} under sequence parallelism: the masks that keep documents "
                         "apart are dropped, so documents would attend to each other; use flash_attention_2 (GPU) "
                         "or data.block_cross_doc: false")


def enable_sequence_parallel(model, cfg: RunConfig, attn: str):
    """Put DeepSpeed's Ulysses attention in place of ``attn`` in transformers' registry (this process only) and
    create the sequence-parallel groups; returns the ``mpu`` for ``deepspeed.initialize`` (None when the size is 1).
    The process group must be up. Models in eval mode (the evaluation after training) bypass it."""
    size = cfg.train.sequence_parallel_size
    if size == 1:
        return None
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    return UlyssesSPAttentionHF.register_with_transformers(
        model, core_attn_implementation=attn, sequence_parallel_size=size,
        micro_batch_size=cfg.train.micro_batch_size, seq_length_is_variable=True, disable_in_eval=True)


def gradient_scale(ds: dict, size: int) -> float:
    """The factor that makes DeepSpeed's gradient of a sequence-parallel group the sum of its ranks' gradients.

    DeepSpeed 0.19 averages gradients over the data-parallel ranks only (dividing by world / size) in ZeRO 0-2 and
    in ZeRO-3 without ``reduce_scatter``, but over all ranks in ZeRO-3's reduce-scatter path (its default), which
    makes every gradient ``size`` times too small there (measured: grad norms halved at size 2, and the losses then
    drift from step 3 on through clipping). 1 where no correction is needed."""
    zero = ds.get("zero_optimization", {})
    if size > 1 and int(zero.get("stage", 0)) == 3 and zero.get("reduce_scatter", True):
        return float(size)
    return 1.0


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the backward multiplies the incoming gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def scale_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` unchanged, its gradient multiplied by ``scale`` (the logged loss stays the loss)."""
    return x if scale == 1.0 else _ScaleGradient.apply(x, scale)


def shard_rows(batch: dict[str, torch.Tensor], sp_rank: int, size: int) -> dict[str, torch.Tensor]:
    """This rank's positions of whole rows: ``input_ids``, ``position_ids`` and ``labels`` ``[B, T]`` ->
    ``[B, T / size]``, labels already shifted (``labels[:, t]`` is the target of position t, -100 at the row's
    end), as ``LossModule`` expects under sequence parallelism."""
    shifted = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    width = batch["input_ids"].shape[1] // size
    part = slice(sp_rank * width, (sp_rank + 1) * width)
    return {"input_ids": batch["input_ids"][:, part], "labels": shifted[:, part],
            "position_ids": batch["position_ids"][:, part]}


def check_offload_checkpoints(cfg: RunConfig, dev: torch.device) -> None:
    """Refuse ``train.offload_checkpoints`` where it cannot do what it says: on a CPU (the checkpoints are in CPU
    memory already; DeepSpeed's offload would silently skip them) and without gradient checkpointing."""
    if not cfg.train.offload_checkpoints:
        return
    if dev.type != "cuda":
        raise TrainError("train.offload_checkpoints moves the layers' checkpoints from GPU to CPU memory; this run is "
                         "on the CPU, where they are in CPU memory already: set it to false")
    if not cfg.train.gradient_checkpointing:
        raise TrainError("train.offload_checkpoints offloads what gradient checkpointing keeps; set "
                         "train.gradient_checkpointing: true or turn the offload off")


def offloaded_checkpoints(enabled: bool):
    """The context one micro-batch's forward and backward run in: with ``enabled``, DeepSpeed's
    CheckpointHiddenStatesOffload, which moves the inputs that gradient checkpointing keeps for each decoder layer
    to pinned CPU memory in the forward and back in the backward (GPU tensors only); else nothing."""
    if not enabled:
        return contextlib.nullcontext()
    from deepspeed.runtime.activation_checkpointing.offload_activations import CheckpointHiddenStatesOffload

    return CheckpointHiddenStatesOffload()


def tile_mlps(model) -> int:
    """Run every decoder layer's MLP through DeepSpeed's TiledMLP: ``ceil(positions / hidden_size)`` tiles along the
    sequence (DeepSpeed's choice), each forward without keeping its ``[tile, intermediate]`` activations, each
    recomputed in the backward. Patches the instances, not the class. Returns the number of MLPs tiled.

    The autocast state of the forward is reapplied to the backward's recompute (TiledMLP does not carry it, and
    under bf16 autocast the recompute would otherwise meet bf16 weights with fp32 inputs)."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    def tiled(mlp, x):
        kind = x.device.type
        dtype, enabled = torch.get_autocast_dtype(kind), torch.is_autocast_enabled(kind)

        def plain(module, tile):
            with torch.autocast(kind, dtype=dtype, enabled=enabled):
                return type(module).forward(module, tile)

        tiles = max(1, math.ceil(x.shape[-2] / x.shape[-1]))
        trainable = [p for p in mlp.parameters() if p.requires_grad]
        return TiledMLP.apply(plain, mlp, x, tiles, trainable)

    name = family_of(model.config).mlp_module
    mlps = [m for n, m in model.named_modules() if n.endswith("." + name)]
    if not mlps:
        raise TrainError(f"train.tiled_mlp: {type(model).__name__} has no module named '*.{name}' to tile; turn it off")
    for mlp in mlps:
        mlp.forward = types.MethodType(tiled, mlp)
    return len(mlps)
