"""``python -m ropescale inspect``: the per-dimension table, --json, --plot and its errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.rope_cli import main
from ropescale import theory
from ropescale.apply import apply_rope
from ropescale.inspect import format_table, rope_table
from ropescale.methods import ROPE_METHODS
from models.load import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_json_from_the_command_line():
    """The real entry point, as a user runs it: one line of JSON that matches the registry."""
    out = subprocess.run([sys.executable, "-m", "ropescale", "inspect", "--head-dim", "128", "--base", "10000",
                          "--original", "4096", "--method", "yarn", "--factor", "16", "--json"],
                         cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1
    t = json.loads(lines[0])
    inv, scale = ROPE_METHODS["yarn"].fn(128, 1e4, 1.0, 4096, 16.0, {})
    assert t["inv_freq"] == inv.tolist()
    assert t["attention_scale"] == pytest.approx(0.1 * math.log(16) + 1)
    assert t["logit_scale"] == pytest.approx(t["attention_scale"] ** 2)
    assert (t["original_len"], t["target_len"], len(t["rows"])) == (4096, 65536, 64)
    regions = [r["region"] for r in t["rows"]]
    # high frequencies kept, low frequencies interpolated, a blend between, in that order
    assert regions[0] == "extrapolated" and regions[-1] == "interpolated" and "blended" in regions
    assert regions == sorted(regions, key=["extrapolated", "blended", "interpolated"].index)


def test_table_rows_are_consistent():
    t = rope_table(64, 1e5, 8192, "ntk_by_parts", 4.0)
    for r in t["rows"]:
        assert r["r"] == pytest.approx(8192 / r["wavelength"])
        assert r["wavelength_scaled"] == pytest.approx(r["wavelength"] * r["scale"], rel=1e-6)
        assert r["turns_target"] == pytest.approx(4 * r["r"] / r["scale"], rel=1e-6)
        # by-parts: r > beta kept, r < alpha divided by s (section 3.2)
        if r["r"] > 32:
            assert r["region"] == "extrapolated"
        if r["r"] < 1:
            assert r["region"] == "interpolated" and r["turns_target"] == pytest.approx(r["r"], rel=1e-6)
    assert {r["region"] for r in rope_table(64, 1e5, 8192, "linear", 4.0)["rows"]} == {"interpolated"}
    assert {r["region"] for r in rope_table(64, 1e5, 8192, "none", 4.0)["rows"]} == {"extrapolated"}
    ntk = [r["region"] for r in rope_table(64, 1e5, 8192, "ntk_aware", 4.0)["rows"]]
    assert ntk[0] == "extrapolated" and ntk[-1] == "interpolated" and set(ntk[1:-1]) == {"blended"}
    text = format_table(t)
    assert "attention scale 1 " in text and len(text.splitlines()) == 32 + 5  # header, columns, counts, scale, spectrum


def test_dynamic_methods_are_shown_at_the_target_length():
    t = rope_table(64, 1e4, 2048, "dynamic_yarn", 4.0)
    inv, scale = ROPE_METHODS["yarn"].fn(64, 1e4, 1.0, 2048, 4.0, {})
    assert t["inv_freq"] == inv.tolist() and t["attention_scale"] == scale


def test_model_flag_reads_the_config(capsys, tmp_path):
    assert main(["inspect", "--model", "tiny-llama", "--method", "llama3", "--factor", "4", "--json"]) == 0
    t = json.loads(capsys.readouterr().out)
    assert (t["head_dim"], t["base"], t["original_len"], t["method"]) == (32, 1e4, 256, "llama3")
    # Without --method, a scaled model folder shows its own scaling, from its original length.
    apply_rope(load_config("tiny-llama"), "yarn", 8.0, {"beta_fast": 16}).save_pretrained(tmp_path)
    assert main(["inspect", "--model", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("yarn x8: head_dim 32 (rotary 32), base 10000, L 256 -> target 2048")
    assert "'beta_fast': 16" in text


def test_a_per_layer_type_model_is_described_by_its_global_layers(capsys):
    """Gemma 3: inspect reads the full-attention layers' base (1e6) and says the sliding ones keep theirs."""
    assert main(["inspect", "--model", "tiny-gemma3_text", "--method", "yarn", "--factor", "4", "--json"]) == 0
    t = json.loads(capsys.readouterr().out)
    assert t["base"] == 1e6 and "sliding_attention (base 10000) keeps its own" in t["layer_note"]
    assert main(["inspect", "--model", "tiny-llama", "--method", "yarn", "--factor", "4", "--json"]) == 0
    assert "layer_note" not in json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("argv,fragment", [
    (["--head-dim", "64", "--base", "1e4", "--original", "2048", "--method", "yarm", "--factor", "4"],
     "error: unknown RoPE method 'yarm'; did you mean 'yarn'?"),
    (["--head-dim", "64", "--base", "1e4", "--method", "yarn", "--factor", "4"], "error: without --model, give "
                                                                                   "--original"),
    (["--head-dim", "64", "--base", "1e4", "--original", "2048", "--method", "yarn", "--factor", "0.5"],
     "error: factor must be a number >= 1"),
    (["--model", "tiny-llama", "--method", "yarn", "--factor", "2", "--params", "{beta_fast: 16}"],
     "error: --params is not valid JSON"),
    (["--model", "/nonexistent/model", "--method", "yarn", "--factor", "2"], "error: model folder not found"),
    (["--model", "tiny-llama", "--head-dim", "64", "--method", "yarn", "--factor", "2"],
     "error: give either --model or --head-dim"),
])
def test_errors_exit_2_with_one_line(capsys, argv, fragment):
    assert main(["inspect", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(fragment) and err.count("\n") == 1


def test_plot_writes_a_png(tmp_path, capsys):
    out = tmp_path / "rope.png"
    assert main(["inspect", "--head-dim", "128", "--base", "1e4", "--original", "4096", "--method", "yarn",
                 "--factor", "16", "--plot", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1100, 1430)
    assert list(tmp_path.iterdir()) == [out]  # no temporary file left behind
    assert f"plot written to {out}" in capsys.readouterr().out


def test_plot_to_a_missing_folder_fails_cleanly(tmp_path, capsys):
    assert main(["inspect", "--head-dim", "64", "--base", "1e4", "--original", "2048", "--method", "yarn",
                 "--factor", "4", "--plot", str(tmp_path / "no" / "p.png")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_committed_testbed_spectrum_is_printed_from_its_config(capsys):
    """``inspect --model`` reports the model's NTK-by-parts regions, read from its config.json; the testbed's are a
    real model's in miniature (Llama-2/3, Mistral, Qwen3, SmolLM2: 30-41% high, 22-45% low; docs/testbed.md), so
    that NTK-by-parts and YaRN leave the pairs its look-up uses alone, as they do on a real model."""
    cfg = json.loads((Path(__file__).resolve().parents[1] / "models/testbed/config.json").read_text())
    assert main(["inspect", "--model", "models/testbed", "--method", "yarn", "--factor", "4", "--json"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["spectrum"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    base = cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]
    assert got == theory.spectrum(head_dim, base, cfg["max_position_embeddings"])
    assert got["high_share"] >= 0.25 and 0.20 <= got["low_share"] <= 0.45
    assert main(["inspect", "--model", "models/testbed", "--method", "yarn", "--factor", "4"]) == 0
    out = capsys.readouterr().out
    assert f"{got['high_share']:.0%} of pairs turn more than 32 times" in out
    assert f"{got['still']} of {got['pairs']} turn less than a radian across it" in out
