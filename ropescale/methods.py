"""Every RoPE scaling method as one pure function, in one registry (``ROPE_METHODS``).

Notation (YaRN paper, Peng et al. 2023, arXiv 2309.00071, section 3):

- ``|D|`` = rotary dim = ``int(head_dim * partial_rotary_factor)``; pairs ``d = 0 .. |D|/2 - 1``;
- ``theta_d = base^(-2d/|D|)`` (the inverse frequency), wavelength ``lambda_d = 2 pi / theta_d``;
- ``L`` = original (pre-training) context, ``s`` = factor = target length / L;
- ``r(d) = L / lambda_d``: how many full turns dimension d makes within L.

Each method function has the signature
``fn(head_dim, base, partial_rotary_factor, original_len, factor, params, seq_len=None) -> (inv_freq, attention_scale)``
with ``inv_freq`` a float32 tensor ``[|D|/2]`` and ``attention_scale`` a float. ``seq_len`` (the current sequence
length) only matters to the dynamic methods and to ``longrope``; ``None`` means "at build time", as in transformers.

The attention scale multiplies cos and sin, so it scales q.k logits by its square (YaRN section 3.4 scales both q
and k by sqrt(1/t)). It is applied in exactly one place: the rotary module (transformers' for the native types,
``ropescale.runtime`` for ``dynamic_yarn``). Nothing here or elsewhere in ropescale multiplies by it.

Frequencies are computed in float64 and rounded once to float32; the results equal transformers' own init
functions to about 1e-7 relative (tests/test_rope_methods.py checks 1e-6 on a grid).
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from utils.cli import UserError

Params = Mapping[str, Any]


class RopeConfigError(UserError):
    """A RoPE method, factor, parameter or config that cannot be used; the one-line message says what and how to fix."""


# Defaults live here once; the functions, ``apply_rope`` (which writes them explicitly into the saved config) and
# ``inspect`` all read them from these tables.
NTK_AWARE_DEFAULTS = MappingProxyType({"alpha": 1.0})
# Section 3.2: alpha=1, beta=32 "for Llama". ramp "dim"/truncate False: see _by_parts.
BY_PARTS_DEFAULTS = MappingProxyType({"alpha": 1.0, "beta": 32.0, "truncate": False, "ramp": "dim"})
# transformers' yarn defaults (also the YaRN reference code's): floor/ceil the correction range.
YARN_DEFAULTS = MappingProxyType({"beta_fast": 32.0, "beta_slow": 1.0, "truncate": True, "ramp": "dim"})
# Llama 3.1's published values.
LLAMA3_DEFAULTS = MappingProxyType({"low_freq_factor": 1.0, "high_freq_factor": 4.0})
RAMPS = ("dim", "ratio")


def rotary_dim(head_dim: int, partial_rotary_factor: float = 1.0) -> int:
    """``|D|``: how many of the head's channels are rotated (transformers' rounding)."""
    return int(head_dim * partial_rotary_factor)


def _theta(dim: int, base: float) -> torch.Tensor:
    """``theta_d = base^(-2d/|D|)``, float64 ``[dim/2]``."""
    return base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def _out(inv_freq: torch.Tensor, attention_scale: float) -> tuple[torch.Tensor, float]:
    return inv_freq.to(torch.float32), float(attention_scale)


def ramp(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """The one ramp all blending methods share: 0 below ``low``, 1 above ``high``, linear between; shape of ``x``.

    Used on r (the paper's by-parts ramp gamma(r), section 3.2, and Llama 3's smoothing, which is the same ramp with
    alpha=low_freq_factor, beta=high_freq_factor) and on the pair index d (transformers' and the YaRN reference
    code's ramp between correction dimensions).
    """
    return ((x - low) / (high - low)).clamp(0.0, 1.0)


def _blend(theta: torch.Tensor, factor: float, gamma: torch.Tensor) -> torch.Tensor:
    # Section 3.2: h(theta_d) = (1 - gamma) theta_d / s + gamma theta_d; gamma=1 keeps the dimension (extrapolation),
    # gamma=0 divides it by s (interpolation, as PI).
    return (1 - gamma) * theta / factor + gamma * theta


def correction_dim(turns: float, dim: int, base: float, original_len: int) -> float:
    """The (fractional) pair index d at which r(d) = ``turns``: solves ``L / (2 pi base^(2d/|D|)) = turns``."""
    return dim * math.log(original_len / (2 * math.pi * turns)) / (2 * math.log(base))


def _by_parts(theta: torch.Tensor, dim: int, base: float, original_len: int, factor: float, fast: float,
              slow: float, kind: str, truncate: bool) -> torch.Tensor:
    """NTK-by-parts (section 3.2): keep dimensions with r > ``fast`` (beta), divide by s those with r < ``slow``
    (alpha), blend between.

    ``kind="ratio"`` is the paper's ramp, linear in r. ``kind="dim"`` is the ramp transformers and the YaRN reference
    code use: linear in the pair index d between the correction dimensions d(beta) and d(alpha) (the same end
    points, a different blend, since r falls exponentially with d), with ``truncate`` flooring/ceiling the two end
    points (one more dimension blended at each side). Only ``"dim"`` can be written into a transformers config.
    """
    if kind == "ratio":
        gamma = ramp(original_len * theta / (2 * math.pi), slow, fast)
    else:
        low = correction_dim(fast, dim, base, original_len)
        high = correction_dim(slow, dim, base, original_len)
        if truncate:
            low, high = math.floor(low), math.ceil(high)
        # Clamped to [0, dim - 1] as transformers does, so that the tables are the same.
        low, high = max(low, 0), min(high, dim - 1)
        high = max(high, low + 1e-3)  # a zero-width ramp (only for absurdly short L) would divide by zero
        # In float32, as transformers evaluates it: near the ramp's low end an error in gamma is multiplied by s in
        # the result (2e-6 relative at s=32 in float64 vs transformers), and a saved model runs transformers' values.
        gamma = 1 - ramp(torch.arange(dim // 2, dtype=torch.float32), low, high).double()
    return _blend(theta, factor, gamma)


def mscale(factor: float, scale: float = 1.0) -> float:
    """YaRN's attention temperature, section 3.4: sqrt(1/t) = 0.1 ln s + 1 (``scale`` multiplies the 0.1 term, the
    DeepSeek mscale form); 1 when s <= 1."""
    return 1.0 if factor <= 1 else 0.1 * scale * math.log(factor) + 1.0


def yarn_attention_scale(factor: float, params: Params) -> float:
    """The attention scale of YaRN: an explicit ``attention_factor``, else mscale(s, mscale)/mscale(s, mscale_all_dim)
    when both are given, else 0.1 ln s + 1."""
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])
    if params.get("mscale") and params.get("mscale_all_dim"):
        return mscale(factor, params["mscale"]) / mscale(factor, params["mscale_all_dim"])
    return mscale(factor)


def ntk_aware_base(dim: int, base: float, factor: float, alpha: float = 1.0) -> float:
    """Section 3.1, NTK-aware: b' = b * (alpha s)^(|D|/(|D|-2)), so the lowest frequency is divided by alpha*s
    exactly (as PI does for alpha=1) while the highest is kept. alpha > 1 is the paper's remark that in practice a
    scale above the nominal one is needed."""
    return base * (alpha * factor) ** (dim / (dim - 2))


# --- the methods ------------------------------------------------------------------------------------------------


def none(head_dim, base, partial_rotary_factor, original_len, factor, params, seq_len=None):
    """Plain RoPE; at a target beyond L this is extrapolation."""
    validate_method("none", factor, params, original_len, rotary_dim=rotary_dim(head_dim, partial_rotary_factor))
    return _out(_theta(rotary_dim(head_dim, partial_rotary_factor), base), 1.0)


def linear(head_dim, base, partial_rotary_factor, original_len, factor, params, seq_len=None):
    """Position Interpolation (Chen et al. 2023; YaRN section 3.1): g(m) = m/s, i.e. every theta_d divided by s."""
    dim = rotary_dim(head_dim, partial_rotary_factor)
    validate_method("linear", factor, params, original_len, rotary_dim=dim)
    return _out(_theta(dim, base) / factor, 1.0)


def ntk_aware(head_dim, base, partial_rotary_factor, original_len, factor, params, seq_len=None):
    """NTK-aware (section 3.1): a larger base, b' = b (alpha s)^(|D|/(|D|-2))."""
    dim = rotary_dim(head_dim, partial_rotary_factor)
    validate_method("ntk_aware", factor, params, original_len, rotary_dim=dim)
    p = {**NTK_AWARE_DEFAULTS, **params}
    return _out(_theta(dim, ntk_aware_base(dim, base, factor, p["alpha"])), 1.0)


def dynamic_ntk(head_dim, base, partial_rotary_factor, original_len, factor, params, seq_len=None):
    """Dynamic NTK (section 3.3), as transformers' ``dynamic``: NTK-aware with b' = b (s n/L - (s - 1))^(|D|/(|D|-2))
    for the current length n > L; plain RoPE up to L. At s=1 this is the paper's s = n/L; a larger s makes the base
    grow faster."""
    dim = rotary_dim(head_dim, partial_rotary_factor)
    validate_method("dynamic_ntk", factor, params, original_len, rotary_dim=dim)
    n = max(seq_len or original_len, original_len)
    return _out(_theta(dim, base * (factor * n / original_len - (factor - 1)) ** (dim / (dim - 2))), 1.0)


def ntk_by_parts(head_dim, base, partial_rotary_factor, original_len, factor, params, seq_len=None):
    """NTK-by-parts (section 3.2): wavelengths below L/beta kept, above L/alpha divided by s, ramp between; no
    attention scaling."""
    dim = rotary_dim(head_dim, partial_rotary_factor)
    validate_method("ntk_by_parts", factor, params, original_len, rotary_dim=dim)
    p = {**BY_PARTS_DEFAULTS, **params}
    inv = _by_parts(_theta(dim, base), dim, base, original_len, factor, p["beta"], p["alpha"], p["ramp"], p["truncate"])
    return _out(inv, 1.0)


def yarn(head_dim, base, partial_rotary_factor, original_len, factor, params, seq_len=None):
    """YaRN (section 3.4): NTK-by-parts (beta_fast = beta, beta_slow = alpha) plus the attention scale
    0.1 ln s + 1 (or an explicit attention_factor, or the mscale/mscale_all_dim form)."""
    dim = rotary_dim(head_dim, partial_rotary_factor)
    validate_method("yarn", factor, params, original_len, rotary_dim=dim)
    p = {**YARN_DEFAULTS, **params}
    inv = _by_parts(_theta(dim, base), dim, base, original_len, factor, p["beta_fast"], p["beta_slow"], p["ramp"],
                    p["truncate"])
    return _out(inv, yarn_attention_scale(factor, p))


def dynamic_yarn(head_dim, base, partial_rotary_factor, original_len, factor, params, seq_len=None):
    """Dynamic YaRN (section 3.3 applied to 3.4): YaRN with s = max(1, n/L) for the current length n. ``factor``
    only names the target length (what ``apply_rope`` writes as max_position_embeddings); it does not cap s."""
    dim = rotary_dim(head_dim, partial_rotary_factor)
    validate_method("dynamic_yarn", factor, params, original_len, rotary_dim=dim)
    s = max(1.0, seq_len / original_len) if seq_len else 1.0
    return yarn(head_dim, base, partial_rotary_factor, original_len, s, params)


def llama3(head_dim, base, partial_rotary_factor, original_len, factor, params, seq_len=None):
    """Llama 3.1's scaling: the paper's by-parts ramp on r with alpha = low_freq_factor, beta = high_freq_factor."""
    dim = rotary_dim(head_dim, partial_rotary_factor)
    validate_method("llama3", factor, params, original_len, rotary_dim=dim)
    p = {**LLAMA3_DEFAULTS, **params}
    theta = _theta(dim, base)
    gamma = ramp(original_len * theta / (2 * math.pi), p["low_freq_factor"], p["high_freq_factor"])
    return _out(_blend(theta, factor, gamma), 1.0)


def longrope(head_dim, base, partial_rotary_factor, original_len, factor, params, seq_len=None):
    """LongRoPE (Ding et al. 2024): theta_d divided by a searched per-dimension factor, ``short_factor`` up to L and
    ``long_factor`` beyond (transformers switches on the current length); attention scale
    sqrt(1 + ln s / ln L) unless ``attention_factor`` is given."""
    dim = rotary_dim(head_dim, partial_rotary_factor)
    validate_method("longrope", factor, params, original_len, rotary_dim=dim)
    ext = params["long_factor"] if seq_len and seq_len > original_len else params["short_factor"]
    inv = _theta(dim, base) / torch.tensor(ext, dtype=torch.float64)
    scale = params.get("attention_factor")
    if scale is None:
        scale = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original_len))
    return _out(inv, scale)


def theta(head_dim, base, partial_rotary_factor, original_len, factor, params, seq_len=None):
    """A new base given outright (``{"rope_theta": 1e6}``, as Code Llama); ``factor`` only names the target length."""
    dim = rotary_dim(head_dim, partial_rotary_factor)
    validate_method("theta", factor, params, original_len, rotary_dim=dim)
    return _out(_theta(dim, float(params["rope_theta"])), 1.0)


# --- validation ---------------------------------------------------------------------------------------------------


def _positive(params: Params, *names: str) -> None:
    for k in names:
        v = params.get(k)
        if v is not None and not (_is_number(v) and v > 0):
            raise RopeConfigError(f"parameter '{k}' must be a positive number (got {v!r})")


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _check_ramp(p: Params) -> None:
    if p["ramp"] not in RAMPS:
        raise RopeConfigError(f"parameter 'ramp' must be one of {', '.join(RAMPS)} (got {p['ramp']!r})")
    if not isinstance(p["truncate"], bool):
        raise RopeConfigError(f"parameter 'truncate' must be true or false (got {p['truncate']!r})")


def _no_check(factor: float, params: Params, rotary_dim: int | None) -> None:
    pass


def _check_ntk_aware(factor: float, params: Params, rotary_dim: int | None) -> None:
    p = {**NTK_AWARE_DEFAULTS, **params}
    if not (_is_number(p["alpha"]) and p["alpha"] >= 1):
        raise RopeConfigError(f"parameter 'alpha' of ntk_aware must be a number >= 1 (got {p['alpha']!r}); it "
                              "multiplies the scale s in the base b * (alpha s)^(d/(d-2))")


def _check_by_parts(factor: float, params: Params, rotary_dim: int | None) -> None:
    p = {**BY_PARTS_DEFAULTS, **params}
    _positive(p, "alpha", "beta")
    if p["beta"] <= p["alpha"]:
        raise RopeConfigError(f"ntk_by_parts needs beta > alpha (got beta={p['beta']}, alpha={p['alpha']}): "
                              "dimensions turning more than beta times within L are kept, fewer than alpha divided")
    _check_ramp(p)


def _check_yarn(factor: float, params: Params, rotary_dim: int | None) -> None:
    p = {**YARN_DEFAULTS, **params}
    _positive(p, "beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim")
    if p["beta_fast"] <= p["beta_slow"]:
        raise RopeConfigError(f"yarn needs beta_fast > beta_slow (got beta_fast={p['beta_fast']}, "
                              f"beta_slow={p['beta_slow']}); the defaults are 32 and 1")
    if ("mscale" in p) != ("mscale_all_dim" in p):
        raise RopeConfigError("give mscale and mscale_all_dim together (attention scale "
                              "(0.1 mscale ln s + 1) / (0.1 mscale_all_dim ln s + 1)), or neither")
    if "attention_factor" in p and "mscale" in p:
        raise RopeConfigError("give either attention_factor or mscale/mscale_all_dim, not both")
    _check_ramp(p)


def _check_llama3(factor: float, params: Params, rotary_dim: int | None) -> None:
    p = {**LLAMA3_DEFAULTS, **params}
    _positive(p, "low_freq_factor", "high_freq_factor")
    if p["high_freq_factor"] <= p["low_freq_factor"]:
        raise RopeConfigError(f"llama3 needs high_freq_factor > low_freq_factor (got {p['high_freq_factor']} and "
                              f"{p['low_freq_factor']}); Llama 3.1 uses 4 and 1")


def _check_longrope(factor: float, params: Params, rotary_dim: int | None) -> None:
    _positive(params, "attention_factor")
    for k in ("short_factor", "long_factor"):
        v = params[k]
        if not (isinstance(v, (list, tuple)) and all(_is_number(x) and x > 0 for x in v)):
            raise RopeConfigError(f"longrope parameter '{k}' must be a list of positive numbers, one per rotary pair")
        if rotary_dim is not None and len(v) != rotary_dim // 2:
            raise RopeConfigError(f"longrope parameter '{k}' has {len(v)} entries; this model has {rotary_dim // 2} "
                                  f"rotary pairs (rotary dim {rotary_dim} / 2), so it needs {rotary_dim // 2}")


def _check_theta(factor: float, params: Params, rotary_dim: int | None) -> None:
    _positive(params, "rope_theta")


# --- how each method is written into, and read back from, transformers' config.rope_parameters -----------------
# A writer gets the method's parameters with defaults filled (``p``), s, L, the unscaled base and |D|, and returns
# the rope_parameters transformers needs to compute that method natively (ropescale.apply adds what every method
# shares: original_max_position_embeddings where transformers reads it, partial_rotary_factor).


def _hf_default(p: Params, s: float, L: int, base: float, dim: int) -> dict:
    return {"rope_type": "default", "rope_theta": base}


def _hf_linear(p: Params, s: float, L: int, base: float, dim: int) -> dict:
    return {"rope_type": "linear", "rope_theta": base, "factor": s}


def _hf_ntk_aware(p: Params, s: float, L: int, base: float, dim: int) -> dict:
    return {"rope_type": "default", "rope_theta": ntk_aware_base(dim, base, s, p["alpha"])}


def _hf_dynamic_ntk(p: Params, s: float, L: int, base: float, dim: int) -> dict:
    return {"rope_type": "dynamic", "rope_theta": base, "factor": s}


def servers_attn_factor(p: Params, factor: float) -> dict:
    """``{"attn_factor": a}`` for a yarn type whose explicit ``attention_factor`` differs from the multiplier
    servers compute without it (``yarn_attention_scale`` of the other keys: 0.1 ln s + 1, or the mscale pair's
    ratio): SGLang's YaRN never reads ``attention_factor`` and multiplies that default by ``attn_factor`` (vLLM's did
    the same before it learned the key). ``{}`` otherwise. transformers ignores the key (with a warning);
    docs/serving.md cites each server's code."""
    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        return {}
    default = yarn_attention_scale(factor, {k: v for k, v in p.items() if k != "attention_factor"})
    if math.isclose(attention_factor, default, rel_tol=0, abs_tol=1e-12):
        return {}
    return {"attn_factor": float(attention_factor) / default}


def _hf_by_parts(p: Params, s: float, L: int, base: float, dim: int) -> dict:
    # transformers' yarn type with the temperature switched off is NTK-by-parts (beta_fast = beta, beta_slow = alpha).
    return {"rope_type": "yarn", "rope_theta": base, "factor": s, "beta_fast": float(p["beta"]),
            "beta_slow": float(p["alpha"]), "attention_factor": 1.0, "truncate": p["truncate"],
            **servers_attn_factor({"attention_factor": 1.0}, s)}


def _hf_yarn(p: Params, s: float, L: int, base: float, dim: int) -> dict:
    return {"rope_type": "yarn", "rope_theta": base, "factor": s,
            **{k: (v if k == "truncate" else float(v)) for k, v in p.items() if v is not None},
            **servers_attn_factor(p, s)}


def _hf_llama3(p: Params, s: float, L: int, base: float, dim: int) -> dict:
    return {"rope_type": "llama3", "rope_theta": base, "factor": s, "low_freq_factor": float(p["low_freq_factor"]),
            "high_freq_factor": float(p["high_freq_factor"])}


def _hf_longrope(p: Params, s: float, L: int, base: float, dim: int) -> dict:
    rp = {"rope_type": "longrope", "rope_theta": base, "factor": s,
          "short_factor": [float(x) for x in p["short_factor"]], "long_factor": [float(x) for x in p["long_factor"]]}
    if p.get("attention_factor") is not None:
        rp["attention_factor"] = float(p["attention_factor"])
    return rp


def _hf_theta(p: Params, s: float, L: int, base: float, dim: int) -> dict:
    return {"rope_type": "default", "rope_theta": float(p["rope_theta"])}


@dataclass(frozen=True)
class RopeMethod:
    """One registry entry: everything about a method.

    ``fn``: the math (module docstring); ``validate(factor, params, rotary_dim)``: its own checks, run by
    ``validate_method`` after the generic ones; ``summary``: one line for help texts; ``params``: accepted parameter
    names (``required`` among them); ``defaults``: values used when a parameter is left out (and written out into
    saved configs); ``to_hf``: its ``rope_parameters`` (see the writers above); ``keeps_max_position``:
    ``max_position_embeddings`` stays L instead of L*s (transformers' dynamic type reads it as the original length);
    ``length_dependent``: the table depends on the current sequence length (``seq_len``), so keys cached by one
    forward are not exactly what a forward of another length would compute (the evals' shared-prefix reuse is off);
    ``hf_type``/``hf_params``: for a config ropescale did not write, the transformers ``rope_type`` read back as this
    method and the ``rope_parameters`` keys read back as its parameters (several methods write ``default`` or
    ``yarn``; only one of each is read back, the others are told apart by ropescale's provenance record).
    """

    fn: Callable[..., tuple[torch.Tensor, float]]
    validate: Callable[[float, Params, int | None], None]
    to_hf: Callable[[Params, float, int, float, int], dict]
    summary: str
    params: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    keeps_max_position: bool = False
    length_dependent: bool = False
    hf_type: str | None = None
    hf_params: tuple[str, ...] = ()


_YARN_PARAMS = ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate", "ramp")

ROPE_METHODS: dict[str, RopeMethod] = {
    "none": RopeMethod(none, _no_check, _hf_default, "plain RoPE (extrapolation beyond L)", hf_type="default"),
    "linear": RopeMethod(linear, _no_check, _hf_linear, "Position Interpolation: positions m/s (3.1)",
                         hf_type="linear"),
    "ntk_aware": RopeMethod(
        ntk_aware, _check_ntk_aware, _hf_ntk_aware, "NTK-aware: base * (alpha s)^(d/(d-2)) (3.1)", params=("alpha",),
        defaults=NTK_AWARE_DEFAULTS),
    "dynamic_ntk": RopeMethod(
        dynamic_ntk, _no_check, _hf_dynamic_ntk, "NTK-aware recomputed from the current length (3.3)",
        keeps_max_position=True, length_dependent=True, hf_type="dynamic"),
    "ntk_by_parts": RopeMethod(
        ntk_by_parts, _check_by_parts, _hf_by_parts, "keep r > beta, divide r < alpha by s, ramp between (3.2)",
        params=("alpha", "beta", "truncate", "ramp"), defaults=BY_PARTS_DEFAULTS),
    "yarn": RopeMethod(
        yarn, _check_yarn, _hf_yarn, "NTK-by-parts + attention scale 0.1 ln s + 1 (3.4)", params=_YARN_PARAMS,
        defaults=YARN_DEFAULTS, hf_type="yarn", hf_params=tuple(k for k in _YARN_PARAMS if k != "ramp")),
    # Written as static YaRN at the target factor (a plain reload runs that); ropescale.runtime makes it dynamic.
    "dynamic_yarn": RopeMethod(
        dynamic_yarn, _check_yarn, _hf_yarn, "YaRN with s = max(1, n/L) at the current length n (3.3)",
        params=tuple(k for k in _YARN_PARAMS if k != "attention_factor"), defaults=YARN_DEFAULTS,
        length_dependent=True),
    "llama3": RopeMethod(
        llama3, _check_llama3, _hf_llama3, "Llama 3.1: by-parts ramp on r between low/high freq factors",
        params=("low_freq_factor", "high_freq_factor"), defaults=LLAMA3_DEFAULTS, hf_type="llama3",
        hf_params=("low_freq_factor", "high_freq_factor")),
    "longrope": RopeMethod(
        longrope, _check_longrope, _hf_longrope, "per-dimension short/long factors (LongRoPE)",
        params=("short_factor", "long_factor", "attention_factor"), required=("short_factor", "long_factor"),
        length_dependent=True, hf_type="longrope", hf_params=("short_factor", "long_factor", "attention_factor")),
    "theta": RopeMethod(
        theta, _check_theta, _hf_theta, "an explicit new base (Code Llama: 1e6)", params=("rope_theta",),
        required=("rope_theta",)),
}


def method_from_hf(rope_type: str) -> str | None:
    """The registry method a transformers ``rope_type`` is read back as (None: not one ropescale knows)."""
    return next((name for name, m in ROPE_METHODS.items() if m.hf_type == rope_type), None)


def _suggest(name: str, choices: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f"did you mean '{close[0]}'? " if close else ""


def validate_method(method: str, factor: float, params: Params | None, original_len: int,
                    target_len: int | None = None, *, rotary_dim: int | None = None) -> None:
    """Raise ``RopeConfigError`` (one line, naming the problem and the fix) unless the method can be applied.

    Checks: the method exists (the closest name is suggested), 1 <= factor, a positive original length, target >=
    original, parameter names (the closest accepted name is suggested) and the method's own constraints
    (beta_fast > beta_slow, ...). Given ``rotary_dim``, the lengths of longrope's factor lists are checked too.
    """
    if method not in ROPE_METHODS:
        raise RopeConfigError(f"unknown RoPE method '{method}'; {_suggest(method, list(ROPE_METHODS))}"
                              f"known methods: {', '.join(ROPE_METHODS)}")
    if not _is_number(factor) or factor < 1:
        raise RopeConfigError(f"factor must be a number >= 1 (got {factor!r}): it is target length / original "
                              "length, and a context extension needs a target at least as long as the original")
    if not (isinstance(original_len, numbers.Integral) and not isinstance(original_len, bool) and original_len > 0):
        raise RopeConfigError(f"original length must be a positive integer (got {original_len!r})")
    if target_len is not None and target_len < original_len:
        raise RopeConfigError(f"target length {target_len} is below the original length {original_len}; scaling "
                              "only extends a context (for shorter inputs use the model as it is)")
    params = {} if params is None else params
    if not isinstance(params, Mapping):
        raise RopeConfigError(f"params must be a dict of parameter names to values (got {type(params).__name__})")
    spec = ROPE_METHODS[method]
    for k in params:
        if k not in spec.params:
            if not spec.params:
                raise RopeConfigError(f"method '{method}' takes no parameters (got '{k}')")
            raise RopeConfigError(f"unknown parameter '{k}' for method '{method}'; {_suggest(k, spec.params)}"
                                  f"accepted: {', '.join(spec.params)}")
    for k in spec.required:
        if k not in params:
            raise RopeConfigError(f"method '{method}' needs parameter '{k}' ({_REQUIRED_HINT[k]})")
    spec.validate(factor, params, rotary_dim)


_REQUIRED_HINT = {
    "rope_theta": "the new base, e.g. {'rope_theta': 1000000.0}",
    "short_factor": "a list of rotary_dim/2 per-dimension factors used up to the original length",
    "long_factor": "a list of rotary_dim/2 per-dimension factors used beyond the original length",
}
