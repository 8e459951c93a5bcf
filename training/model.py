"""The model a run trains: its config with the RoPE method, the trainable model (LoRA, trainable extras, gradient
checkpointing) and the module the DeepSpeed engine wraps (model + chunked loss)."""

from __future__ import annotations

import torch

from configs.schema import RunConfig
from data.loader import forward_kwargs
from models.build import build_model, scaled_config
from models.families import check_modules, extra_patterns, family_of, logit_transform, lora_targets
from models.load import load_tokenizer
from models.loss import causal_lm_loss
from ropescale.apply import original_context
from training.parallel import scale_gradient
from training.runtime import TrainError


def model_config(cfg: RunConfig, base=None):
    """The base config (``base``, else the model's own) with ``model.arch`` overrides and the RoPE method applied:
    the one config every artifact of the run (checkpoints, adapter base, merged model) is built from. Refuses a
    training length below the model's original context: context extension trains at or beyond it."""
    config = scaled_config(cfg.model.name, cfg.rope.method, cfg.rope.factor, dict(cfg.rope.params),
                           original_len=cfg.rope.original_len, rebase=cfg.rope.rebase, arch=dict(cfg.model.arch),
                           layer_types=cfg.rope.layer_types, trust_remote_code=cfg.model.trust_remote_code,
                           base=base)
    original = cfg.rope.original_len or original_context(config)
    target = cfg.data.pose_target_len or cfg.data.seq_len
    if cfg.rope.method != "none" and target < original:
        raise TrainError(f"data.seq_len {target} is below the model's original context {original}: context "
                         "extension trains at or beyond it; raise data.seq_len (or data.pose_target_len for PoSE)")
    return config


def tokenizer_of(cfg: RunConfig):
    """The run's tokenizer: ``model.tokenizer``, else the base model's."""
    return load_tokenizer(cfg.model.tokenizer or cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)


def lora_config(cfg: RunConfig, config):
    """The peft LoraConfig of a run on a model with ``config`` (the memory plan builds the same one): the
    ``attention`` / ``mlp`` keywords resolved to the family's linears (models.families.lora_targets)."""
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=lora_targets(config, list(cfg.lora.target_modules)), bias="none",
                      task_type="CAUSAL_LM")


def extra_param_names(model, config, requested: list[str]) -> list[str]:
    """Names of base parameters trained in full beside LoRA: those whose module name ends with one of
    ``lora.trainable_extra``'s patterns (``embeddings`` and ``norms`` resolved by the family: a tied LM head follows
    the embedding)."""
    names = []
    for pattern in extra_patterns(config, requested):
        found = [n for n, _ in model.named_parameters()
                 if "lora_" not in n and n.rsplit(".", 1)[0].endswith(pattern)]
        if not found:
            raise TrainError(f"lora.trainable_extra: no module of {config.model_type} whose name ends with "
                             f"'{pattern}' has parameters to train (embeddings, norms, or a module name of "
                             "models/families.py)")
        names += found
    return sorted(set(names))


def check_model_modules(cfg: RunConfig, config) -> None:
    """Refuse, before any process starts, LoRA targets, trainable extras, a tiled MLP and a dynamic YaRN rotary swap
    that name modules the model does not have (a family not in models/families.py, a typo), and a model outside the
    spec that transforms its logits; the model is built on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    if cfg.lora.enabled:
        targets = lora_targets(config, list(cfg.lora.target_modules))
        if targets != "all-linear":
            check_modules(model, config, targets, "lora.target_modules")
        check_modules(model, config, extra_patterns(config, list(cfg.lora.trainable_extra)), "lora.trainable_extra",
                      suffix=True)
        extra_param_names(model, config, list(cfg.lora.trainable_extra))  # modules with no parameter to train
    if cfg.train.tiled_mlp:
        check_modules(model, config, [family_of(config).mlp_module], "train.tiled_mlp")
    logit_transform(config)  # a model outside the spec that transforms its logits is refused here
    if cfg.rope.method == "dynamic_yarn":  # its runtime module takes the place of the family's rotary module
        check_modules(model, config, [family_of(config).rotary], "rope.method dynamic_yarn")


def attention_ops() -> list:
    """The fused attention kernels whose outputs ``train.checkpoint_keep_attention`` keeps: sdpa's CPU and CUDA
    kernels, and flash-attn's when it is installed and registered (its ops exist once flash_attn is imported)."""
    names = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
    ops = [getattr(torch.ops.aten, n).default for n in names if hasattr(torch.ops.aten, n)]
    flash = torch.ops.flash_attn
    return ops + [getattr(flash, n).default for n in ("_flash_attn_forward", "_flash_attn_varlen_forward")
                  if hasattr(flash, n)]


def keep_attention_outputs():
    """Selective activation checkpointing (the ``context_fn`` of torch.utils.checkpoint): the attention kernels'
    outputs are saved in the forward and every other op is recomputed in the backward. Recomputing a layer then
    costs its linears and elementwise ops only; attention, quadratic in seq_len, runs once forward and once backward
    instead of twice forward (full checkpointing) and once backward."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(attention_ops())


def trainable_model(cfg: RunConfig, config, precision: str, attn: str | None, dtype: torch.dtype | None = None):
    """The model to train: base (weights loaded, or scratch) built from ``config``, gradient checkpointing, then
    LoRA + trainable extras (or every weight when ``lora.enabled`` is off).

    With LoRA and bf16 the frozen base weights are stored in bf16 (half the memory); LoRA weights and trainable
    extras stay fp32 so that small updates (lr 2e-5) are not rounded away. Compute runs under bf16 autocast.
    """
    if dtype is None:
        dtype = torch.bfloat16 if (precision == "bf16" and cfg.lora.enabled) else torch.float32
    model = build_model(cfg.model.name, config, dtype=dtype, attn_implementation=attn,
                        trust_remote_code=cfg.model.trust_remote_code, seed=cfg.train.seed,
                        scratch=cfg.model.init == "scratch", allow_pickle=cfg.model.allow_pickle)
    model.config.use_cache = False
    if cfg.train.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad, so it works with frozen embeddings + LoRA
        # (YaRN's script turns checkpointing off under LoRA; its users then run out of memory).
        kwargs = {"use_reentrant": False}
        if cfg.train.checkpoint_keep_attention:
            kwargs["context_fn"] = keep_attention_outputs
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    if not cfg.lora.enabled:
        model.float().requires_grad_(True)
        return model
    from peft import get_peft_model

    model = get_peft_model(model, lora_config(cfg, config))
    for name in extra_param_names(model, config, cfg.lora.trainable_extra):
        param = model.get_parameter(name)
        param.data = param.data.float()
        param.requires_grad_(True)
    embed = model.get_input_embeddings()
    if dtype != torch.float32 and embed.weight.dtype == torch.float32:
        # A trainable fp32 embedding would make the whole residual stream fp32 (twice the checkpointed
        # activations); hand the layers the base dtype, as an untouched bf16 embedding would.
        embed.register_forward_hook(lambda module, args, out: out.to(dtype))
    return model


class LossModule(torch.nn.Module):
    """What the DeepSpeed engine wraps: the model plus the chunked loss, so that one ``engine(batch)`` call runs the
    decoder and the LM head chunk by chunk (the ``[seq_len, vocab]`` logits never exist)."""

    def __init__(self, model, chunk_size: int, autocast_dtype: torch.dtype | None, block_cross_doc: bool,
                 sp_group=None, grad_scale: float = 1.0):
        super().__init__()
        self.model, self.chunk_size, self.autocast_dtype = model, chunk_size, autocast_dtype
        self.block_cross_doc, self.sp_group, self.grad_scale = block_cross_doc, sp_group, grad_scale

    @classmethod
    def of(cls, cfg: RunConfig, model, precision: str, sp_group=None, grad_scale: float = 1.0) -> LossModule:
        """The loss module of a run: the config's loss chunk size and packing mode, bf16 autocast for bf16, and the
        sequence-parallel group when rows are split, with the gradient factor its ZeRO stage needs
        (training/parallel.py: ``gradient_scale``)."""
        return cls(model, cfg.train.loss_chunk_size, torch.bfloat16 if precision == "bf16" else None,
                   cfg.data.block_cross_doc, sp_group, grad_scale)

    def forward(self, input_ids, labels, position_ids):
        """input_ids, labels, position_ids: [B, seq_len] -> the mean loss over the scored tokens (a scalar).

        Under sequence parallelism (``sp_group``) the tensors are this rank's shard ``[B, seq_len / P]`` with labels
        already shifted (``training.parallel.shard_rows``), and the result is this rank's share of the mean over the
        group's rows: its NLL sum over the label count of the whole group (the shares add up to the mean)."""
        # The packing mode decides the attention mask: None + use_cache=False isolates documents (reset rows with
        # block_cross_doc), all ones keeps plain causal attention across the row (data/loader.py).
        kwargs = forward_kwargs({"input_ids": input_ids, "position_ids": position_ids}, self.block_cross_doc)
        with torch.autocast(input_ids.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            loss_sum, n = causal_lm_loss(self.model, input_ids, labels, position_ids=position_ids,
                                         attention_mask=kwargs["attention_mask"], chunk_size=self.chunk_size,
                                         shifted=self.sp_group is not None)
        if self.sp_group is not None:  # the count only: no gradient flows through it
            torch.distributed.all_reduce(n, group=self.sp_group)
        return scale_gradient(loss_sum / n.clamp(min=1), self.grad_scale)
