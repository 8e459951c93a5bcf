"""``python -m ropescale tune``: the search spaces keep their constraints (property tests), the per-pair form gives
back PI's, NTK-aware's and YaRN's tables exactly, the evolutionary loop keeps its budget and improves on its seeds,
the exported best reloads in plain transformers with the same table and in a run config, and the command runs on
the committed testbed base end to end."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from configs.schema import load_run_config
from eval.common import load_eval_model
from eval.tune import answer_nll, needle_documents
from launch import tune as tune_report
from launch.rope_cli import main
from models.build import scaled_config
from models.load import load_config
from ropescale.methods import ROPE_METHODS, RopeConfigError
from ropescale.search import PARAM_GENES, Candidate, PairSpace, ParamSpace, Scored, evolve, rank_key, table_key

ROOT = Path(__file__).resolve().parents[1]
NATIVE = json.loads((ROOT / "models/testbed/config.json").read_text())["max_position_embeddings"]
SPACE = dict(head_dim=64, base=1e4, original_len=1024, factor=8.0)


def _table(c: Candidate, space: dict = SPACE) -> tuple[torch.Tensor, float]:
    fn = ROPE_METHODS[c.method].fn
    return fn(space["head_dim"], space["base"], 1.0, space["original_len"], c.factor, dict(c.params),
              seq_len=space["original_len"] * 8)


def _ok_pairs(c: Candidate, space: PairSpace) -> bool:
    lam = c.params["short_factor"]
    return (len(lam) == space.pairs and lam == c.params["long_factor"]
            and all(1.0 <= x <= space.max_lambda for x in lam) and all(x == 1.0 for x in lam[: space.keep])
            and all(a <= b for a, b in zip(lam, lam[1:])) and 1.0 <= c.params["attention_factor"] <= 1.6)


@settings(max_examples=60, deadline=None)
@given(lam=st.lists(st.floats(-5, 100, allow_nan=False), min_size=32, max_size=32), att=st.floats(0, 5),
       keep=st.integers(0, 31), seed=st.integers(0, 10**6))
def test_per_pair_candidates_keep_the_constraints_through_repair_mutation_and_crossover(lam, att, keep, seed):
    space = PairSpace(**SPACE, keep=keep)
    rng = random.Random(seed)
    a = space.candidate(lam, att, "given")
    b = space.mutate(a, rng)
    assert _ok_pairs(a, space) and _ok_pairs(b, space) and _ok_pairs(space.crossover(a, b, rng), space)
    for seed_c in space.seeds():
        assert _ok_pairs(space.mutate(seed_c, rng), space)


@settings(max_examples=60, deadline=None)
@given(method=st.sampled_from(sorted(PARAM_GENES)), units=st.lists(st.floats(-1, 2, allow_nan=False), min_size=4,
                                                                    max_size=4), seed=st.integers(0, 10**6))
def test_method_parameter_candidates_stay_in_range_with_an_ordered_ramp(method, units, seed):
    space = ParamSpace(method, 4.0)
    rng = random.Random(seed)
    for c in (space.candidate(units[: len(space.genes)], "given"),):
        for x in (c, space.mutate(c, rng), space.crossover(c, space.seeds()[0], rng)):
            values = {**x.params, "factor": x.factor}
            for name, lo, hi, _ in space.genes:
                assert lo * (1 - 1e-5) <= values[name] <= hi * (1 + 1e-5), (name, values)
            for lo_name, hi_name in (("alpha", "beta"), ("beta_slow", "beta_fast")):
                if lo_name in values and hi_name in values:
                    assert values[hi_name] >= 2 * values[lo_name] * (1 - 1e-5)
            _table(x)  # the method accepts it


def test_the_method_defaults_are_a_seed_of_their_space():
    c = ParamSpace("yarn", 4.0).seeds()[0]
    assert (c.factor, c.params["beta_slow"], c.params["beta_fast"]) == (4.0, 1.0, 32.0)
    assert c.params["attention_factor"] == pytest.approx(0.1 * math.log(4) + 1, rel=1e-6)


@pytest.mark.parametrize("method", ["linear", "ntk_aware", "ntk_by_parts", "yarn"])
def test_the_per_pair_form_reproduces_each_method_table(method):
    space = PairSpace(**SPACE)
    inv, scale = _table(space.table(method))
    want_inv, want_scale = _table(Candidate(method, SPACE["factor"], {}))
    torch.testing.assert_close(inv, want_inv, rtol=1e-6, atol=0)
    assert scale == pytest.approx(want_scale, rel=1e-9)


def test_the_constraints_are_checked_with_one_line_errors():
    for kw, match in [({"keep": 32}, "--keep must be from 0 to 31"), ({"max_lambda": 2.0}, "--max-lambda must be"),
                      ({"factor": 1.0}, "must be above 1")]:
        with pytest.raises(RopeConfigError, match=match):
            PairSpace(**{**SPACE, **kw})
    with pytest.raises(RopeConfigError, match="searches ntk_aware, ntk_by_parts, yarn"):
        ParamSpace("linear", 4.0)
    for budget, parents in ((0, 2), (10, 8)):
        with pytest.raises(RopeConfigError, match="budget >= 1"):
            evolve(PairSpace(**SPACE), lambda c: {"value": 0, "feasible": True}, budget, population=8, parents=parents)


def test_the_search_keeps_its_budget_scores_each_candidate_once_and_beats_its_seeds():
    space = PairSpace(**SPACE)
    ideal = torch.linspace(1.0, 6.0, space.pairs)  # a table no seed is: the search must move towards it
    calls = []

    def objective(c: Candidate) -> dict:
        calls.append(c.key)
        err = float((torch.tensor(c.params["short_factor"]) - ideal).abs().mean())
        return {"value": err, "feasible": c.params["attention_factor"] < 1.3}

    history = evolve(space, objective, budget=60, seed=1)
    assert len(history) == len(calls) == len(set(calls)) == 60
    seeds = [h for h in history if h.candidate.origin in ("linear", "ntk_aware", "yarn")]
    best = min(history, key=rank_key)
    assert best.score["feasible"] and best.score["value"] < min(h.score["value"] for h in seeds) - 0.05
    again = evolve(space, objective, budget=60, seed=1)
    assert [h.candidate.key for h in again] == [h.candidate.key for h in history]  # seeded: reproducible


def test_a_table_is_scored_once_however_many_parameter_sets_make_it():
    """YaRN's ramp ends are whole pairs (floored and ceiled), so nearby betas make one table; with ``identity`` the
    search spends no forward pass on a table it has scored (SmolLM2's RoPE at 16k: head_dim 64, base 1e5, L 8,192)."""
    def tables(identity=None) -> list[str]:
        history = evolve(ParamSpace("yarn", 2.0), lambda c: {"value": c.params["beta_fast"], "feasible": True},
                         budget=24, population=6, parents=3, seed=0, identity=identity)
        return [table_key(h.candidate, 64, 1e5, 8192) for h in history]

    by_params = tables()
    assert len(set(by_params)) < len(by_params)  # parameter sets repeat tables
    by_table = tables(lambda c: table_key(c, 64, 1e5, 8192))
    assert len(set(by_table)) == len(by_table) == 24
    yarn = Candidate("yarn", 2.0, {"beta_slow": 1.0, "beta_fast": 32.0, "attention_factor": 1.06931})
    inv, scale = ROPE_METHODS["yarn"].fn(64, 1e5, 1.0, 8192, 2.0, dict(yarn.params))
    assert json.loads(table_key(yarn, 64, 1e5, 8192)) == pytest.approx(inv.tolist() + [scale], rel=1e-6)


def test_the_export_reloads_in_plain_transformers_with_the_same_table_and_in_a_run_config(tmp_path):
    space = PairSpace(**SPACE, keep=4)
    c = space.mutate(space.table("yarn"), random.Random(3))
    model = {"head_dim": 64, "base": 1e4, "original_len": 1024, "partial_rotary_factor": 1.0}
    ex = tune_report.exports(c, model)
    cfg = {"model_type": "llama", "hidden_size": 256, "num_attention_heads": 4, "head_dim": 64,
           "num_hidden_layers": 1, "intermediate_size": 64, "vocab_size": 32,
           "max_position_embeddings": ex["max_position_embeddings"], "rope_parameters": ex["rope_parameters"]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    rotary = LlamaRotaryEmbedding(AutoConfig.from_pretrained(tmp_path))  # no project code loads it
    x = torch.zeros(1, 1, 64)
    pos = torch.tensor([[8000]])  # beyond L: the long factors
    cos, _ = rotary(x, pos)
    inv, scale = _table(c)
    want = torch.cat([torch.cos(8000 * inv.double())] * 2).float() * scale
    torch.testing.assert_close(cos[0, 0], want, rtol=2e-4, atol=2e-4)
    assert rotary.attention_scaling == pytest.approx(scale)


def test_the_run_config_fragment_loads_and_scales_a_model_as_train_py_does(tmp_path):
    """rope.yaml replaces a config's rope: section; the model config train.py builds from it carries the table."""
    base = load_config("tiny-llama")  # head_dim 32, base 1e4, L = 256
    space = PairSpace(32, 1e4, 256, 4.0)
    c = space.mutate(space.table("ntk_by_parts"), random.Random(5))
    (tmp_path / "rope.yaml").write_text(tune_report.rope_yaml(tune_report.exports(c, {
        "head_dim": 32, "base": 1e4, "original_len": 256, "partial_rotary_factor": 1.0})["rope"]))
    raw = yaml.safe_load((ROOT / "configs/cpu_tiny.yaml").read_text())
    raw.update(yaml.safe_load((tmp_path / "rope.yaml").read_text()))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_run_config(tmp_path / "run.yaml")
    assert (cfg.rope.method, cfg.rope.params["short_factor"]) == ("longrope", c.params["short_factor"])
    config = scaled_config("tiny-llama", cfg.rope.method, cfg.rope.factor, cfg.rope.params, base=base)
    assert config.rope_parameters["rope_type"] == "longrope"
    assert config.rope_parameters["long_factor"] == pytest.approx(c.params["short_factor"])


def test_bad_settings_are_one_line_errors(capsys, tmp_path):
    for argv, msg in [(["--budget", "0"], "--budget must be from 1"),
                      (["--parents", "8"], "--parents must be from 1 to 7"),
                      (["--space", "params", "--keep", "2"], "--keep is not used by --space params"),
                      (["--out", str(tmp_path / "f")], "is a file"),
                      (["--space", "params", "--factor", "3"], "--factor is not used by --space params"),
                      (["--windows", "1", "--budget", "1", "--objective", "mixed"], "less than one candidate's 5"),
                      (["--target", "100"], "must be above the original length")]:
        (tmp_path / "f").write_text("a file, not a folder")
        args = ["tune", "--model", "models/testbed", "--target", str(4 * NATIVE), *argv]
        assert main(args) == 2, argv
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and msg in err[0], (argv, err)
    assert [p.name for p in tmp_path.iterdir()] == ["f"] and (tmp_path / "f").read_text() == "a file, not a folder"


@pytest.mark.slow
def test_tune_on_the_testbed_writes_the_report_and_the_exports(tmp_path, capsys):
    """A small search on the committed base: every file, the report text's stretch after the search's, the best
    at least as good as every seed on the search text, and its rope_parameters as the run config writes them."""
    out = tmp_path / "tune"
    assert main(["tune", "--model", "models/testbed", "--target", str(2 * NATIVE), "--budget", "10", "--windows", "1",
                 "--report-windows", "1", "--population", "4", "--parents", "2", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {p.name for p in out.iterdir()} == {"tune.md", "tune.json", "rope.yaml", "rope_parameters.json",
                                               "search.png", "factors.png", "coverage.png"}
    s = result["search"]
    assert s["scored"] == 10 and s["forwards"] == 10 and s["stretches"]["search"][1] <= s["stretches"]["report"][0]
    seeds = [h for h in result["history"] if h["origin"] in ("linear", "ntk_aware", "yarn")]
    assert len(seeds) == 3 and all(result["best"]["score"]["feasible"] >= h["score"]["feasible"] for h in seeds)
    feasible = [h["score"]["value"] for h in result["history"] if h["score"]["feasible"] == result["best"]["score"][
        "feasible"]]
    assert result["best"]["score"]["value"] == min(feasible)
    assert json.loads((out / "rope_parameters.json").read_text()) == result["export"]["rope_parameters"]
    assert result["export"]["max_position_embeddings"] == 2 * NATIVE
    names = [r["name"] for r in result["comparison"]]
    assert names == ["linear (default)", "ntk_aware (default)", "ntk_by_parts (default)", "yarn (default)",
                     "tuned (longrope)", "none (unscaled)"]


def test_ntk_aware_searches_s_alone_and_non_finite_scores_rank_last():
    space = ParamSpace("ntk_aware", 4.0)  # alpha * s is all its table sees: only s is searched
    assert [g[0] for g in space.genes] == ["factor"] and space.seeds()[0].params == {"alpha": 1.0}
    assert [g[0] for g in ParamSpace("ntk_aware", 4.0, search_factor=False).genes] == ["alpha"]
    c = space.seeds()[0]
    scored = [Scored(c, {"value": v, "feasible": True}, 0) for v in (float("nan"), 3.0, float("inf"))]
    assert min(scored, key=rank_key).score["value"] == 3.0
    big = PairSpace(64, 1e4, 1024, 1000.0)  # YaRN's own temperature (1.69) stays reachable at s = 1000
    assert big.table("yarn").params["attention_factor"] == pytest.approx(0.1 * math.log(1000) + 1)


def test_the_needle_loss_scores_exactly_the_answer_tokens():
    em = load_eval_model("models/testbed", {})
    docs = needle_documents(em.tokenizer, 2 * NATIVE, depths=(0.5,))
    ids, start = docs[0]
    assert ids.numel() <= 2 * NATIVE
    assert em.tokenizer.decode(ids[start:]).strip().rstrip(".").isdigit()  # the key, then its full stop
    with torch.inference_mode():
        logits = em.model(ids[None]).logits[0].double()
        want = torch.nn.functional.cross_entropy(logits[start - 1:-1], ids[start:]).item()
        assert answer_nll(em.model, docs) == pytest.approx(want, rel=1e-5)
