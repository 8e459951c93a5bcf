"""Choosing a method and a scale factor before training: ``python -m ropescale plan`` (its report and theory).

Theory (this module, from the RoPE settings alone): every candidate method at a small grid of factors around the
nominal s = T / L is described by ``ropescale.theory``: rotary pairs out of bound at the target T, the effective
extension, the factor the method needs for T, the attention scale, the adjacent-token resolution; for the model,
Liu et al.'s critical dimension and the base a plain base change needs for T, and Men et al.'s base lower bound.
Measurement (``eval.candidates``, run by the command when ``--theory-only`` is not given): each candidate scored
training-free on held-out text at T, and a recommendation per method, ranked. ``write_report`` writes ``plan.md``,
``plan.json`` and the pictures (angle coverage per pair, similarity kernels, measured loss by position);
``sweep_yaml`` turns the top candidates into a launch/sweep.py config.

    python -m ropescale plan --model smollm2-135m --target 16384 --out results/plan/smollm2-16k
    python -m ropescale plan --model smollm2-135m --target 32768 --theory-only
    python -m ropescale plan --head-dim 128 --base 10000 --original 4096 --target 32768 --theory-only --json
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ropescale import theory
from ropescale.methods import ROPE_METHODS, RopeConfigError, rotary_dim, validate_method
from utils.files import save_figure, write_atomic, write_json

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


def format_markdown(plan: dict, command: str, guide: bool = True) -> str:
    """``plan.md``: the command, the model's numbers, the candidates' tables, and with ``guide`` how to read them and
    the pictures (the terminal gets it without)."""
    m = plan["model"]
    bound = m["base_lower_bound"]
    lines = [
        f"# RoPE plan: L = {m['original_len']} -> target {m['target']} (nominal s = {m['nominal_factor']:g})", "",
        f"`{command}`", "",
        f"- rotary dimension {m['rotary_dim']} (head_dim {m['head_dim']}), base {m['base']:g}",
        f"- critical dimension (Liu et al. 2023): {m['critical_dim']} of {m['rotary_dim']} channels turn within L; "
        f"a plain base change reaches the target with base >= {m['theta_for_target']:.4g}",
        "- base lower bound for the target (Men et al. 2024, sum of cos(m theta_i) >= 0 up to the target): "
        + (f"{bound:.3g} (the model's base is {'above' if m['base'] >= bound else 'below'} it)" if bound
           else "not computed"),
        "", "| method | s | out-of-bound pairs at target | effective extension | s needed for target | "
        "attention scale | adjacent-angle resolution |", "|---|---|---|---|---|---|---|",
    ]
    for c in summary_rows(plan):
        ext = "unbounded" if c["effective_extension"] is None else f"{c['effective_extension']:,}"
        need = "none reaches it" if c["factor_for_target"] is None else f"{c['factor_for_target']:.4g}"
        lines.append(f"| {c['method']} | {c['factor']:g} | {c['out_of_bound']} | {ext} | {need} | "
                     f"{c['attention_scale']:.4g} | {c['adjacent_resolution']:.3f} |")
    if "measured" in plan:
        lines += measured_markdown(plan, guide)
    if not guide:
        return "\n".join(lines)
    lines += [
        "", "How to read it: a pair is out of bound when it never made a full turn within L and the scaled angles at "
        "the target pass the arc it saw; the effective extension is the longest length with no such pair; the "
        "adjacent-angle resolution is the mean over pairs of theta'/theta (1: neighbouring tokens as distinct as in "
        "training; PI divides every pair by s, by-parts methods keep the fast ones).", "",
        "![angle coverage](coverage.png)", "", "![similarity kernels](kernel.png)", "",
    ]
    return "\n".join(lines)


def measured_markdown(plan: dict, guide: bool = True) -> list[str]:
    """The measured part of ``plan.md``: the recommendation, then every candidate's numbers (and with ``guide``, the
    loss-by-position picture and the next step)."""
    ms, L = plan["measured"], plan["model"]["original_len"]
    lines = ["", f"## Measured: training-free loss at {plan['model']['target']:,} tokens", "",
             f"Data: {ms['data']}; {ms['windows']} window(s) of {plan['model']['target']:,} tokens, scored in "
             f"{ms['dtype']}; native cost = "
             f"mean loss over positions below L = {L:,} minus the unscaled model's; effective context: the start of "
             f"the first position bucket past L whose loss exceeds the unscaled model's loss over positions L/2..L-1 "
             f"by more than {ms['tolerance']:g} nats.", "", "### Recommendation", "",
             "| rank | method | s | why |", "|---|---|---|---|"]
    lines += [f"| {r['rank']} | {r['method']} | {r['factor']:g} | {r['why']} |" for r in plan["recommendation"]]
    ref = ms["rows"][0]
    better = [r["method"] for r in plan["recommendation"] if r["target_nll"] < ref["target_nll"]]
    lines += ["", f"The unscaled model (plain RoPE extrapolating past L) scores {ref['target_nll']:.4f} at the target "
              f"with effective context {ref['effective_context']:,}; "
              + (f"recommended methods that beat it: {', '.join(better)}." if better else
                 "no scaled candidate beats it training-free here; the ranking orders the scaled methods only.")]
    lines += ["", f"Native-cost limit for a recommendation: {ms['native_tolerance']:g} nats (a method whose every "
              "factor costs more is still ranked, at its best factor).", "",
              "| method | s | loss at target | ppl at target | native cost (nats) | effective context | seconds |",
              "|---|---|---|---|---|---|---|"]
    for r in ms["rows"]:
        ppl = math.exp(r["target_nll"]) if r["target_nll"] < 700 else float("inf")
        lines.append(f"| {r['method']} | {r['factor']:g} | {r['target_nll']:.4f} | {ppl:.3f} | "
                     f"{r['native_cost']:+.4f} | {r['effective_context']:,} | {r['seconds']:g} |")
    lines += [f"| {s['method']} | {s['factor']:g} | {s['reason']} | | | | |" for s in ms.get("skipped", [])]
    if ms.get("search") == "scan":
        lines += ["", "Search: scan (each method's factors in increasing order, stopped at the first whose loss rose "
                  "above the best of the smaller ones; `--search grid` scores every candidate)."]
    if not guide:
        return lines
    lines += ["", "![loss by position](loss_by_position.png)"]
    if plan.get("sweep"):
        lines += ["", f"Next step, fine-tuning the top candidates: `{plan['sweep']['command']}` "
                  f"(`{plan['sweep']['path']}`)."]
    return lines


def sweep_yaml(plan: dict, base_config: str, path: str, top: int = 3) -> str:
    """The text of a sweep config (launch/sweep.py's format, to be written at ``path``) over the ``top`` recommended
    (method, factor) pairs on ``base_config``'s recipe (whose ``data.seq_len`` should be the plan's target)."""
    picks = [[r["method"], r["factor"]] for r in plan["recommendation"][:top]]
    if not picks:
        raise RopeConfigError("the plan has no recommendation to turn into a sweep (run it without --theory-only)")
    m = plan["model"]
    name = f"plan-{m['original_len']}-to-{m['target']}"
    grid = ", ".join(f"[{meth}, {fac:g}]" for meth, fac in picks)
    return "\n".join([
        f"# Launch:   python launch/sweep.py --config {path}",
        f"# Override: python launch/sweep.py --config {path} --set train.max_steps=20",
        "#",
        f"# Written by `python -m ropescale plan` for L = {m['original_len']} -> {m['target']}: the {len(picks)} "
        "best training-free candidates (method, s),",
        f"# each fine-tuned with {base_config}'s recipe; see plan.md beside the plan's results for why.",
        f"name: {name}",
        f"base: {base_config}",
        "grid:",
        f'  "rope.method,rope.factor": [{grid}]',
        "overrides:",
        f"  output.dir: runs/sweeps/{name}",
        "",
    ])


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (imported on first use: theory alone needs no plotting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _first_per_method(plan: dict) -> dict[str, dict]:
    """Each method's first candidate (its smallest factor on the default grid): what the theory pictures draw."""
    firsts: dict[str, dict] = {}
    for c in plan["candidates"]:
        firsts.setdefault(c["method"], c)
    return firsts


def _save(fig, path: Path, plt, tight: bool = False) -> Path:
    try:
        save_figure(fig, path, tight=tight)
    finally:
        plt.close(fig)
    return path


def plot_measured(plan: dict, path: Path) -> Path:
    """One page: mean loss per position bucket of every measured candidate (and the unscaled model), L marked."""
    plt = _pyplot()
    m, rows = plan["model"], plan["measured"]["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(11, 6.5))
    styles = ["-", "--", "-.", ":"]
    for r in rows:
        k = methods.index(r["method"])
        same = [x for x in rows if x["method"] == r["method"]]
        ends = [b["end"] for b in r["buckets"]]
        ax.plot(ends, [b["nll"] for b in r["buckets"]], styles[same.index(r) % 4], color="k" if r["method"] == "none"
                else f"C{k}", marker="o", ms=3, label=f"{r['method']} x{r['factor']:g}")
    ax.axvline(m["original_len"], color="grey", ls=":", label=f"L = {m['original_len']}")
    ax.set_xlabel("position (end of bucket, tokens)")
    ax.set_ylabel("mean loss (nats)")
    ax.set_title(f"Training-free loss by position at {m['target']:,} tokens (lower is better; past L the unscaled "
                 "model extrapolates)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return _save(fig, path, plt, tight=True)


def plot_coverage(plan: dict, path: Path) -> Path:
    """One page: the share of the circle each pair's rotation covers within L (trained) and within the target, per
    method at its first factor; out-of-bound pairs marked."""
    plt = _pyplot()
    m = plan["model"]
    firsts = _first_per_method(plan)
    fig, ax = plt.subplots(figsize=(10, 6))
    rows0 = plan["candidates"][0]["rows"]
    idx = [r["index"] for r in rows0]
    ax.plot(idx, [r["coverage_L"] for r in rows0], "k-", lw=2.5, label=f"trained: within L = {m['original_len']}")
    ax.plot(idx, [min(1.0, r["turns_L"] * m["target"] / m["original_len"]) for r in rows0], "k:",
            label="no scaling, within the target")
    for k, (name, c) in enumerate(firsts.items()):
        cov = [r["coverage_target"] for r in c["rows"]]
        ax.plot(idx, cov, "--", color=f"C{k}", label=f"{name} x{c['factor']:g}, within the target")
        oob = [r["index"] for r in c["rows"] if r["out_of_bound"]]
        ax.plot(oob, [cov[i] for i in oob], "x", color=f"C{k}", ms=7)
    ax.set_yscale("log")
    ax.set_xlabel("rotary pair i (high frequency -> low frequency)")
    ax.set_ylabel("share of the circle covered (1 = every angle)")
    ax.set_title(f"Angle coverage per pair, L = {m['original_len']} -> {m['target']}; x: out of bound (angles never "
                 "seen in training)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path, plt)


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


def plot_kernels(plan: dict, path: Path) -> Path:
    """One page: K(m) = mean cos(m theta'_i) against distance m up to the target (averaged over log-spaced bins),
    per method at its first factor, with the unscaled model's curve."""
    plt = _pyplot()
    m = plan["model"]
    fig, ax = plt.subplots(figsize=(10, 6))
    base_theta = torch.tensor([r["adjacent_angle"] for r in plan["candidates"][0]["rows"]], dtype=torch.float64)
    ax.plot(*binned_kernel(base_theta, m["target"]), "k-", lw=2, label="unscaled")
    firsts = _first_per_method(plan)
    for k, (name, c) in enumerate(firsts.items()):
        scaled = torch.tensor([r["adjacent_angle_scaled"] for r in c["rows"]], dtype=torch.float64)
        ax.plot(*binned_kernel(scaled, m["target"]), "--", color=f"C{k}", label=f"{name} x{c['factor']:g}")
    ax.axvline(m["original_len"], color="grey", ls=":", label=f"L = {m['original_len']}")
    ax.set_xscale("log")
    ax.set_xlabel("distance m (tokens)")
    ax.set_ylabel("K(m) = mean over pairs of cos(m theta_i)")
    ax.set_title("Similarity kernel (RoPE's long-term decay) per method, mean over log-spaced bins of distance",
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path, plt)


def write_report(plan: dict, out: str | Path, command: str) -> Path:
    """``plan.json`` (everything), ``plan.md`` and the PNGs (coverage, kernel, and loss by position when measured)
    into ``out`` (created); returns ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "plan.json", {"command": command, **plan})
    plot_coverage(plan, out / "coverage.png")
    plot_kernels(plan, out / "kernel.png")
    if "measured" in plan:
        plot_measured(plan, out / "loss_by_position.png")
    write_atomic(out / "plan.md", format_markdown(plan, command))
    return out
