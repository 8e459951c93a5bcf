"""A model with its RoPE method: the one way the recipe, eval, launch and bench build a model from a name.

The RoPE change is written into the config before the model is built (``ropescale.apply.apply_rope``), so the
rotary tables are computed once from what is saved with every artifact. ``dynamic_yarn``, which transformers does
not have, additionally swaps in our rotary module after the build (``ropescale.runtime``).
"""

from __future__ import annotations

import copy

import torch
from transformers import PretrainedConfig, PreTrainedModel

from models.families import family_of
from models.load import ModelLoadError, load_config, load_model
from ropescale.apply import apply_rope, rope_of
from ropescale.runtime import dynamic_yarn_rotary, enable_dynamic_yarn


def apply_arch(config: PretrainedConfig, arch: dict) -> PretrainedConfig:
    """Set ``model.arch`` overrides (e.g. ``{"num_hidden_layers": 4}``) on ``config`` in place; returns it. A key
    the config class does not have is a ModelLoadError (a typo would otherwise add a field nothing reads)."""
    for key, value in arch.items():
        if not hasattr(config, key):
            raise ModelLoadError(f"model.arch.{key}: {type(config).__name__} has no such field")
        setattr(config, key, value)
    return config


def scaled_config(name: str, method: str, factor: float, params: dict | None = None, *,
                  original_len: int | None = None, rebase: bool = False, arch: dict | None = None,
                  layer_types: list[str] | None = None, trust_remote_code: bool = False,
                  base: PretrainedConfig | None = None) -> PretrainedConfig:
    """The config of ``name`` (or ``base``, a config given instead) with ``arch`` overrides, then RoPE ``method`` at
    ``factor`` written into it (on ``layer_types`` of a per-layer-type model; as LongRoPE factors where the family
    accepts no other type)."""
    config = copy.deepcopy(base) if base is not None else load_config(name, trust_remote_code=trust_remote_code)
    config = apply_arch(config, arch or {})
    return scale(config, method, factor, params, original_len=original_len, rebase=rebase, layer_types=layer_types)


def scale(config: PretrainedConfig, method: str, factor: float, params: dict | None = None, **kw) -> PretrainedConfig:
    """``ropescale.apply.apply_rope`` with the rope types the config's family accepts (models.families): the one
    way the project writes a method into a model config. A dynamic_yarn config is checked here against the runtime
    module it will need (one RoPE for every layer), so a run refuses it before any process starts."""
    new = apply_rope(config, method, factor, params, accepted_types=family_of(config).rope_types, **kw)
    if method == "dynamic_yarn":
        dynamic_yarn_rotary(new, family_of(new).interleaved)
    return new


def build_model(name: str, config: PretrainedConfig, *, dtype: torch.dtype = torch.float32,
                attn_implementation: str | None = None, trust_remote_code: bool = False, seed: int = 0,
                scratch: bool = False, allow_pickle: bool = False) -> PreTrainedModel:
    """The model ``name`` built with ``config`` (weights loaded, or random from ``seed`` with ``scratch``); a
    ``dynamic_yarn`` config gets its runtime rotary module. In eval mode, as ``models.load.load_model`` returns it."""
    model = load_model(name, config=config, dtype=dtype, attn_implementation=attn_implementation,
                       trust_remote_code=trust_remote_code, seed=seed, scratch=scratch, allow_pickle=allow_pickle)
    if rope_of(config)["method"] == "dynamic_yarn":
        # transformers has no dynamic YaRN; a plain reload of the saved config runs static YaRN at the target
        # factor (docs/ropescale.md).
        family = family_of(config)
        enable_dynamic_yarn(model, family.rotary, family.interleaved)
    return model
