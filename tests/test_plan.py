"""``python -m ropescale plan --theory-only``: the report on disk, the JSON line, and bad input as one error line."""

import json

import pytest
import torch

from ropescale import plan
from launch.rope_cli import main

SMALL = ["--head-dim", "32", "--base", "10000", "--original", "256"]


def test_theory_plan_writes_the_report_and_prints_json(tmp_path, capsys):
    out = tmp_path / "plan"
    assert main(["plan", *SMALL, "--target", "1024", "--theory-only", "--out", str(out), "--json"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    result = json.loads(printed[-1])
    # by hand: 2 ceil(16 log_1e4(256 / 2 pi)) = 2 ceil(6.44) = 14
    assert result["model"]["nominal_factor"] == 4 and result["model"]["critical_dim"] == 14
    # the default grid: 4 methods x (1, 1.25, 1.5, 2) x nominal
    got = {(c["method"], c["factor"]) for c in result["candidates"]}
    assert got == {(m, f) for m in plan.DEFAULT_METHODS for f in (4.0, 5.0, 6.0, 8.0)}
    ntk = next(c for c in result["candidates"] if c["method"] == "ntk_aware" and c["factor"] == 4.0)
    assert ntk["out_of_bound"] > 0 and ntk["factor_for_target"] > 4
    bound = result["model"]["base_lower_bound"]
    assert bound is not None and bound > 100
    for name in ("plan.md", "plan.json", "coverage.png", "kernel.png"):
        assert (out / name).stat().st_size > 0
    md = (out / "plan.md").read_text()
    assert "python -m ropescale plan" in md and "| ntk_aware | 4 |" in md
    assert json.loads((out / "plan.json").read_text())["candidates"][0]["rows"]


def test_binned_kernel_is_one_near_zero_and_covers_the_target():
    theta = 10000.0 ** (-torch.arange(0, 32, 2, dtype=torch.float64) / 32)
    centers, k = plan.binned_kernel(theta, 1000, bins=20)
    assert centers[0] == 1 and centers[-1] > 500 and len(centers) == len(k) <= 20
    assert k[0] == pytest.approx(float(torch.cos(theta).mean())) and k[-1] < k[0]


@pytest.mark.parametrize("argv,fragment", [
    ([*SMALL, "--target", "128", "--theory-only"], "error: --target 128 is below the original length 256"),
    ([*SMALL, "--target", "1024", "--theory-only", "--methods", "yarm"], "error: unknown RoPE method 'yarm'"),
    ([*SMALL, "--target", "1024", "--theory-only", "--methods", "longrope"], "error: method 'longrope' needs"),
    ([*SMALL, "--target", "1024", "--theory-only", "--factors", "2,x"], "error: --factors must be comma-separated"),
    ([*SMALL, "--target", "1024", "--theory-only", "--factors", "0.5"], "error: --factors must be numbers from 1"),
    (["--head-dim", "31", "--base", "1e4", "--original", "256", "--target", "1024", "--theory-only"],
     "error: --head-dim must be an even number"),
    ([*SMALL, "--target", "1024"], "error: plan: the measured part scores a model: give --model"),
    ([*SMALL, "--target", "1024", "--theory-only", "--sweep-base", "x.yaml"], "error: plan: --sweep-base needs"),
])
def test_bad_input_is_one_error_line(argv, fragment, capsys):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(fragment), err


# --- the measured part ---------------------------------------------------------------------------------------------


def _curve(levels: list[float], per: int) -> torch.Tensor:
    return torch.cat([torch.full((per,), v, dtype=torch.float64) for v in levels])[1:]


def test_summarize_by_hand():
    from eval.candidates import summarize

    # 8 buckets of 32 positions, L = 64: the reference settles at 3.0 in its second half
    ref = summarize(_curve([5.0, 3.0, 3.0, 3.0, 3.5, 4.0, 5.0, 6.0], 32), 64, None, 0.1, 8)
    assert ref["reference_loss"] == pytest.approx(3.0) and ref["native_cost"] == 0
    assert ref["effective_context"] == 128  # the first bucket past L above 3.1 starts at 128 (loss 3.5)
    good = summarize(_curve([5.2, 3.05, 3.0, 3.0, 3.0, 3.05, 3.0, 3.0], 32), 64, ref, 0.1, 8)
    assert good["effective_context"] == 256  # never above 3.1 past L: the whole window
    assert good["native_cost"] == pytest.approx(((5.2 * 31 + 3.05 * 32) / 63) - ((5.0 * 31 + 3.0 * 32) / 63))


def test_recommend_keeps_the_native_window_and_ranks_by_target_loss():
    from eval.candidates import recommend

    rows = [dict(method="none", factor=1.0, target_nll=9.0, native_cost=0.0, effective_context=64),
            dict(method="yarn", factor=2.0, target_nll=3.2, native_cost=0.02, effective_context=256),
            dict(method="yarn", factor=3.0, target_nll=3.1, native_cost=0.2, effective_context=256),  # too costly
            dict(method="linear", factor=2.0, target_nll=3.5, native_cost=0.3, effective_context=128),
            dict(method="linear", factor=3.0, target_nll=3.6, native_cost=0.4, effective_context=128)]
    rec = recommend(rows, native_tolerance=0.05)
    assert [(r["rank"], r["method"], r["factor"]) for r in rec] == [(1, "yarn", 2.0), (2, "linear", 2.0)]
    assert "native cost +0.0200" in rec[0]["why"]


def test_measured_plan_on_a_tiny_model_writes_a_loadable_sweep(tmp_path, capsys):
    from launch.sweep import load_sweep

    out = tmp_path / "plan"
    argv = ["plan", "--model", "tiny-llama", "--target", "512", "--methods", "linear,yarn", "--factors", "2,3",
            "--no-base-bound", "--buckets", "4", "--out", str(out), "--sweep-base", "configs/cpu_tiny.yaml",
            "--search", "grid", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = result["measured"]["rows"]
    assert [(r["method"], r["factor"]) for r in rows] == [("none", 1.0), ("linear", 2.0), ("linear", 3.0),
                                                          ("yarn", 2.0), ("yarn", 3.0)]
    assert all(len(r["buckets"]) == 4 and r["buckets"][-1]["end"] == 512 for r in rows)
    assert {r["method"] for r in result["recommendation"]} == {"linear", "yarn"}
    assert (out / "loss_by_position.png").stat().st_size > 0
    assert "## Measured" in (out / "plan.md").read_text()
    sweep = load_sweep(out / "sweep.yaml")
    picks = [[r["method"], r["factor"]] for r in result["recommendation"]]
    assert sweep.base == "configs/cpu_tiny.yaml" and list(sweep.grid.values()) == [picks]


def test_scan_stops_each_method_at_the_first_rise(capsys):
    factors = (2.0, 3.0, 4.0, 6.0)
    argv = ["plan", "--model", "tiny-llama", "--target", "512", "--methods", "linear,yarn,ntk_aware", "--factors",
            ",".join(map(str, factors)), "--no-base-bound", "--buckets", "4", "--json"]
    assert main(argv) == 0
    measured = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["measured"]
    assert measured["search"] == "scan" and measured["rows"][0]["method"] == "none"
    for method in ("linear", "yarn", "ntk_aware"):
        scored = [r for r in measured["rows"] if r["method"] == method]
        skipped = [s["factor"] for s in measured["skipped"] if s["method"] == method]
        # the scored factors are the smallest ones, in order; the rest were skipped, none lost or scored twice
        assert [r["factor"] for r in scored] + skipped == list(factors)
        losses = [r["target_nll"] for r in scored]
        # a method stops exactly at its first rise: before it, every loss was a new best
        assert all(losses[k] <= min(losses[:k]) for k in range(1, len(losses) - 1))
        if skipped:
            assert losses[-1] > min(losses[:-1])
        else:
            assert all(losses[k] <= min(losses[:k]) for k in range(1, len(losses)))
    assert measured["skipped"], "the tiny model's losses rise somewhere: the scan path must be exercised"


def test_a_model_without_rope_is_one_error_line(tmp_path, capsys):
    from transformers import GPT2Config

    GPT2Config(n_layer=1).save_pretrained(tmp_path)
    assert main(["plan", "--model", str(tmp_path), "--target", "4096", "--theory-only"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not use rotary position embeddings" in err[0]
