"""The planner's report and the pictures of ``python -m ropescale inspect|plan``: ``plan.md``, ``plan.json``, the
angle coverage, similarity kernels and measured loss by position, inspect's comparison page, and the sweep config of
the top candidates (launch/sweep.py's format). The numbers come from ``ropescale.plan`` and ``ropescale.inspect``
(and ``eval.candidates`` for the measured part); this module only writes them.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ropescale.inspect import comparable_methods, rope_table
from ropescale.methods import RopeConfigError
from ropescale.plan import binned_kernel, summary_rows
from utils.files import save_figure, write_atomic, write_json


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


def plot_inspect(path: str | Path, head_dim: int, base: float, original_len: int, method: str, factor: float,
         params: dict | None = None, partial_rotary_factor: float = 1.0) -> Path:
    """One page, three panels: effective per-dimension scale of every method at ``factor``; wavelength against
    dimension with L and the target marked; turns within L and within the target. Written atomically (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    args = (head_dim, base, original_len)
    chosen = rope_table(*args, method, factor, params, partial_rotary_factor)
    L, target = original_len, chosen["target_len"]
    d = [r["index"] for r in chosen["rows"]]
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(10, 13), sharex=True)
    fig.suptitle(f"RoPE scaling x{factor:g}: head_dim {head_dim}, base {base:g}, L = {L} -> target {target}; "
                 f"{method} shaded", fontsize=12)

    styles = ["-", "--", "-.", ":"]
    for k, (m, p) in enumerate(comparable_methods(method, chosen["params"]).items()):
        t = chosen if m == method else rope_table(*args, m, factor, p, partial_rotary_factor)
        label = f"{m} (attn {t['attention_scale']:.3f})" if t["attention_scale"] != 1 else m
        ax1.plot(d, [r["scale"] for r in t["rows"]], styles[k % 4], marker="o" if m == method else None, ms=4,
                 lw=3 if m == method else 1.6, label=label)
    ax1.axhline(factor, color="grey", lw=0.8)
    ax1.set_yscale("log")
    ax1.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax1.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax1.set_ylabel("effective scale  theta / theta'")
    ax1.set_title(f"Effective scale per dimension: 1 = kept (extrapolated), {factor:g} = interpolated like PI\n"
                  "(dynamic methods at the target length; yarn, dynamic_yarn and ntk_by_parts nearly coincide)",
                  fontsize=10)
    ax1.legend(ncol=3, fontsize=8)

    ax2.plot(d, [r["wavelength"] for r in chosen["rows"]], "k-", label="original")
    ax2.plot(d, [r["wavelength_scaled"] for r in chosen["rows"]], "C3--", lw=2, label=f"{method}")
    ax2.axhline(L, color="C0", ls=":", label=f"L = {L}")
    ax2.axhline(target, color="C1", ls=":", label=f"target = {target}")
    ax2.set_yscale("log")
    ax2.set_ylabel("wavelength (tokens)")
    ax2.set_title("Wavelength per dimension: a wavelength above L never made a full turn in training", fontsize=10)
    ax2.legend(fontsize=9)

    ax3.plot(d, [r["r"] for r in chosen["rows"]], "k-", label="original, within L (seen in training)")
    ax3.plot(d, [r["r"] * factor for r in chosen["rows"]], "k:", label="original, within target (no scaling)")
    ax3.plot(d, [r["turns_target"] for r in chosen["rows"]], "C3--", lw=2, label=f"{method}, within target")
    ax3.axhline(1, color="grey", lw=0.8)
    ax3.set_yscale("log")
    ax3.set_ylabel("full turns")
    ax3.set_xlabel("rotary pair d (high frequency -> low frequency)")
    ax3.set_title("Rotation coverage: turns within L and within the target (below 1, only part of the circle is "
                  "swept);\nwhere the scaled curve meets the solid one, the target shows no angle unseen in training",
                  fontsize=10)
    ax3.legend(fontsize=9)
    # Shade the chosen method's regions in every panel.
    for region, color in (("blended", "gold"), ("interpolated", "C0")):
        idx = [r["index"] for r in chosen["rows"] if r["region"] == region]
        if idx:
            for ax in (ax1, ax2, ax3):
                ax.axvspan(min(idx) - 0.5, max(idx) + 0.5, color=color, alpha=0.08, lw=0)
            ax2.text((min(idx) + max(idx)) / 2, 0.03, f"{method}: {region}", transform=ax2.get_xaxis_transform(),
                     ha="center", fontsize=8, color="0.3")
    for ax in (ax1, ax2, ax3):
        ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    try:
        save_figure(fig, path, tight=False)
    finally:
        plt.close(fig)
    return path
