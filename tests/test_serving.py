"""The serving handoff without the engines (tests/test_serving_engines.py runs transformers 4.57 and llama.cpp for
real): the legacy keys an export writes, the refusal of a stale copy, the `export` command, the GGUF writer's
refusals and its tensor layout (read back by transformers' own GGUF reader), and what vLLM 0.34 and SGLang 0.5.23
compute of an exported config.json, emulated here from their code (they need CUDA builds and cannot run here): the
keys each takes and its formulas, written in this file from the files docs/serving.md cites. Every verdict
``ropescale.serving.compatibility`` gives them is checked against that emulation, and docs/serving.md's matrix
against ``compatibility``."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from models.gguf_export import write_gguf
from models.load import ModelLoadError, load_config, load_model, tiny_tokenizer
from launch.rope_cli import main
from ropescale.apply import apply_rope, head_dim_of
from ropescale.methods import ROPE_METHODS, RopeConfigError
from ropescale.serving import EXACT, LOADERS, check_legacy_keys, compatibility, serving_config, write_serving_files

ROOT = Path(__file__).resolve().parents[1]
S = 4.0


def longrope_params(config) -> dict:
    n = head_dim_of(config) // 2
    return {"short_factor": [1.0 + 0.02 * i for i in range(n)], "long_factor": [1.0 + 0.6 * i for i in range(n)]}


# (label, method, params): every method apply_rope writes, and the yarn forms whose attention scale differs.
def cases(config) -> list[tuple[str, str, dict]]:
    return [
        ("linear", "linear", {}), ("ntk_aware", "ntk_aware", {}), ("theta", "theta", {"rope_theta": 5e5}),
        ("ntk_by_parts", "ntk_by_parts", {}), ("ntk_by_parts a2 b16", "ntk_by_parts", {"alpha": 2, "beta": 16}),
        ("yarn", "yarn", {}), ("yarn attention_factor 0.8", "yarn", {"attention_factor": 0.8}),
        ("yarn mscale pair", "yarn", {"mscale": 0.707, "mscale_all_dim": 1.0}),
        ("yarn beta 16/2 no truncate", "yarn", {"beta_fast": 16, "beta_slow": 2, "truncate": False}),
        ("llama3", "llama3", {}), ("dynamic_ntk", "dynamic_ntk", {}), ("dynamic_yarn", "dynamic_yarn", {}),
        ("longrope", "longrope", longrope_params(config)),
        ("longrope attention_factor 1.2", "longrope", {**longrope_params(config), "attention_factor": 1.2}),
    ]


def exported(tmp_path: Path, preset: str, method: str, params: dict) -> tuple[Path, object]:
    """A config folder as an export leaves it: save_pretrained, then the serving files."""
    config = apply_rope(load_config(preset), method, S, params)
    folder = tmp_path / f"{preset}-{method}"
    config.save_pretrained(folder)
    write_serving_files(folder, config)
    return folder, config


# --- the servers' reading, from their code (docs/serving.md: the files and lines) ------------------------------


def default_inv(dim: int, base: float) -> torch.Tensor:
    return 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def yarn_inv(dim, base, s, L, beta_fast, beta_slow, truncate) -> torch.Tensor:
    """vLLM common.py yarn_find_correction_range / yarn_scaling_rope.py _compute_inv_freq; SGLang yarn.py (the same
    math): the correction range from the rotations, floor/ceil only with truncate, a linear ramp between."""
    def dim_of(rotations):
        return dim * math.log(L / (rotations * 2 * math.pi)) / (2 * math.log(base))
    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp
    theta = default_inv(dim, base)
    return theta / s * (1 - keep) + theta * keep


def get_mscale(s: float, m: float = 1.0) -> float:
    return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0


def llama3_inv(dim, base, s, L, low, high) -> torch.Tensor:
    """Both servers' llama3 type (vLLM llama3_rope.py, SGLang rope_variant.py): Meta's published rule."""
    inv = default_inv(dim, base)
    wavelen = 2 * math.pi / inv
    smooth = ((L / wavelen - low) / (high - low)).clamp(0, 1)
    out = (1 - smooth) * inv / s + smooth * inv
    out = torch.where(wavelen < L / high, inv, out)
    return torch.where(wavelen > L / low, inv / s, out)


def served(server: str, rp: dict, max_pos: int, dim: int, n: int) -> tuple[torch.Tensor, float]:
    """(inv_freq, cos/sin multiplier) that ``server`` uses at a sequence of ``n`` tokens for the rope dict ``rp``
    (what it reads from config.json) of a model with ``max_position_embeddings`` ``max_pos``."""
    kind, base = rp.get("rope_type", rp.get("type", "default")), float(rp["rope_theta"])
    s = float(rp.get("factor", 1.0))
    if kind == "default":
        return default_inv(dim, base), 1.0
    if kind == "linear":
        return default_inv(dim, base) / s, 1.0
    if kind == "dynamic":
        if server == "vllm":  # dynamic_ntk_scaling_rope.py: b ((s L / L) - (s - 1))^(d/(d-2)) = b
            return default_inv(dim, base), 1.0
        # SGLang rope_variant.py: once, at max_len = s L: b ((s max_len / L) - (s - 1))^(d/(d-2))
        return default_inv(dim, base * (s * s - (s - 1)) ** (dim / (dim - 2))), 1.0
    L = int(rp.get("original_max_position_embeddings", max_pos))
    if kind == "yarn":
        inv = yarn_inv(dim, base, s, L, rp.get("beta_fast", 32), rp.get("beta_slow", 1), rp.get("truncate", True))
        if server == "vllm":  # yarn_scaling_rope.py: attention_factor, else the mscale pair, else 0.1 ln s + 1
            if rp.get("attention_factor") is not None:
                return inv, float(rp["attention_factor"])
            if rp.get("mscale") and rp.get("mscale_all_dim"):
                return inv, get_mscale(s, rp["mscale"]) / get_mscale(s, rp["mscale_all_dim"])
            return inv, get_mscale(s)
        # SGLang yarn.py: (the mscale pair's ratio, else 0.1 ln s + 1) * attn_factor; attention_factor never read
        if rp.get("mscale") is not None and rp.get("mscale_all_dim") is not None:
            m = get_mscale(s, rp["mscale"]) / get_mscale(s, rp["mscale_all_dim"])
        else:
            m = get_mscale(s)
        return inv, m * rp.get("attn_factor", 1.0)
    if kind == "llama3":
        return llama3_inv(dim, base, s, L, rp["low_freq_factor"], rp["high_freq_factor"]), 1.0
    if kind == "longrope":
        # vLLM phi3_long_rope_scaled_rope.py: the long factors for every length once max_model_len (here the
        # target) exceeds L; SGLang rope_variant.py: per batch, long above L. Neither reads attention_factor.
        long = n > L if server == "sglang" else max_pos > L
        ext = torch.tensor(rp["long_factor" if long else "short_factor"], dtype=torch.float64)
        scale = max_pos / L
        return default_inv(dim, base) / ext, math.sqrt(1 + math.log(scale) / math.log(L)) if scale > 1 else 1.0
    raise AssertionError(f"no emulation for rope type {kind}")


def ours(config, method: str, params: dict, n: int) -> tuple[torch.Tensor, float]:
    p = {**ROPE_METHODS[method].defaults, **params}
    L = int(config.ropescale["original_max_position_embeddings"])
    return ROPE_METHODS[method].fn(head_dim_of(config), 1e4, 1.0, L, S, p, seq_len=n)


def readings(folder: Path) -> dict[str, dict]:
    """The rope dict a server gets from config.json: through transformers 5 (which takes rope_scaling over
    rope_parameters) and through transformers 4 (rope_scaling plus the top-level rope_theta)."""
    raw = json.loads((folder / "config.json").read_text())
    legacy = {"rope_type": "default"} if raw.get("rope_scaling") is None else dict(raw["rope_scaling"])
    legacy["rope_theta"] = raw["rope_theta"]
    if "original_max_position_embeddings" in raw:  # SGLang models/llama.py, transformers 4.57 longrope
        legacy.setdefault("original_max_position_embeddings", raw["original_max_position_embeddings"])
    return {"with transformers 5": dict(AutoConfig.from_pretrained(folder).rope_parameters),
            "with transformers 4": legacy}


@pytest.mark.parametrize("server", ["vllm", "sglang"])
def test_server_verdicts_match_what_their_code_computes(tmp_path, server):
    """``compatibility`` says exact for vLLM / SGLang exactly when their math on our exported config.json gives our
    inv_freq (rel 1e-6) and attention scale at the original length and at the target; the methods it calls exact
    include NTK-by-parts and YaRN with an explicit attention factor (served right only through attn_factor)."""
    base = load_config("tiny-llama")
    exact = []
    for label, method, params in cases(base):
        folder, config = exported(tmp_path / re.sub(r"\W+", "_", label), "tiny-llama", method, params)
        verdict = {v.loader: v for v in compatibility(config)}[server]
        L = 256
        for how, rp in readings(folder).items():
            agree = True
            for n in (L, int(S * L)):
                inv, scale = ours(config, method, params, n)
                s_inv, s_scale = served(server, rp, config.max_position_embeddings, head_dim_of(config), n)
                rel = ((inv.double() - s_inv) / s_inv).abs().max().item()
                agree &= rel < 1e-6 and math.isclose(scale, s_scale, rel_tol=1e-6)
            assert agree == (verdict.status == EXACT), (label, how, verdict)
        if verdict.status == EXACT:
            exact.append(label)
    assert {"ntk_by_parts", "yarn attention_factor 0.8", "yarn", "linear", "llama3"} <= set(exact), exact


def test_by_parts_export_carries_the_attention_key_servers_read(tmp_path):
    """NTK-by-parts is transformers' yarn type with attention_factor 1; SGLang multiplies its own 0.1 ln s + 1 by
    attn_factor, so the export writes attn_factor = 1 / (0.1 ln s + 1) in both rope dicts (and nothing else
    differs between them)."""
    folder, config = exported(tmp_path, "tiny-llama", "ntk_by_parts", {})
    raw = json.loads((folder / "config.json").read_text())
    want = 1 / (0.1 * math.log(S) + 1)
    assert raw["rope_parameters"]["attn_factor"] == pytest.approx(want)
    assert raw["rope_scaling"] == {k: v for k, v in raw["rope_parameters"].items() if k != "rope_theta"}
    assert raw["rope_theta"] == raw["rope_parameters"]["rope_theta"] == 1e4
    _, scale = served("sglang", readings(folder)["with transformers 4"], config.max_position_embeddings, 32, 1024)
    assert scale == pytest.approx(1.0)
    assert "attn_factor" in (folder / "SERVING.md").read_text()


def test_serving_config_keys_per_method(tmp_path):
    base = load_config("tiny-llama")
    for label, method, params in cases(base):
        rp = apply_rope(base, method, S, params).rope_parameters
        raw = serving_config({"model_type": "llama", "rope_parameters": rp, "max_position_embeddings": 1024})
        assert raw["rope_theta"] == rp["rope_theta"]
        if rp["rope_type"] == "default":
            assert "rope_scaling" not in raw, label
        else:
            assert raw["rope_scaling"] == {k: v for k, v in rp.items() if k != "rope_theta"}, label
        if method == "longrope":  # transformers 4.57's longrope reads the original length at the top level
            assert raw["original_max_position_embeddings"] == 256
    phi = {"model_type": "phi", "rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0,
                                                    "partial_rotary_factor": 0.5}}
    assert serving_config(phi)["partial_rotary_factor"] == 0.5  # transformers 4 reads it at the top level
    assert serving_config(phi)["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    per_type = {"model_type": "gemma3", "rope_parameters": {"full_attention": {"rope_type": "default"}}}
    assert serving_config(per_type) == per_type
    with pytest.raises(RopeConfigError, match="needs a config.json dict"):
        serving_config({"rope_scaling": {"rope_type": "linear", "factor": 2.0}})


def test_a_stale_rope_scaling_is_refused_on_load(tmp_path):
    """transformers 5 loads a config.json's rope_scaling over its rope_parameters, silently; load_config refuses a
    disagreeing copy, accepts an agreeing one (also in the old ``type`` spelling) and a config with either alone."""
    folder, _ = exported(tmp_path, "tiny-llama", "yarn", {})
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    assert load_config(str(folder)).rope_parameters["factor"] == S
    stale = {**raw, "rope_scaling": {**raw["rope_scaling"], "factor": 2.0}}
    path.write_text(json.dumps(stale))
    assert AutoConfig.from_pretrained(folder).rope_parameters["factor"] == 2.0  # the danger is real
    with pytest.raises(RopeConfigError, match=r"rope_scaling .* disagrees with rope_parameters.*--write-config"):
        load_config(str(folder))
    old_spelling = {("type" if k == "rope_type" else k): v for k, v in raw["rope_scaling"].items()}
    check_legacy_keys({**raw, "rope_scaling": old_spelling}, "x")
    check_legacy_keys({k: v for k, v in raw.items() if k != "rope_scaling"}, "x")
    check_legacy_keys({k: v for k, v in raw.items() if k != "rope_parameters"}, "x")
    # the fix the message gives: delete rope_scaling, re-export
    path.write_text(json.dumps({k: v for k, v in stale.items() if k != "rope_scaling"}))
    assert main(["export", str(folder), "--write-config"]) == 0
    assert json.loads(path.read_text())["rope_scaling"]["factor"] == S
    # a stale top-level base: transformers 4 reads it, and transformers 5 too next to a rope_scaling
    path.write_text(json.dumps({**raw, "rope_theta": 5e5}))
    assert AutoConfig.from_pretrained(folder).rope_parameters["rope_theta"] == 5e5  # the danger is real
    with pytest.raises(RopeConfigError, match=r"legacy rope_theta 500000.0 disagrees with rope_parameters' 10000.0"):
        load_config(str(folder))
    path.write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json is not valid JSON"):
        load_config(str(folder))


def test_legacy_keys_for_configs_ropescale_did_not_write(tmp_path):
    """A yarn config.json with its own attention_factor (not written by ropescale) gets attn_factor too, and a
    transformers-4 config.json (rope_scaling only) gets rope_parameters from the loaded config."""
    rp = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 256,
          "attention_factor": 0.8}
    out = serving_config({"model_type": "llama", "rope_parameters": rp})
    assert out["rope_parameters"]["attn_factor"] == out["rope_scaling"]["attn_factor"] == pytest.approx(
        0.8 / (0.1 * math.log(4) + 1))
    assert serving_config(out) == out  # idempotent
    folder, config = exported(tmp_path, "tiny-llama", "linear", {})
    raw = json.loads((folder / "config.json").read_text())
    t4_style = {k: v for k, v in raw.items() if k not in ("rope_parameters", "ropescale")}
    (folder / "config.json").write_text(json.dumps(t4_style))
    assert main(["export", str(folder), "--write-config"]) == 0
    again = json.loads((folder / "config.json").read_text())
    assert again["rope_parameters"] == {**raw["rope_scaling"], "rope_theta": 1e4}


def test_export_command(tmp_path, capsys):
    folder, _ = exported(tmp_path, "tiny-llama", "dynamic_ntk", {})
    assert main(["export", str(folder), "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    status = {v["loader"]: v["status"] for v in result["verdicts"]}
    assert list(status) == list(LOADERS)
    assert status == {"transformers-5": "exact", "transformers-4": "exact", "vllm": "unsupported",
                      "sglang": "approximate", "llama.cpp": "unsupported"}
    assert any(line.startswith("vllm (vLLM 0.34.0): unsupported: served unscaled") for line in out)
    # a method llama.cpp cannot run: refused before anything is written
    gguf = tmp_path / "out.gguf"
    assert main(["export", str(folder), "--gguf", str(gguf)]) == 2
    assert "llama.cpp cannot run dynamic_ntk" in capsys.readouterr().err
    assert not gguf.exists() and not list(tmp_path.glob(".out.gguf*"))
    assert main(["export", "tiny-llama", "--write-config"]) == 2
    assert "is not one" in capsys.readouterr().err
    assert main(["export", "tiny-llama", "--gguf", str(gguf)]) == 2
    assert "needs a local model folder" in capsys.readouterr().err


# --- GGUF ---------------------------------------------------------------------------------------------------------


def test_gguf_refuses_what_it_cannot_write(tmp_path):
    qwen = load_model("tiny-qwen2")
    qwen.save_pretrained(tmp_path / "qwen", safe_serialization=True)
    with pytest.raises(ModelLoadError, match="Llama architecture.*convert_hf_to_gguf"):
        write_gguf(tmp_path / "qwen", tmp_path / "q.gguf")
    config = apply_rope(load_config("tiny-llama"), "yarn", 2.0)
    load_model("tiny-llama", config=config).save_pretrained(tmp_path / "llama", safe_serialization=True)
    with pytest.raises(ModelLoadError, match="no tokenizer.json"):
        write_gguf(tmp_path / "llama", tmp_path / "l.gguf")
    tiny_tokenizer().save_pretrained(tmp_path / "llama")  # byte-level vocabulary, no merges
    with pytest.raises(ModelLoadError, match="no BPE merges"):
        write_gguf(tmp_path / "llama", tmp_path / "l.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.gguf*"))


def test_gguf_weights_read_back_by_transformers(tmp_path, monkeypatch):
    """The testbed base as GGUF, read back by transformers' own GGUF reader (models.load converts a .gguf with it,
    which undoes llama.cpp's q/k pair order its own way): the same logits on the held-out book. Without the
    reordering of q_proj/k_proj the reader's inverse would scramble the heads. Then the tiny Llama preset, whose
    2 query heads share 1 key/value head (the key rows reordered by their own head count) and whose output head is
    not tied to the embedding."""
    from data.corpus import load_corpus
    from models.load import load_tokenizer

    monkeypatch.setenv("ROPESCALE_CACHE", str(tmp_path / "cache"))  # the conversion lands there, not in ~/.cache
    info = write_gguf(ROOT / "models" / "testbed", tmp_path / "testbed.gguf")
    theta = json.loads((ROOT / "models" / "testbed" / "config.json").read_text())["rope_parameters"]["rope_theta"]
    assert info["rope"] == {"rope.freq_base": theta, "rope.scaling.type": "none"} and not info["rope_freqs"]
    tok = load_tokenizer(str(ROOT / "models" / "testbed"))
    ids = torch.tensor([tok(load_corpus("heldout")[0].text[:3000])["input_ids"][:256]])
    ref = load_model(str(ROOT / "models" / "testbed"))
    back = load_model(str(tmp_path / "testbed.gguf"))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ref(ids).logits, atol=1e-4, rtol=0)
    config = load_config("tiny-llama")
    config.tie_word_embeddings, config.vocab_size = False, 4096  # the testbed's tokenizer: a BPE with merges
    tiny = load_model("tiny-llama", config=config)
    assert tiny.config.num_key_value_heads < tiny.config.num_attention_heads and not tiny.config.tie_word_embeddings
    tiny.save_pretrained(tmp_path / "tiny", safe_serialization=True)
    tok.save_pretrained(tmp_path / "tiny")
    assert write_gguf(tmp_path / "tiny", tmp_path / "tiny.gguf")["tensors"] == len(tiny.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(load_model(str(tmp_path / "tiny.gguf"))(ids).logits, tiny(ids).logits, atol=1e-4,
                                   rtol=0)


# --- the docs -----------------------------------------------------------------------------------------------------


def test_docs_matrix_is_what_compatibility_says(tmp_path):
    """docs/serving.md's matrix: one row per case of ``cases``, one column per loader, each cell's status word first."""
    text = (ROOT / "docs" / "serving.md").read_text()
    table = text[text.index("<!-- matrix -->"):text.index("<!-- /matrix -->")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("| ")]
    header, body = rows[0], {r[0]: r[1:] for r in rows[1:] if not set(r[0]) <= set("-")}
    assert header[1:] == list(LOADERS)
    base = load_config("tiny-llama")
    for label, method, params in cases(base):
        config = apply_rope(base, method, S, params)
        want = [v.status for v in compatibility(config)]
        got = [re.match(r"\**(\w+)", cell).group(1) for cell in body[label]]
        assert got == want, (label, got, want)
    assert len(body) == len(cases(base))
