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
              ``ropescale.runtime.enable_dynamic_yarn(model)`` makes it dynamic
llama3        llama3, low_freq_factor, high_freq_factor                                   L * factor
longrope      longrope, short_factor, long_factor [, attention_factor]                    L * factor
============  ==========================================================================  =========================

yarn, llama3 and longrope also get ``original_max_position_embeddings`` = L, where transformers reads it. Defaults
are written out explicitly, so the saved config does not depend on transformers' defaults.

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

from transformers import PretrainedConfig

from ropescale.methods import (
    ROPE_METHODS,
    RopeConfigError,
    method_from_hf,
    rotary_dim,
    validate_method,
)

RECORD = "ropescale"  # the config attribute holding the provenance record


def _rope_parameters(config: PretrainedConfig) -> dict:
    rp = getattr(config, "rope_parameters", None)
    if not isinstance(rp, dict) or "rope_theta" not in rp:
        raise RopeConfigError(f"model type '{getattr(config, 'model_type', '?')}' has no RoPE parameters "
                              "(config.rope_parameters with rope_theta); RoPE scaling needs a RoPE model such as "
                              "Llama, Mistral or Qwen2")
    if config.nested_rope_parameter_keys(rp):
        raise RopeConfigError("this config has per-layer-type RoPE parameters "
                              f"({', '.join(config.nested_rope_parameter_keys(rp))}); ropescale handles one global "
                              "RoPE (Llama, Mistral, Qwen2 and similar)")
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


def native_rope_parameters(method: str, factor: float, params: dict, original_len: int, rope_theta: float,
                           head_dim: int, partial_rotary_factor: float | None = None) -> tuple[dict, int]:
    """``(rope_parameters, max_position_embeddings)`` that make transformers compute ``method`` (see module table).

    ``partial_rotary_factor`` is written when given (``None``: the model declares none, i.e. 1.0).

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
    hf = spec.to_hf(p, s, L, float(rope_theta), dim)
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


def _from_record(config: PretrainedConfig, rp: dict) -> dict:
    rec = getattr(config, RECORD)
    try:
        method, factor, params = rec["method"], rec["factor"], dict(rec["params"])
        L, base = rec["original_max_position_embeddings"], rec["original_rope_theta"]
        expected, target = native_rope_parameters(method, factor, params, L, base, head_dim_of(config),
                                                  _declared_partial_rotary_factor(config))
    except (KeyError, TypeError, RopeConfigError) as e:
        raise RopeConfigError(f"config.{RECORD} is not a record ropescale wrote ({e}); delete that entry to "
                              "describe the config from rope_parameters alone") from e
    if expected != rp or target != config.max_position_embeddings:
        raise RopeConfigError(
            f"config.{RECORD} records {method} x{factor} but rope_parameters/max_position_embeddings "
            f"({rp}, {config.max_position_embeddings}) differ from what that writes: the config was edited after "
            f"ropescale wrote it; delete config.{RECORD} to describe it from rope_parameters alone, or re-apply")
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
        return {**_from_record(config, rp), **common}
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
               original_len: int | None = None, rebase: bool = False) -> PretrainedConfig:
    """A deep copy of ``config`` with RoPE ``method`` at ``factor`` = target / original length written natively.

    ``original_len`` overrides the original length read from the config (``original_context``), for configs that
    understate or do not record it. A config that already carries a scaling raises ``RopeConfigError`` unless
    ``rebase=True``: then the old scaling is replaced, starting from the original length and base the config records
    (scalings are never compounded). Build the model from the result: ``models.build.build_model(name, config)``
(``models.load.load_model`` too, except that dynamic_yarn then runs as static YaRN).
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
    rp, target = native_rope_parameters(method, factor, params, L, cur["rope_theta"], hd, prf)
    new = copy.deepcopy(config)
    new.rope_parameters = rp
    new.max_position_embeddings = target
    new.rope_theta = rp["rope_theta"]  # legacy key for loaders before transformers 5 (see module docstring)
    # Defaults written out, so the record keeps its meaning if a later version changes them.
    params = {**ROPE_METHODS[method].defaults, **params}
    setattr(new, RECORD, {"method": method, "factor": float(factor), "params": params,
                          "original_max_position_embeddings": int(L), "original_rope_theta": cur["rope_theta"]})
    return new
