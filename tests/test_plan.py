"""``python -m ropescale plan --theory-only``: the report on disk, the JSON line, and bad input as one error line."""

import json

import pytest

from ropescale import plan
from ropescale.__main__ import main

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
    import torch

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
    ([*SMALL, "--target", "1024"], "error: plan: the measured part"),
])
def test_bad_input_is_one_error_line(argv, fragment, capsys):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(fragment), err
