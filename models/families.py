"""The model-family spec: one record per transformers ``model_type``, the only place that names a family's modules.

Everything that needs to know what a decoder looks like reads a ``Family`` (the idea of torchtitan's ``TrainSpec``):
LoRA's default targets and the ``attention`` / ``mlp`` / ``all-linear`` keywords (training/model.py), the modules
``lora.trainable_extra``'s ``embeddings`` / ``norms`` keywords name, where the rotary module lives and how it lays out
its table (ropescale.runtime's dynamic YaRN), the MLP module that ``train.tiled_mlp`` tiles, the head counts
(sequence parallelism, the memory plan), the memory plan's linears and their roles, the rope types the architecture
accepts (Phi-3: ``default`` and ``longrope`` only; ropescale.apply then writes static methods as LongRoPE factors),
whether RoPE is set per layer type (Gemma 3, OLMo 3: ``rope_parameters`` keyed by ``full_attention`` /
``sliding_attention``), how the logits are transformed after the LM head (Gemma 2/3's soft-capping, Cohere's
``logit_scale``, Granite's ``logits_scaling``: models/loss.py applies it), the attention kernels it runs with, and
the tiny preset built from it.

A ``model_type`` not listed gets ``GENERIC`` (a Llama-style decoder): it works where its modules have those names;
``check_modules`` (and ``logit_transform``, for a model that transforms its logits) refuses the rest before any
process starts, naming what is missing.

Published shapes (``PUBLISHED``) are the config.json sizes of the hub models users ask about, used by the memory plan
only when the config itself cannot be read (no network, a gated repository).
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from utils.cli import UserError

LLAMA_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
LLAMA_MLP = ("gate_proj", "up_proj", "down_proj")
# Config attributes by which a model's forward transforms the LM head's output (logit_transform reads them):
# soft-capping cap * tanh(z / cap), a multiplier z * scale, a divisor z / scaling.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
FULL, SLIDING = "full_attention", "sliding_attention"
KERNELS = ("sdpa", "eager", "flash_attention_2")


class FamilyError(UserError):
    """A model whose family cannot do what the config asks; one line naming the reason and what to do."""


@dataclass(frozen=True)
class Family:
    """One decoder family, keyed by ``model_type``.

    ``attention`` / ``mlp``: the linear layers of a block, inputs before outputs (the last of each is the output
    projection); their names are the LoRA defaults and what the memory plan counts. ``embedding``: the input
    embedding module; ``norm``: the suffix every norm module's name ends with; ``rotary``: the rotary module's name;
    ``interleaved``: the rotary table repeats each frequency twice in a row (Cohere) instead of two halves (Llama);
    ``mlp_module``: the name of each block's MLP; ``gated_mlp``: the MLP keeps three [T, intermediate] activations
    (gate, up, act(gate)) rather than two; ``rope_types``: the rope types the architecture accepts (None: every type
    transformers has); ``per_layer_rope``: ``rope_parameters`` is keyed by layer type; ``logits``: the config
    attributes (``LOGIT_TRANSFORMS``) the model's forward applies to the LM head's output: Gemma 2/3's soft-capping,
    Cohere's ``logit_scale``, Granite's ``logits_scaling``; ``kernels``: the attention kernels it runs,
    preferred first (``auto`` picks the first this machine has); ``kernel_note``: why, when it is not sdpa;
    ``text_of``: a multimodal wrapper whose text decoder is extended instead (its ``key_mapping`` maps the
    checkpoint's weight names to the text model's); ``tiny``: config overrides of the ``tiny-<model_type>`` preset.
    """

    model_type: str
    attention: tuple[str, ...] = LLAMA_ATTENTION
    mlp: tuple[str, ...] = LLAMA_MLP
    embedding: str = "embed_tokens"
    norm: str = "norm"
    rotary: str = "rotary_emb"
    interleaved: bool = False
    mlp_module: str = "mlp"
    gated_mlp: bool = True
    rope_types: tuple[str, ...] | None = None
    per_layer_rope: bool = False
    logits: tuple[str, ...] = ()
    kernels: tuple[str, ...] = KERNELS
    kernel_note: str = ""
    text_of: str | None = None
    key_mapping: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    tiny: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def linears(self) -> dict[str, str]:
        """Every linear of a block -> its role: ``attn_in`` (reads the normed residual), ``attn_out`` (reads the
        attention output), ``mlp_in``, ``mlp_out`` (reads the MLP's intermediate activation)."""
        roles = {}
        for names, kind in ((self.attention, "attn"), (self.mlp, "mlp")):
            for i, name in enumerate(names):
                roles[name] = f"{kind}_out" if i == len(names) - 1 else f"{kind}_in"
        return roles


def _frozen(**kw) -> MappingProxyType:
    return MappingProxyType(kw)


# Two layers, one of each type, a sliding window shorter than the native 256 so that it matters.
_TWO_TYPES = _frozen(layer_types=[SLIDING, FULL], sliding_window=64)

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama"),
    Family("mistral"),
    Family("qwen2"),
    Family("qwen3"),
    # experts are fused parameter tensors, not linears: LoRA's default stays on attention
    Family("qwen3_moe", mlp=(), tiny=_frozen(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
    Family("olmo2"),
    Family("olmo3", per_layer_rope=True, tiny=_TWO_TYPES),
    # logits divided by logits_scaling (8-16 in the released models; 4 in the tiny preset so that it matters)
    Family("granite", logits=("logits_scaling",), tiny=_frozen(logits_scaling=4.0)),
    Family("smollm3"),
    Family("stablelm", tiny=_frozen(partial_rotary_factor=0.25)),
    Family("glm", mlp=("gate_up_proj", "down_proj"), tiny=_frozen(partial_rotary_factor=0.5)),
    Family("gemma"),
    Family("gemma2", logits=("final_logit_softcapping",), kernels=("eager", "flash_attention_2"),
           kernel_note="Gemma 2 soft-caps attention scores, which sdpa cannot: eager on CPU (an L x L score matrix "
                       "per head: memory grows with seq_len^2), flash attention on GPUs",
           # a cap of 1 (the real one: 30) so that the tiny model's small logits are visibly capped
           tiny=_frozen(layer_types=[SLIDING, FULL], sliding_window=64, query_pre_attn_scalar=32,
                        final_logit_softcapping=1.0)),
    Family("gemma3_text", per_layer_rope=True, logits=("final_logit_softcapping",),
           tiny=_frozen(**_TWO_TYPES, query_pre_attn_scalar=32)),
    Family("gemma3", text_of="gemma3_text",
           key_mapping=_frozen(**{r"^language_model\.model\.": "model.", r"^model\.language_model\.": "model."})),
    Family("phi3", attention=("qkv_proj", "o_proj"), mlp=("gate_up_proj", "down_proj"),
           rope_types=("default", "longrope"), tiny=_frozen(original_max_position_embeddings=256)),
    Family("gpt_neox", attention=("query_key_value", "dense"), mlp=("dense_h_to_4h", "dense_4h_to_h"),
           embedding="embed_in", gated_mlp=False, tiny=_frozen(partial_rotary_factor=0.25)),
    Family("cohere", interleaved=True, logits=("logit_scale",), tiny=_frozen(logit_scale=0.25)),
)}
GENERIC = Family("generic")


def family_of(config) -> Family:
    """The family record of a transformers config, keyed by its model_type; ``GENERIC`` when the spec does not list
    it. (A multimodal wrapper's config is turned into its text decoder's by models.load before anything reads it.)"""
    return FAMILIES.get(getattr(config, "model_type", None), GENERIC)


def head_counts(config) -> tuple[int, int]:
    """(attention heads, key/value heads) of a transformers config (key/value = attention heads without GQA)."""
    text = config.get_text_config()
    heads = text.num_attention_heads
    return heads, getattr(text, "num_key_value_heads", None) or heads


def sliding_window(config) -> int | None:
    """The attention window of a model whose layers (some or all) attend to the last ``window`` positions only:
    those with a ``sliding_attention`` layer type, or, without layer types, a ``sliding_window`` (Mistral v0.1)."""
    text = config.get_text_config()
    window = getattr(text, "sliding_window", None)
    types = getattr(text, "layer_types", None)
    if not window or (types and SLIDING not in types):
        return None
    return int(window)


# ------------------------------------------------------------------------------------------------ tiny presets

# Shared by every tiny preset: 2 layers, hidden 64, 2 query heads of head_dim 32 (16 rotary frequencies, enough for
# by-parts to have all three regions), GQA with 1 KV head, a short native context of 256 so that extension tests
# run at 2x-8x on a CPU in milliseconds. Vocab: 256 bytes + 4 specials of models.load's byte-level tokenizer.
TINY = MappingProxyType(dict(
    vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, head_dim=32, max_position_embeddings=256, bos_token_id=256, eos_token_id=257,
    pad_token_id=258, tie_word_embeddings=True,
))
TINY_PRESETS: tuple[str, ...] = tuple(f"tiny-{t}" for t, f in FAMILIES.items() if f.text_of is None)


def tiny_config(name: str):
    """The config of a tiny preset ``tiny-<model_type>``: the family's real transformers config class with the
    shared tiny sizes, the family's overrides, base 1e4 (1e6 on Gemma 3's full-attention layers, as the real one)."""
    from transformers import AutoConfig

    family = FAMILIES[name.removeprefix("tiny-")]
    kw = {**TINY, **family.tiny}
    prf = kw.pop("partial_rotary_factor", None)
    rope = {"rope_type": "default", "rope_theta": 10000.0, **({"partial_rotary_factor": prf} if prf else {})}
    if family.per_layer_rope:
        full = 1e6 if family.model_type.startswith("gemma") else 10000.0
        rope = {SLIDING: dict(rope), FULL: {**rope, "rope_theta": full}}
    return AutoConfig.for_model(family.model_type, **kw, rope_parameters=rope)


# ------------------------------------------------------------------------------------------- what a run may ask


def lora_targets(config, requested: list[str]) -> list[str] | str:
    """``lora.target_modules`` for peft: the ``attention`` / ``mlp`` keywords become the family's linears, a lone
    ``all-linear`` stays peft's keyword (every linear but the LM head), module names pass through."""
    family = family_of(config)
    if "all-linear" in requested:
        if len(requested) > 1:
            raise FamilyError("lora.target_modules: all-linear already names every linear; give it alone")
        return "all-linear"
    out: list[str] = []
    for name in requested:
        out += {"attention": list(family.attention), "mlp": list(family.mlp)}.get(name, [name])
    if not out:
        raise FamilyError(f"lora.target_modules: {getattr(config, 'model_type', '?')} has no {'/'.join(requested)} "
                          "linears; name the modules, or use all-linear")
    return list(dict.fromkeys(out))


def extra_patterns(config, requested: list[str]) -> list[str]:
    """``lora.trainable_extra`` as module-name suffixes: ``embeddings`` is the family's input embedding (a tied LM
    head follows it), ``norms`` every norm; other names pass through."""
    family = family_of(config)
    return [{"embeddings": family.embedding, "norms": family.norm}.get(n, n) for n in requested]


def check_kernel(config, kernel: str) -> None:
    """Refuse an attention kernel the family cannot run (Gemma 2: sdpa drops its attention soft-capping)."""
    family = family_of(config)
    if kernel not in family.kernels:
        raise FamilyError(f"model.attn_implementation={kernel}: {family.model_type} runs only "
                          f"{', '.join(family.kernels)} ({family.kernel_note}); set it to auto or one of those")


def auto_kernel(config, flash: bool) -> str:
    """The kernel ``auto`` means for this family: flash_attention_2 where available and accepted, else the family's
    first choice that is not flash (sdpa for most, eager for Gemma 2)."""
    family = family_of(config)
    if flash and "flash_attention_2" in family.kernels:
        return "flash_attention_2"
    return next(k for k in family.kernels if k != "flash_attention_2")


def check_modules(model: nn.Module, config, patterns: list[str], what: str, suffix: bool = False) -> None:
    """Refuse ``patterns`` that name no module of ``model`` (built on the meta device is enough): module names as
    peft matches them (the whole last part of a dotted name), or with ``suffix`` any ending (``norm`` matches
    ``input_layernorm``). One line naming the key, the family and the names it has."""
    names = {n for n, _ in model.named_modules() if n}
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    for pattern in patterns:
        if not any(n.endswith(pattern) if suffix else (n == pattern or n.endswith("." + pattern)) for n in names):
            close = difflib.get_close_matches(pattern, leaves, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            how = "name ends with" if suffix else "is named"
            raise FamilyError(f"{what}: no module of {type(model).__name__} ({getattr(config, 'model_type', '?')}) "
                              f"{how} '{pattern}'; {hint}its modules: "
                              f"{', '.join(n for n in leaves if not n.isdigit())}")


# ------------------------------------------------------------------------------------------------------ logits


class ScaledHead(nn.Module):
    """The LM head followed by the family's logit transform, ``[n, H] -> [n, V]``: a scale (Cohere's ``logit_scale``,
    Granite's ``1 / logits_scaling``), then soft-capping ``cap * tanh(z / cap)`` (Gemma 2/3): what each model's own
    forward does after its head."""

    def __init__(self, head: nn.Module, softcap: float | None = None, scale: float | None = None):
        super().__init__()
        self.head, self.softcap, self.scale = head, softcap, scale

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        z = self.head(hidden)
        if self.scale is not None:
            z = z * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z


def logit_transform(config) -> tuple[float | None, float | None]:
    """``(scale, softcap)`` the model's forward applies to the LM head's output (None: not applied). Refuses a model
    outside the spec that sets one of ``LOGIT_TRANSFORMS``' attributes: which ones its forward applies is not known
    (the preflight calls this, so such a run stops before any process starts)."""
    family = family_of(config)
    values = {a: getattr(config, a, None) for a in LOGIT_TRANSFORMS}
    if family is GENERIC:
        set_ = [a for a, v in values.items() if v not in (None, 1.0)]
        if set_:
            raise FamilyError(f"{config.model_type} transforms its logits ({', '.join(set_)}) and is not in "
                              "models/families.py, which says which transform its forward applies: add its record")
    scale = None
    if "logit_scale" in family.logits and values["logit_scale"] not in (None, 1.0):
        scale = float(values["logit_scale"])
    if "logits_scaling" in family.logits and values["logits_scaling"] not in (None, 1.0):
        scale = 1.0 / float(values["logits_scaling"])
    cap = values["final_logit_softcapping"] if "final_logit_softcapping" in family.logits else None
    return scale, (float(cap) if cap else None)


def output_head(model_config, head: nn.Module) -> nn.Module:
    """``head`` followed by the family's logit transform (``logit_transform``), or ``head`` itself without one."""
    scale, cap = logit_transform(model_config)
    return head if scale is None and cap is None else ScaledHead(head, softcap=cap, scale=scale)


# -------------------------------------------------------------------------------------- published model shapes

# What the Gemma 3 text decoders share: vocabulary, 128k context from linear x8 on the global layers (base 1e6),
# local layers of a 1,024-token window at base 1e4.
_GEMMA3 = dict(model_type="gemma3_text", vocab_size=262208, max_position_embeddings=131072, sliding_window=1024,
               tie_word_embeddings=True,
               rope_parameters={FULL: {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                                SLIDING: {"rope_type": "default", "rope_theta": 10000.0}})
# config.json sizes as published on the hub (text decoder of multimodal checkpoints), for plans made offline.
PUBLISHED: dict[str, dict] = {
    "meta-llama/Llama-2-7b-hf": dict(model_type="llama", hidden_size=4096, intermediate_size=11008,
                                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                     vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False),
    "meta-llama/Llama-2-13b-hf": dict(model_type="llama", hidden_size=5120, intermediate_size=13824,
                                      num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                                      vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False),
    "meta-llama/Llama-3.1-8B": dict(model_type="llama", hidden_size=4096, intermediate_size=14336,
                                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                    vocab_size=128256, max_position_embeddings=131072, tie_word_embeddings=False,
                                    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 8192}),
    "mistralai/Mistral-7B-v0.1": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336,
                                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                      vocab_size=32000, max_position_embeddings=32768, tie_word_embeddings=False),
    "Qwen/Qwen3-8B": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                          num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                          max_position_embeddings=40960, tie_word_embeddings=False,
                          rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "Qwen/Qwen3-32B": dict(model_type="qwen3", hidden_size=5120, intermediate_size=25600, num_hidden_layers=64,
                           num_attention_heads=64, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                           max_position_embeddings=40960, tie_word_embeddings=False,
                           rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "google/gemma-3-12b-pt": dict(**_GEMMA3, hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
                                  num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                                  query_pre_attn_scalar=256),
    "google/gemma-3-27b-pt": dict(**_GEMMA3, hidden_size=5376, intermediate_size=21504, num_hidden_layers=62,
                                  num_attention_heads=32, num_key_value_heads=16, head_dim=128,
                                  query_pre_attn_scalar=168),
    "microsoft/Phi-3-mini-4k-instruct": dict(model_type="phi3", hidden_size=3072, intermediate_size=8192,
                                             num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                             vocab_size=32064, max_position_embeddings=4096,
                                             original_max_position_embeddings=4096, sliding_window=2047,
                                             tie_word_embeddings=False),
}


def published_config(name: str):
    """The transformers config of a ``PUBLISHED`` model (None when the table does not have it)."""
    from transformers import AutoConfig

    shape = PUBLISHED.get(name)
    if shape is None:
        return None
    shape = copy.deepcopy(shape)  # transformers fills in rope_parameters in place; the table stays as published
    if "layer_types" not in shape and shape["model_type"] == "gemma3_text":
        # Gemma 3: five sliding-window layers, then one full-attention layer
        shape["layer_types"] = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(shape["num_hidden_layers"])]
    return AutoConfig.for_model(**shape)

