"""The report and the exports of ``python -m ropescale tune``: ``tune.md``, ``tune.json``, the search curve, the tuned
per-pair factors against the methods' tables and the angle coverage, the best candidate as a run-config fragment
(``rope.yaml``) and as transformers' ``rope_parameters`` (``rope_parameters.json``). The numbers come from
``ropescale.search`` and ``eval.tune``; this module only writes them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import yaml

from launch.plan import plot_coverage
from ropescale.apply import longrope_form, native_rope_parameters
from ropescale.methods import rotary_dim
from ropescale.search import Candidate, Scored, best_per_generation, rank_key
from ropescale.theory import dimension_rows
from utils.files import save_figure, write_atomic, write_json

TUNED = "tuned"


def exports(c: Candidate, model: dict) -> dict:
    """The candidate as ``rope:`` of a run config and as transformers' ``rope_parameters`` (with the
    ``max_position_embeddings`` that goes with it), for the model described by ``model`` (``head_dim``, ``base``,
    ``original_len``, ``partial_rotary_factor``)."""
    prf = model["partial_rotary_factor"]
    rp, max_pos = native_rope_parameters(c.method, c.factor, dict(c.params), model["original_len"], model["base"],
                                         model["head_dim"], None if prf == 1.0 else prf)
    return {"rope": {"method": c.method, "factor": c.factor, "params": dict(c.params)},
            "rope_parameters": rp, "max_position_embeddings": max_pos}


def pair_factors(c: Candidate, model: dict) -> list[float]:
    """Per-pair divisors lambda_d of any static candidate (the method's table in LongRoPE's form)."""
    if c.method == "longrope":
        return list(c.params["short_factor"])
    dim = rotary_dim(model["head_dim"], model["partial_rotary_factor"])
    return longrope_form(c.method, c.factor, dict(c.params), model["original_len"], model["base"],
                         dim)["short_factor"]


def rope_yaml(rope: dict) -> str:
    """``rope:`` of a run config, each list on one line (a config's section as it is)."""
    return yaml.safe_dump({"rope": rope}, sort_keys=False, default_flow_style=None, width=10**9)


def markdown(result: dict, command: str) -> str:
    m, s = result["model"], result["search"]
    best = result["best"]
    lines = [f"# RoPE tune: L = {m['original_len']:,} -> target {m['target']:,} ({s['space']} space"
             + (f", {s['method']}" if s["space"] == "params" else "") + f", objective {s['objective']})", "",
             f"`{command}`", "",
             f"- model `{m['model']}`: rotary dim {m['rotary_dim']}, base {m['base']:g}, L = {m['original_len']:,}",
             f"- held-out text: {result['data']}; search on tokens {s['stretches']['search'][0]:,}-"
             f"{s['stretches']['search'][1]:,} ({s['windows']} window(s) of {m['target']:,}), the report below on "
             f"tokens {s['stretches']['report'][0]:,}-{s['stretches']['report'][1]:,} ({s['report_windows']} "
             "window(s)): text the search never scored",
             f"- {s['scored']} candidates scored, {s['forwards']} forward passes, {s['seconds']:.0f} s "
             f"({s['dtype']}); feasible: native cost <= {s['native_tolerance']:g} nats",
             "", "## The best against each method at its published parameters (report text)", "",
             "| candidate | s | loss at target | ppl at target | native cost (nats) |", "|---|---|---|---|---|"]
    for r in result["comparison"]:
        lines.append(f"| {r['name']} | {r['factor']:g} | {r['target_nll']:.4f} | {math.exp(r['target_nll']):.3f} | "
                     f"{r['native_cost']:+.4f} |")
    over = "" if best["score"]["feasible"] else (f"; **over the native-cost limit** (no candidate kept it within "
                                                 f"{s['native_tolerance']:g} nats)")
    lines += ["", "## The best candidate", "", f"origin: {best['origin']}, generation {best['generation']}; search "
              f"objective {best['score']['value']:.4f}{over}", "", "As a run config (`rope.yaml`):", "", "```yaml",
              rope_yaml(result["export"]["rope"]).strip(), "```", "",
              "As transformers' `rope_parameters` (`rope_parameters.json`, with max_position_embeddings "
              f"{result['export']['max_position_embeddings']:,}).", "",
              "## Search curve", "", "| generation | scored | best objective | feasible | made by |",
              "|---|---|---|---|---|"]
    lines += [f"| {g['generation']} | {g['scored']} | {g['value']:.4f} | {g['feasible']} | {g['origin']} |"
              for g in result["curve"]]
    lines += ["", "![search curve](search.png)", "", "![per-pair factors](factors.png)", "",
              "![angle coverage](coverage.png)", ""]
    return "\n".join(lines)


def _axes():
    """One figure with one axes, matplotlib imported on first use (the command's other paths draw nothing)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 5), layout="constrained")
    return fig, fig.subplots()


def _finish(fig, ax, path: Path) -> Path:
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return path


def plot_search(history: list[dict], path: Path) -> Path:
    """Every scored candidate's objective in order, feasible or not, and the best so far."""
    fig, ax = _axes()
    xs = range(1, len(history) + 1)
    vals = [h["score"]["value"] for h in history]
    ok = [h["score"]["feasible"] for h in history]
    ax.plot([x for x, f in zip(xs, ok) if f], [v for v, f in zip(vals, ok) if f], "o", ms=4, label="feasible")
    ax.plot([x for x, f in zip(xs, ok) if not f], [v for v, f in zip(vals, ok) if not f], "x", ms=5, color="grey",
            label="over the native cost")
    best, run = math.inf, []
    for v, f in zip(vals, ok):
        best = min(best, v) if f else best
        run.append(best)
    ax.step(list(xs), run, "k-", where="post", label="best feasible so far")
    ax.set_xlabel("candidates scored")
    ax.set_ylabel("objective (nats; lower is better)")
    return _finish(fig, ax, path)


def plot_factors(result: dict, path: Path) -> Path:
    """The best candidate's per-pair divisors against the methods' tables, by wavelength / L; the NTK-by-parts
    region ends (r = 32 and r = 1 turns within L) marked."""
    m = result["model"]
    wave = [2 * math.pi * m["base"] ** (2 * d / m["rotary_dim"]) / m["original_len"]
            for d in range(m["rotary_dim"] // 2)]
    fig, ax = _axes()
    for k, (name, lam) in enumerate(result["tables"].items()):
        ax.plot(wave, lam, "-" if name == TUNED else "--", lw=2.5 if name == TUNED else 1.2,
                color="k" if name == TUNED else f"C{k}", label=name)
    for turns in (32, 1):
        ax.axvline(1 / turns, color="grey", ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("wavelength / L (dotted: 32 turns and 1 turn within L)")
    ax.set_ylabel("divisor lambda_d of theta_d (1 = kept, s = PI)")
    return _finish(fig, ax, path)


def coverage_plan(result: dict) -> dict:
    """The tuned candidate and the defaults in ``launch.plan.plot_coverage``'s form (per-pair coverage rows)."""
    m = result["model"]
    theta = m["base"] ** (-torch.arange(0, m["rotary_dim"], 2, dtype=torch.float64) / m["rotary_dim"])
    cands = []
    for name, lam in result["tables"].items():
        factor = result["best"]["factor"] if name == TUNED else result["search"]["factor"]
        cands.append({"method": name, "factor": factor,
                      "rows": dimension_rows(theta, theta / torch.tensor(lam, dtype=torch.float64),
                                             m["original_len"], m["target"])})
    return {"model": m, "candidates": cands}


def write_report(result: dict, out: Path, command: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "tune.json", {"command": command, **result})
    write_atomic(out / "rope.yaml", rope_yaml(result["export"]["rope"]))
    write_atomic(out / "rope_parameters.json", json.dumps(result["export"]["rope_parameters"], indent=2) + "\n")
    plot_search(result["history"], out / "search.png")
    plot_factors(result, out / "factors.png")
    plot_coverage(coverage_plan(result), out / "coverage.png")
    write_atomic(out / "tune.md", markdown(result, command))
    return out


def assemble(model: dict, data: str, search: dict, history: list[Scored], comparison: list[dict],
             defaults: list[Candidate]) -> dict:
    """The JSON-able result: the model, the search settings and totals, every scored candidate, the curve, the best,
    its exports, the comparison rows and the per-pair tables (tuned and defaults)."""
    best = min(history, key=rank_key)
    tables = {f"{c.method} (default)": pair_factors(c, model) for c in defaults
              if c.method in ("linear", "ntk_aware", "ntk_by_parts", "yarn")}
    tables[TUNED] = pair_factors(best.candidate, model)
    return {
        "model": model, "data": data, "search": search,
        "history": [{"generation": h.generation, "origin": h.candidate.origin, "method": h.candidate.method,
                     "factor": h.candidate.factor, "params": h.candidate.params, "score": h.score} for h in history],
        "curve": best_per_generation(history),
        "best": {"generation": best.generation, "origin": best.candidate.origin, "score": best.score,
                 "method": best.candidate.method, "factor": best.candidate.factor, "params": best.candidate.params},
        "export": exports(best.candidate, model), "comparison": comparison, "tables": tables,
    }
