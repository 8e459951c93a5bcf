"""Per-dimension view of a RoPE scaling method: what it keeps, blends, interpolates (``python -m ropescale inspect``).

For each rotary pair d (YaRN paper notation, section 3): the wavelength lambda_d = 2 pi / theta_d before and after
scaling, r = L / lambda_d (full turns within the original length L), the turns the scaled dimension makes within the
target length, the effective scale theta_d / theta'_d, and the region that scale puts it in: ``extrapolated`` (kept,
scale 1), ``interpolated`` (divided by s or more) or ``blended`` (between). Dynamic methods are shown at the target
length. A dimension whose scaled turns within the target equal its r within L sees only angles it saw in training.

    python -m ropescale inspect --model smollm2-135m --method yarn --factor 2
    python -m ropescale inspect --head-dim 128 --base 10000 --original 4096 --method yarn --factor 16 --json
    python -m ropescale inspect --model tiny-llama --method ntk_by_parts --factor 4 --plot rope.png
"""

from __future__ import annotations

import argparse
import json
import math

from ropescale.apply import head_dim_of, original_context, partial_rotary_factor_of, rope_of
from ropescale import theory
from ropescale.methods import ROPE_METHODS, RopeConfigError, rotary_dim, validate_method

_TOL = 1e-6  # relative: float32 frequencies carry ~1e-7


def _region(scale: float, factor: float) -> str:
    if math.isclose(scale, 1.0, rel_tol=_TOL):
        return "extrapolated"
    return "interpolated" if scale >= factor * (1 - _TOL) and factor > 1 else "blended"


def rope_table(head_dim: int, base: float, original_len: int, method: str, factor: float, params: dict | None = None,
               partial_rotary_factor: float = 1.0) -> dict:
    """The per-dimension table of ``method`` at ``factor``, plus its ``inv_freq`` (list, ``[rotary_dim/2]``) and
    ``attention_scale`` (multiplies cos/sin; ``logit_scale`` = its square multiplies q.k).

    Rows: ``index``, ``wavelength``, ``wavelength_scaled``, ``r`` (= L / wavelength: turns within L),
    ``turns_target`` (turns of the scaled dimension within the target length), ``scale``, ``region``.
    """
    params = dict(params or {})
    dim = rotary_dim(head_dim, partial_rotary_factor)
    validate_method(method, factor, params, original_len, rotary_dim=dim)
    target = round(original_len * factor)
    args = (head_dim, base, partial_rotary_factor, original_len)
    inv0, _ = ROPE_METHODS["none"].fn(*args, 1.0, {})
    inv, attention = ROPE_METHODS[method].fn(*args, factor, params, seq_len=target)
    rows = []
    for i, (t0, t) in enumerate(zip(inv0.double().tolist(), inv.double().tolist())):
        wl0, wl = 2 * math.pi / t0, 2 * math.pi / t
        rows.append({"index": i, "wavelength": wl0, "wavelength_scaled": wl, "r": original_len / wl0,
                     "turns_target": target / wl, "scale": t0 / t, "region": _region(t0 / t, factor)})
    return {"method": method, "factor": float(factor), "params": {**ROPE_METHODS[method].defaults, **params},
            "head_dim": head_dim, "rotary_dim": dim, "partial_rotary_factor": partial_rotary_factor, "base": base,
            "original_len": original_len, "target_len": target, "inv_freq": inv.tolist(),
            "attention_scale": attention, "logit_scale": attention**2,
            "spectrum": theory.spectrum(head_dim, base, original_len, partial_rotary_factor), "rows": rows}


def format_table(t: dict) -> str:
    """The table as fixed-width text."""
    head = (f"{t['method']} x{t['factor']:g}: head_dim {t['head_dim']} (rotary {t['rotary_dim']}), base {t['base']:g},"
            f" L {t['original_len']} -> target {t['target_len']}; params {t['params'] or '{}'}")
    cols = f"{'d':>3} {'wavelength':>12} {'scaled':>12} {'r=L/wl':>10} {'turns@target':>13} {'scale':>8}  region"
    lines = [head, cols]
    for r in t["rows"]:
        lines.append(f"{r['index']:>3} {r['wavelength']:>12.5g} {r['wavelength_scaled']:>12.5g} {r['r']:>10.4g} "
                     f"{r['turns_target']:>13.4g} {r['scale']:>8.4g}  {r['region']}")
    counts = {k: sum(r["region"] == k for r in t["rows"]) for k in ("extrapolated", "blended", "interpolated")}
    lines.append(", ".join(f"{v} {k}" for k, v in counts.items()))
    lines.append(f"attention scale {t['attention_scale']:.6g} (multiplies cos and sin; q.k logits x "
                 f"{t['logit_scale']:.6g})")
    s = t["spectrum"]
    lines.append(f"the model's spectrum within L (NTK-by-parts regions): {s['high_share']:.0%} of pairs turn more than "
                 f"{s['beta']:g} times (kept), {s['ramp_share']:.0%} between, {s['low_share']:.0%} less than "
                 f"{s['alpha']:g} time (interpolated); {s['still']} of {s['pairs']} turn less than a radian across "
                 f"it (the slowest {s['slowest_angle']:.2f})")
    return "\n".join(lines)


def comparable_methods(method: str, params: dict) -> dict[str, dict]:
    """Methods drawn in the comparison panel: all that run with default parameters, plus the chosen one."""
    out = {m: {} for m, spec in ROPE_METHODS.items() if not spec.required}
    out[method] = params
    return out


def add_source_arguments(p: argparse.ArgumentParser) -> None:
    """The model's RoPE on the command line (``inspect`` and ``plan``): --model, or --head-dim/--base/--original."""
    src = p.add_argument_group("the model's RoPE: --model, or --head-dim/--base/--original")
    src.add_argument("--model", help="model name or folder (a tiny preset, smollm2-135m, a local folder, a hub id)")
    src.add_argument("--head-dim", type=int)
    src.add_argument("--base", type=float, help="rope_theta")
    src.add_argument("--original", type=int, help="original context length L (with --model: overrides the config)")
    src.add_argument("--partial-rotary-factor", type=float, default=None)


def rope_source(a: argparse.Namespace, load_config) -> tuple[dict, dict | None]:
    """``(head_dim, base, original_len, partial_rotary_factor)`` as a dict from ``add_source_arguments``' flags, and
    the RoPE settings already in the config of ``--model`` (None without it); ``load_config(name)`` reads that
    config."""
    if a.model:
        if a.head_dim is not None or a.base is not None:
            raise RopeConfigError("give either --model or --head-dim/--base/--original, not both")
        config = load_config(a.model)
        cur = rope_of(config)
        try:
            L = a.original if a.original is not None else original_context(config)
        except RopeConfigError as e:
            raise RopeConfigError(f"{e} (on the command line: --original)") from e
        return dict(head_dim=head_dim_of(config), base=cur["rope_theta"], original_len=L,
                    partial_rotary_factor=a.partial_rotary_factor or partial_rotary_factor_of(config)), cur
    missing = [f"--{n}" for n, v in (("head-dim", a.head_dim), ("base", a.base), ("original", a.original))
               if v is None]
    if missing:
        raise RopeConfigError(f"without --model, give {' '.join(missing)}")
    if a.head_dim < 2 or a.head_dim % 2 or a.base <= 1 or a.original < 1:
        raise RopeConfigError(f"--head-dim must be an even number >= 2, --base above 1 and --original at least 1 "
                              f"(got {a.head_dim}, {a.base:g}, {a.original})")
    return dict(head_dim=a.head_dim, base=a.base, original_len=a.original,
                partial_rotary_factor=a.partial_rotary_factor or 1.0), None


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_source_arguments(p)
    p.add_argument("--method", help=f"one of {', '.join(ROPE_METHODS)} (default with --model: the model's own)")
    p.add_argument("--factor", type=float, help="target length / L (default with --model: the model's own)")
    p.add_argument("--params", default=None, help='method parameters as JSON, e.g. \'{"beta_fast": 16}\'')
    p.add_argument("--json", action="store_true", help="print the table as one line of JSON")
    p.add_argument("--plot", metavar="PNG", help="also draw the comparison page to this PNG file")
    width = max(map(len, ROPE_METHODS))
    p.epilog = "methods (YaRN paper sections in brackets):\n" + "\n".join(
        f"  {name:<{width}}  {m.summary}" for name, m in ROPE_METHODS.items())


def resolve(a: argparse.Namespace, load_config) -> dict:
    """The rope_table arguments from the command line (and the config of ``--model``, read by ``load_config``)."""
    params = {}
    if a.params is not None:
        try:
            params = json.loads(a.params)
        except json.JSONDecodeError as e:
            raise RopeConfigError(f"--params is not valid JSON ({e}); e.g. --params '{{\"beta_fast\": 16}}'") from e
    src, cur = rope_source(a, load_config)
    if cur is not None:
        if (a.method is None) != (a.factor is None):
            raise RopeConfigError("give --method and --factor together (or neither, to inspect the model's own)")
        if a.method is None:
            a.method, a.factor, params = cur["method"], cur["factor"], cur["params"]
    missing = [f"--{n}" for n, v in (("method", a.method), ("factor", a.factor)) if v is None]
    if missing:
        raise RopeConfigError(f"without --model, give {' '.join(missing)}")
    return dict(src, method=a.method, factor=a.factor, params=params)
