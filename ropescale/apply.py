"""Apply a RoPE scaling method to a Hugging Face config, before the model is built, in transformers' own terms.

``apply_rope`` returns a changed deep copy whose ``rope_parameters`` transformers 5 reads natively, so a model saved
from it reloads in plain transformers (and in servers that follow its config) with the same rotary tables, without
importing this project:

============  ==========================================================================  =========================
method        config.rope_parameters                                                      max_position_embeddings
============  ==========================================================================  =========================
none          default                                                                     L * factor
linear        linear, factor                                                              L * factor
ntk_aware     default, rope_theta = b (alpha s)^(d/(d-2))                                 L * factor
theta         default, rope_theta = params["rope_theta"]                                  L * factor
dynamic_ntk   dynamic, factor                                                             L (transformers' dynamic
                                                                                          reads it as the original)
ntk_by_parts  yarn, beta_fast = beta, beta_slow = alpha, attention_factor 1.0, truncate   L * factor
yarn          yarn, beta_fast, beta_slow, truncate [, attention_factor | mscale pair]     L * factor
dynamic_yarn  yarn at the target factor: a plain reload runs static YaRN at s = factor;   L * factor
              ``ropescale.runtime.enable_dynamic_yarn`` makes it dynamic
llama3        llama3, low_freq_factor, high_freq_factor                                   L * factor
longrope      longrope, short_factor, long_factor [, attention_factor]                    L * factor
============  ==========================================================================  =========================

yarn, llama3 and longrope also get ``original_max_position_embeddings`` = L, where transformers reads it. Defaults
are written out explicitly, so the saved config does not depend on transformers' defaults.

Per-layer-type RoPE (Gemma 3, OLMo 3: ``rope_parameters`` keyed by ``full_attention`` / ``sliding_attention``): the
method is written into the layer types asked for (default: ``full_attention``), each from its own base; the others
keep their tables. Architectures that accept only some rope types (Phi-3: default and longrope) get a static method
as LongRoPE per-pair factors (``longrope_form``), as do per-layer-type yarn tables with ``truncate: false``, which
transformers 5.24 reads from the top level of rope_parameters (a per-layer-type config has none).

Provenance: ``config.ropescale`` records what was applied (method, factor, params, original length and base). It is
saved in config.json, ignored by transformers, and lets ``rope_of``/``original_context`` name methods transformers
cannot tell apart (ntk_aware and theta look like a plain model with another base) and rebase them. It is checked
against ``rope_parameters`` on every read: a config edited after ropescale wrote it raises rather than lies.

Legacy keys: the top-level ``rope_theta`` is written as well (transformers 5 ignores it when rope_parameters has one;
loaders before transformers 5 read it). ``rope_scaling`` is not set on the config object (in transformers 5 it is an
alias of ``rope_parameters``): the exports (train.py's ``merged/``, ``python -m ropescale export``) add it to
config.json through ``ropescale.serving.serving_config``, and ``models.load.load_config`` refuses a config.json whose
``rope_scaling`` disagrees with its ``rope_parameters`` (transformers 5 would load the stale one). A yarn type with
an explicit ``attention_factor`` also gets ``attn_factor``, the key SGLang reads instead (``servers_attn_factor``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers import PretrainedConfig

from ropescale.methods import (
    ROPE_METHODS,
    RopeConfigError,
    method_from_hf,
    rotary_dim,
    validate_method,
)

RECORD = "ropescale"  # the config attribute holding the provenance record
PRIMARY = "full_attention"  # the layer type a per-layer-type config is scaled on by default (Gemma 3's own recipe)


def layer_tables(config: PretrainedConfig) -> dict[str, dict] | None:
    """``{layer_type: rope_parameters}`` of a config with one RoPE per layer type (Gemma 3, OLMo 3: keyed by
    ``full_attention`` / ``sliding_attention``); None for a config with one RoPE for every layer."""
    rp = getattr(config, "rope_parameters", None)
    if not isinstance(rp, dict):
        return None
    keys = [k for k in config.nested_rope_parameter_keys(rp) if rp[k] is not None]  # None: a type without RoPE
    return {k: rp[k] for k in keys} if keys else None


def _rope_parameters(config: PretrainedConfig) -> dict:
    """The RoPE a config is described by: its only one, or the global (``full_attention``) layers' one, which is what
    decides the context length (the sliding-window layers never see positions further apart than their window)."""
    rp = getattr(config, "rope_parameters", None)
    tables = layer_tables(config)
    if tables is not None:
        if PRIMARY not in tables:
            raise RopeConfigError(f"this config has per-layer-type RoPE parameters ({', '.join(tables)}) but none for "
                                  f"'{PRIMARY}' layers, the ones a context extension scales")
        rp = tables[PRIMARY]
    if not isinstance(rp, dict) or "rope_theta" not in rp:
        raise RopeConfigError(f"model type '{getattr(config, 'model_type', '?')}' has no RoPE parameters "
                              "(config.rope_parameters with rope_theta); RoPE scaling needs a RoPE model such as "
                              "Llama, Mistral or Qwen2")
    return rp


def head_dim_of(config: PretrainedConfig) -> int:
    """The attention head size, as transformers derives it."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _declared_partial_rotary_factor(config: PretrainedConfig) -> float | None:
    rp = _rope_parameters(config)
    value = rp.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    return None if value is None else float(value)


def partial_rotary_factor_of(config: PretrainedConfig) -> float:
    """The fraction of each head that is rotated (1.0 for Llama, Mistral, Qwen2, which do not declare one)."""
    value = _declared_partial_rotary_factor(config)
    return 1.0 if value is None else value


def longrope_form(method: str, factor: float, params: dict, original_len: int, rope_theta: float,
                  dim: int) -> dict:
    """``method``'s table written as LongRoPE's ``rope_parameters``: one divisor per rotary pair,
    ``theta_d / inv_freq_d``, in both ``short_factor`` and ``long_factor`` (so the table does not switch at L), and
    the method's attention scale as ``attention_factor``. Every static method is a per-pair rescaling of RoPE's
    frequencies (PI: all s; NTK-aware: a power of the pair index; by-parts and YaRN: 1 to s along the ramp), so this
    is exact up to float32 rounding. Refused for the length-dependent methods, whose table changes with the length."""
    spec = ROPE_METHODS[method]
    if spec.length_dependent:
        raise RopeConfigError(f"{method} recomputes its table from the current length; this architecture accepts only "
                              "LongRoPE-style fixed per-pair factors (one short and one long table): use a static "
                              "method (linear, ntk_aware, ntk_by_parts, yarn, llama3) or longrope itself")
    inv, scale = spec.fn(dim, rope_theta, 1.0, original_len, factor, params)
    divisors = (rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)).reciprocal() / inv.double()
    pairs = [float(x) for x in divisors]
    return {"rope_type": "longrope", "rope_theta": rope_theta, "factor": factor, "short_factor": pairs,
            "long_factor": list(pairs), "attention_factor": float(scale)}


def native_rope_parameters(method: str, factor: float, params: dict, original_len: int, rope_theta: float,
                           head_dim: int, partial_rotary_factor: float | None = None,
                           as_longrope: bool = False) -> tuple[dict, int]:
    """``(rope_parameters, max_position_embeddings)`` that make transformers compute ``method`` (see module table).

    ``partial_rotary_factor`` is written when given (``None``: the model declares none, i.e. 1.0). ``as_longrope``
    writes the method's table as LongRoPE's per-pair factors instead (``longrope_form``), for architectures that
    accept no other scaled type (Phi-3).

    Raises ``RopeConfigError`` for the paper's ratio ramp, which transformers cannot express.
    """
    spec = ROPE_METHODS[method]
    p = {**spec.defaults, **params}
    if p.get("ramp", "dim") != "dim":
        raise RopeConfigError(f"{method} with ramp='ratio' (the paper's ramp, linear in r) has no transformers "
                              "rope_type; use the default ramp='dim' to apply it to a model (inspect shows both)")
    p.pop("ramp", None)
    s, L = float(factor), int(original_len)
    dim = rotary_dim(head_dim, 1.0 if partial_rotary_factor is None else partial_rotary_factor)
    hf = longrope_form(method, s, p, L, float(rope_theta), dim) if as_longrope else spec.to_hf(p, s, L,
                                                                                                float(rope_theta), dim)
    # The order transformers itself writes: base, type, factor, original length, then the method's parameters.
    rp: dict[str, Any] = {"rope_theta": hf.pop("rope_theta"), "rope_type": hf.pop("rope_type")}
    if "factor" in hf:
        rp["factor"] = hf.pop("factor")
    if rp["rope_type"] in ("yarn", "llama3", "longrope"):
        rp["original_max_position_embeddings"] = L  # where transformers reads the original length for these types
    rp.update(hf)
    target = L if spec.keeps_max_position else round(L * s)
    if partial_rotary_factor is not None:
        rp["partial_rotary_factor"] = float(partial_rotary_factor)
    return rp, target


def _written(config: PretrainedConfig, rec: dict) -> tuple[dict, int]:
    """``(rope_parameters, max_position_embeddings)`` that the provenance record ``rec`` writes into ``config``:
    one table, or one per layer type (the scaled ones from their original base, the others as they were)."""
    method, factor, params, L = rec["method"], rec["factor"], dict(rec["params"]), rec["original_max_position_embeddings"]
    form, hd = rec.get("form") == "longrope", head_dim_of(config)
    originals = rec.get("original_rope_parameters")
    if originals is None:
        return native_rope_parameters(method, factor, params, L, rec["original_rope_theta"], hd,
                                      _declared_partial_rotary_factor(config), form)
    tables, target = {}, None
    for layer_type, original in originals.items():
        if layer_type in rec["layer_types"]:
            tables[layer_type], target = native_rope_parameters(
                method, factor, params, L, original["rope_theta"], hd, original.get("partial_rotary_factor"), form)
        else:
            tables[layer_type] = dict(original)
    if target is None:
        raise KeyError("layer_types")
    return tables, target


def _from_record(config: PretrainedConfig) -> dict:
    rec = getattr(config, RECORD)
    try:
        method, factor, params = rec["method"], rec["factor"], dict(rec["params"])
        L, base = rec["original_max_position_embeddings"], rec["original_rope_theta"]
        expected, target = _written(config, rec)
    except (KeyError, TypeError, RopeConfigError) as e:
        raise RopeConfigError(f"config.{RECORD} is not a record ropescale wrote ({e}); delete that entry to "
                              "describe the config from rope_parameters alone") from e
    rp = config.rope_parameters
    if expected != rp or target != config.max_position_embeddings:
        differ = sorted(k for k in {*expected, *rp} if expected.get(k) != rp.get(k))
        what = ([f"max_position_embeddings {config.max_position_embeddings} (writes {target})"]
                if target != config.max_position_embeddings else []) + [f"rope_parameters {k}" for k in differ]
        raise RopeConfigError(
            f"config.{RECORD} records {method} x{factor} but {', '.join(what)} differ from what that writes: the "
            f"config was edited after ropescale wrote it; delete config.{RECORD} to describe it from rope_parameters "
            "alone, or re-apply")
    return {"method": method, "factor": float(factor), "params": params, "original_max_position_embeddings": L,
            "rope_theta": base, "source": RECORD}


def rope_of(config: PretrainedConfig) -> dict:
    """What RoPE scaling ``config`` carries: ``{"method", "factor", "params", "original_max_position_embeddings",
    "rope_theta" (the unscaled base), "rope_type", "max_position_embeddings", "source"}``.

    ``source`` is ``"ropescale"`` when read from our provenance record, ``"rope_parameters"`` otherwise. For a
    ``linear`` config not written by ropescale the original length is unknown (transformers' linear type does not
    record it) and given as ``None``. Raises ``RopeConfigError`` for a non-RoPE config, a rope_type ropescale does
    not know, or a provenance record that disagrees with the config.
    """
    rp = _rope_parameters(config)
    common = {"rope_type": rp.get("rope_type", "default"), "max_position_embeddings": config.max_position_embeddings}
    if getattr(config, RECORD, None) is not None:
        return {**_from_record(config), **common}
    rope_type = common["rope_type"]
    method = method_from_hf(rope_type)
    if method is None:
        known = ", ".join(m.hf_type for m in ROPE_METHODS.values() if m.hf_type)
        raise RopeConfigError(f"rope_type '{rope_type}' is not one ropescale knows ({known})")
    params = {k: rp[k] for k in ROPE_METHODS[method].hf_params if rp.get(k) is not None}
    if rope_type == "default":
        L, factor = config.max_position_embeddings, 1.0
    elif rope_type == "linear":
        L, factor = None, float(rp["factor"])
    elif rope_type == "dynamic":
        L, factor = config.max_position_embeddings, float(rp["factor"])
    else:
        L = rp.get("original_max_position_embeddings", config.max_position_embeddings)
        factor = float(rp.get("factor") or config.max_position_embeddings / L)
    return {"method": method, "factor": factor, "params": params, "original_max_position_embeddings": L,
            "rope_theta": float(rp["rope_theta"]), "source": "rope_parameters", **common}


def original_context(config: PretrainedConfig) -> int:
    """The model's original (pre-scaling) context length L.

    From the provenance record, else ``rope_parameters["original_max_position_embeddings"]`` for a scaled config
    (``max_position_embeddings`` for transformers' dynamic type, which reads it as L), else
    ``max_position_embeddings``. Raises ``RopeConfigError`` for a linear-scaled config that does not say.
    """
    cur = rope_of(config)
    if cur["original_max_position_embeddings"] is None:
        raise RopeConfigError(
            f"this config has rope_type 'linear' factor {cur['factor']} and max_position_embeddings "
            f"{config.max_position_embeddings}, but transformers' linear type does not record the original length "
            f"(max_position_embeddings may be the original or the scaled one); pass original_len= explicitly")
    return int(cur["original_max_position_embeddings"])


def apply_rope(config: PretrainedConfig, method: str, factor: float, params: dict | None = None, *,
               original_len: int | None = None, rebase: bool = False, layer_types: list[str] | None = None,
               accepted_types: tuple[str, ...] | None = None) -> PretrainedConfig:
    """A deep copy of ``config`` with RoPE ``method`` at ``factor`` = target / original length written natively.

    ``original_len`` overrides the original length read from the config (``original_context``), for configs that
    understate or do not record it. A config that already carries a scaling raises ``RopeConfigError`` unless
    ``rebase=True``: then the old scaling is replaced, starting from the original length and base the config records
    (scalings are never compounded).

    A config with one RoPE per layer type (Gemma 3, OLMo 3) gets the method on ``layer_types`` (default: the
    ``full_attention`` layers, Gemma 3's own recipe; the sliding-window layers keep their table, each scaled layer type
    starts from its own base); ``layer_types`` on a config with one RoPE is refused. ``accepted_types``: the rope types
    the architecture accepts (models.families; None: any): a method whose type is not among them is written as
    LongRoPE factors (``longrope_form``) where ``longrope`` is, else refused.

    Build the model from the result: ``models.build.build_model(name, config)`` (``models.load.load_model`` too,
    except that dynamic_yarn then runs as static YaRN).
    """
    params = dict(params or {})
    cur = rope_of(config)
    if cur["method"] != "none" and not rebase:
        raise RopeConfigError(
            f"this config already carries rope_type '{cur['rope_type']}' factor {cur['factor']:g} (ropescale method "
            f"'{cur['method']}', original length {cur['original_max_position_embeddings']}); applying {method} on top "
            "would compound two scalings: pass rebase=True to replace it, starting from the original length")
    L = original_len if original_len is not None else original_context(config)
    hd, prf = head_dim_of(config), _declared_partial_rotary_factor(config)
    validate_method(method, factor, params, L, rotary_dim=rotary_dim(hd, 1.0 if prf is None else prf))
    tables, old = layer_tables(config), getattr(config, RECORD, None) or {}
    rec = {"method": method, "factor": float(factor), "params": {**ROPE_METHODS[method].defaults, **params},
           "original_max_position_embeddings": int(L), "original_rope_theta": cur["rope_theta"]}
    if tables is None:
        if layer_types:
            raise RopeConfigError(f"rope.layer_types {layer_types}: this model has one RoPE for all its layers; leave "
                                  "rope.layer_types empty")
    else:
        chosen = list(layer_types or [PRIMARY])
        unknown = [t for t in chosen if t not in tables]
        if unknown:
            raise RopeConfigError(f"rope.layer_types: this model has no '{unknown[0]}' layers; its layer types with "
                                  f"their own RoPE: {', '.join(tables)}")
        rec["layer_types"] = chosen
        # the tables before any ropescale scaling: a rebase restores the layers it no longer scales
        rec["original_rope_parameters"] = copy.deepcopy(old.get("original_rope_parameters", tables))
    rp, target = _written(config, rec)
    written = {t["rope_type"] for t in (rp.values() if tables is not None else [rp])}
    refused = sorted(written - set(accepted_types)) if accepted_types is not None else []
    if tables is not None and any(t.get("truncate") is False for t in rp.values()):
        # transformers 5.24's yarn reads `truncate` from the top level of rope_parameters, which a per-layer-type
        # config does not have: it would floor/ceil the ramp anyway. LongRoPE factors carry the exact table.
        refused = refused or ["yarn with truncate false"]
    if refused:
        if accepted_types is not None and "longrope" not in accepted_types:
            raise RopeConfigError(f"model type '{config.model_type}' accepts only rope types "
                                  f"{', '.join(accepted_types)}; {method} is written as '{refused[0]}'")
        rec["form"] = "longrope"
        rp, target = _written(config, rec)
    new = copy.deepcopy(config)
    new.rope_parameters = rp
    new.max_position_embeddings = target
    if tables is None:
        new.rope_theta = rp["rope_theta"]  # legacy key for loaders before transformers 5 (see module docstring)
    if hasattr(new, "original_max_position_embeddings"):
        # Phi-3 keeps the original length at the top level too, and transformers prefers it there for longrope
        new.original_max_position_embeddings = int(L)
    # Defaults written out, so the record keeps its meaning if a later version changes them.
    setattr(new, RECORD, rec)
    return new
