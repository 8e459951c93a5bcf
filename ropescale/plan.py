"""Choosing a method and a scale factor before training: ``python -m ropescale plan`` (its report and theory).

Theory (this module, from the RoPE settings alone): every candidate method at a small grid of factors around the
nominal s = T / L is described by ``ropescale.theory``: rotary pairs out of bound at the target T, the effective
extension, the factor the method needs for T, the attention scale, the adjacent-token resolution; for the model,
Liu et al.'s critical dimension and the base a plain base change needs for T, and Men et al.'s base lower bound.
Measurement (``eval.candidates``, run by the command when ``--theory-only`` is not given): each candidate scored
training-free on held-out text at T, and a recommendation per method, ranked. The report (``plan.md``, ``plan.json``,
the pictures) and the sweep config of the top candidates are written by ``launch.plan``; this module computes.

    python -m ropescale plan --model smollm2-135m --target 16384 --out results/plan/smollm2-16k
    python -m ropescale plan --model smollm2-135m --target 32768 --theory-only
    python -m ropescale plan --head-dim 128 --base 10000 --original 4096 --target 32768 --theory-only --json
"""

from __future__ import annotations

import math

import torch

from ropescale import theory
from ropescale.methods import ROPE_METHODS, RopeConfigError, rotary_dim, validate_method

DEFAULT_METHODS = ("linear", "ntk_aware", "ntk_by_parts", "yarn")
DEFAULT_MULTIPLIERS = (1.0, 1.25, 1.5, 2.0)  # times the nominal factor T / L


def candidates(original_len: int, target: int, methods: tuple[str, ...] = DEFAULT_METHODS,
               factors: tuple[float, ...] | None = None) -> list[tuple[str, float]]:
    """(method, factor) pairs: ``factors`` as given, else the nominal T / L times each of ``DEFAULT_MULTIPLIERS``."""
    if target < original_len:
        raise RopeConfigError(f"--target {target} is below the original length {original_len}: a plan extends a "
                              "context; give a target above it")
    for m in methods:
        if m not in ROPE_METHODS:
            validate_method(m, 1.0, {}, original_len)  # raises with the closest name
        if ROPE_METHODS[m].required:
            raise RopeConfigError(f"method '{m}' needs parameters ({', '.join(ROPE_METHODS[m].required)}) a plan "
                                  "cannot choose; plan it with inspect --params, or leave it out of --methods")
    nominal = target / original_len
    grid = factors or tuple(round(nominal * k, 4) for k in DEFAULT_MULTIPLIERS)
    bad = [f for f in grid if not (isinstance(f, (int, float)) and 1 <= f <= 1e4)]
    if bad:
        raise RopeConfigError(f"--factors must be numbers from 1 to 10000 (got {bad})")
    return [(m, float(f)) for m in methods for f in grid]


def theory_plan(head_dim: int, base: float, original_len: int, target: int,
                methods: tuple[str, ...] = DEFAULT_METHODS, factors: tuple[float, ...] | None = None,
                partial_rotary_factor: float = 1.0, base_bound: bool = True) -> dict:
    """The whole theory part as one JSON-able dict: ``model`` (critical dimension, base for T, base lower bound),
    ``candidates`` (one ``theory.method_theory`` per (method, factor), rows included)."""
    dim = rotary_dim(head_dim, partial_rotary_factor)
    grid = candidates(original_len, target, methods, factors)
    per = [theory.method_theory(head_dim, base, original_len, target, m, f, None, partial_rotary_factor)
           for m, f in grid]
    model = {
        "head_dim": head_dim, "rotary_dim": dim, "base": base, "original_len": original_len, "target": target,
        "nominal_factor": target / original_len,
        "critical_dim": theory.critical_dim(dim, base, original_len),
        "theta_for_target": theory.theta_for_target(dim, base, original_len, target),
        # Men et al.: the base the target itself asks for, beside the model's own (None: not computed)
        "base_lower_bound": theory.base_lower_bound(dim, target) if base_bound else None,
    }
    return {"model": model, "candidates": per}


def summary_rows(plan: dict) -> list[dict]:
    """One row per candidate, without the per-pair rows."""
    return [{k: v for k, v in c.items() if k != "rows"} for c in plan["candidates"]]


def binned_kernel(theta: torch.Tensor, target: int, bins: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """``(centers, K)``: K(m) at every distance 1 .. ``target`` averaged over ``bins`` log-spaced bins (the raw
    curve oscillates too fast to read); float64 ``[<= bins]`` each (empty bins dropped)."""
    dist = torch.arange(1, target + 1, dtype=torch.float64)
    k = torch.cat([theory.kernel(theta, d) for d in dist.split(8192)])
    edges = torch.logspace(0, math.log10(target + 1), bins + 1, dtype=torch.float64)
    which = torch.bucketize(dist, edges, right=True) - 1
    centers, means = [], []
    for b in range(bins):
        sel = which == b
        if sel.any():
            centers.append(float(dist[sel].mean()))
            means.append(float(k[sel].mean()))
    return torch.tensor(centers, dtype=torch.float64), torch.tensor(means, dtype=torch.float64)
