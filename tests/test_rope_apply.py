"""apply_rope on the tiny Llama/Mistral/Qwen2 presets: saved natively, reloaded by plain transformers in a process
that cannot import this project, with the same logits at twice the original length; rebasing instead of compounding;
the dynamic YaRN runtime module."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from data.corpus import load_corpus
from ropescale.apply import apply_rope, original_context, rope_of
from ropescale.methods import ROPE_METHODS, RopeConfigError
from models.load import load_config, load_model, tiny_tokenizer
from ropescale.runtime import enable_dynamic_yarn

L = 256  # the presets' native context
N = 2 * L  # every round trip is checked at twice the original length

# One parameter set per method (factor 2), every method apply_rope can write.
APPLIED = {
    "none": {},
    "linear": {},
    "ntk_aware": {"alpha": 1.5},
    "theta": {"rope_theta": 1e5},
    "dynamic_ntk": {},
    "ntk_by_parts": {},
    "yarn": {},
    "dynamic_yarn": {},
    "llama3": {},
    "longrope": {"short_factor": [1.0 + 0.01 * i for i in range(16)],
                 "long_factor": [1.0 + 0.1 * i for i in range(16)]},
}
# The Llama-layout presets; every other family's tables and reloads: tests/test_families.py.
PRESETS = ("tiny-llama", "tiny-mistral", "tiny-qwen2")
CASES = [(p, m) for p in PRESETS for m in APPLIED]

# Runs in a fresh interpreter: -I ignores PYTHONPATH, the user site and the current folder, and the working folder
# is a temporary one, so only transformers and torch can be imported, never this project.
RELOAD = r"""
import json, sys, warnings, logging, io
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging
ids = load_file(sys.argv[1])["ids"]
report = {}
for folder in sys.argv[2:]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    hf_logging.get_logger().addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    hf_logging.get_logger().removeHandler(handler)
    with torch.no_grad():
        logits = model(ids).logits
    save_file({"logits": logits.contiguous()}, folder + "/reloaded.safetensors")
    report[folder] = {"rope_parameters": model.config.rope_parameters,
                      "max_position_embeddings": model.config.max_position_embeddings,
                      "log": stream.getvalue() + "".join(str(w.message) for w in caught)}
assert not any(m.split(".")[0] in ("ropescale", "data", "eval") for m in sys.modules), "project was imported"
print(json.dumps(report))
"""


def ids_of_text(n: int) -> torch.Tensor:
    """The first ``n`` byte tokens of the held-out book (real text through the presets' real tokenizer)."""
    text = load_corpus("heldout")[0].text[:4 * n]
    ids = tiny_tokenizer()(text, add_special_tokens=False)["input_ids"][:n]
    assert len(ids) == n
    return torch.tensor([ids])


def logits(model, ids, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, **kw).logits


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    """Apply every method to every preset, save (safetensors), reload all of them in ONE plain subprocess."""
    root = tmp_path_factory.mktemp("roundtrip")
    ids = ids_of_text(N)
    save_file({"ids": ids}, str(root / "ids.safetensors"))
    memory = {}
    for preset, method in CASES:
        config = apply_rope(load_config(preset), method, 2.0, APPLIED[method])
        model = load_model(preset, config=config)
        folder = root / f"{preset}-{method}"
        model.save_pretrained(folder, safe_serialization=True)
        memory[preset, method] = (model, logits(model, ids), folder)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-I", "-c", RELOAD, str(root / "ids.safetensors"),
                          *[str(f) for _, _, f in memory.values()]],
                         cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    return ids, memory, report


@pytest.mark.parametrize("preset,method", CASES)
def test_plain_transformers_reload_gives_the_same_logits(round_trip, preset, method):
    ids, memory, report = round_trip
    model, in_memory, folder = memory[preset, method]
    assert not list(folder.glob("*.bin")) and list(folder.glob("*.safetensors"))
    reloaded = load_file(str(folder / "reloaded.safetensors"))["logits"]
    torch.testing.assert_close(reloaded, in_memory, atol=1e-5, rtol=0)
    r = report[str(folder)]
    assert r["rope_parameters"] == model.config.rope_parameters
    assert r["max_position_embeddings"] == model.config.max_position_embeddings
    # transformers accepted every key without a warning, but attn_factor: the key SGLang reads, which transformers
    # names as unrecognized and ignores (ropescale.methods.servers_attn_factor)
    log = r["log"].replace("Unrecognized keys in `rope_parameters` for 'rope_type'='yarn': {'attn_factor'}", "")
    assert "rope" not in log.lower(), r["log"]
    saved = json.loads((folder / "config.json").read_text())
    assert saved["rope_theta"] == saved["rope_parameters"]["rope_theta"]  # legacy key, consistent
    assert "rope_scaling" not in saved
    assert saved["ropescale"]["method"] == method


@pytest.mark.parametrize("preset,method", [c for c in CASES if c[1] != "none"])
def test_the_scaling_changes_logits_beyond_the_original_length(round_trip, preset, method):
    """The round trip would be vacuous if the scaling did nothing: every method changes the logits at 2L."""
    _, memory, _ = round_trip
    diff = (memory[preset, method][1] - memory[preset, "none"][1]).abs().max().item()
    assert diff > 1e-3


@pytest.mark.parametrize("method", list(APPLIED))
def test_the_config_makes_transformers_compute_our_method(round_trip, method):
    """transformers' rotary module, built from the config apply_rope wrote, holds the registry's inv_freq and
    attention scale: at build time, and after a forward at 2L (dynamic types recompute, longrope switches lists).
    dynamic_yarn is static YaRN at the target factor until enable_dynamic_yarn."""
    _, memory, _ = round_trip
    rotary = memory["tiny-llama", method][0].model.rotary_emb  # after the forward at N in the fixture
    fn_method = "yarn" if method == "dynamic_yarn" else method
    params = {} if method == "dynamic_yarn" else APPLIED[method]
    ours, scale = ROPE_METHODS[fn_method].fn(32, 1e4, 1.0, L, 2.0, params, seq_len=N)
    assert ((rotary.inv_freq - ours).abs() / ours).max().item() < 1e-6
    assert rotary.attention_scaling == pytest.approx(scale, rel=1e-9)
    fresh = LlamaRotaryEmbedding(memory["tiny-llama", method][0].config)
    at_build, build_scale = ROPE_METHODS[fn_method].fn(32, 1e4, 1.0, L, 2.0, params)
    assert ((fresh.inv_freq - at_build).abs() / at_build).max().item() < 1e-6
    assert fresh.attention_scaling == pytest.approx(build_scale, rel=1e-9)


def test_attention_scale_multiplies_cos_and_sin_once():
    """YaRN's scale reaches the rotary module: cos at position 0 is the scale itself (logits scale by its square)."""
    rotary = LlamaRotaryEmbedding(apply_rope(load_config("tiny-llama"), "yarn", 4.0))
    x = torch.zeros(1, 1, 32)
    cos, sin = rotary(x, torch.tensor([[0]]))
    expected = 0.1 * torch.log(torch.tensor(4.0)).item() + 1
    torch.testing.assert_close(cos, torch.full_like(cos, expected))


def test_pi_positions_are_m_over_s_in_the_transformers_module():
    config = load_config("tiny-llama")
    scaled = LlamaRotaryEmbedding(apply_rope(config, "linear", 4.0))
    plain = LlamaRotaryEmbedding(config)
    m = torch.arange(0, 4 * L)[None]
    x = torch.zeros(1, 1, 32)
    for a, b in zip(scaled(x, m), plain(x, m.float() / 4)):
        assert torch.equal(a, b)  # s = 4 is a power of two: bit-exact


def test_written_config_per_method():
    config = load_config("tiny-mistral")
    assert apply_rope(config, "yarn", 4.0).max_position_embeddings == 4 * L
    assert apply_rope(config, "dynamic_ntk", 4.0).max_position_embeddings == L  # transformers reads it as L
    by_parts = apply_rope(config, "ntk_by_parts", 4.0, {"alpha": 2, "beta": 16}).rope_parameters
    assert by_parts == {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": L,
                        "beta_fast": 16.0, "beta_slow": 2.0, "attention_factor": 1.0, "truncate": False,
                        "attn_factor": pytest.approx(1 / (0.1 * math.log(4) + 1))}
    ntk = apply_rope(config, "ntk_aware", 4.0).rope_parameters
    assert ntk == {"rope_type": "default", "rope_theta": pytest.approx(1e4 * 4 ** (32 / 30))}
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 1e4}  # the input is not touched
    with pytest.raises(RopeConfigError, match="ramp='ratio'.*has no transformers rope_type"):
        apply_rope(config, "yarn", 4.0, {"ramp": "ratio"})
    with pytest.raises(RopeConfigError, match="did you mean 'yarn'"):
        apply_rope(config, "yarm", 4.0)


# --- already-scaled configs: rebase, never compound -------------------------------------------------------------


def test_scaled_config_refuses_without_rebase(round_trip):
    """Also for a config reloaded from disk by plain AutoConfig (the provenance record survives the save)."""
    _, memory, _ = round_trip
    reloaded = AutoConfig.from_pretrained(memory["tiny-qwen2", "yarn"][2])
    with pytest.raises(RopeConfigError) as e:
        apply_rope(reloaded, "linear", 4.0)
    msg = str(e.value)
    assert "already carries rope_type 'yarn' factor 2" in msg and "rebase=True" in msg and "\n" not in msg


@pytest.mark.parametrize("first,first_params", [("yarn", {}), ("ntk_aware", {}), ("theta", {"rope_theta": 1e6}),
                                                ("dynamic_ntk", {}), ("linear", {}), ("longrope",
                                                                                      APPLIED["longrope"])])
def test_rebase_replaces_the_scaling_from_the_original(first, first_params, tmp_path):
    config = load_config("tiny-llama")
    scaled = apply_rope(config, first, 4.0, first_params)
    scaled.save_pretrained(tmp_path)
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert original_context(reloaded) == L
    for second, params in (("yarn", {"beta_fast": 16}), ("linear", {})):
        direct = apply_rope(config, second, 8.0, params)
        rebased = apply_rope(reloaded, second, 8.0, params, rebase=True)
        assert rebased.rope_parameters == direct.rope_parameters
        assert rebased.max_position_embeddings == direct.max_position_embeddings == 8 * L
        assert rope_of(rebased)["rope_theta"] == 1e4  # ntk_aware/theta bases are not compounded either
    restored = apply_rope(reloaded, "none", 1.0, rebase=True)
    assert restored.rope_parameters == config.rope_parameters and restored.max_position_embeddings == L


def test_foreign_scaled_configs():
    """Configs ropescale did not write: the original length comes from rope_parameters where transformers keeps it;
    for linear, which does not record it, the caller must say."""
    config = load_config("tiny-llama")
    config.rope_parameters = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                              "original_max_position_embeddings": L}
    config.max_position_embeddings = 4 * L
    cur = rope_of(config)
    assert (cur["method"], cur["factor"], cur["original_max_position_embeddings"], cur["source"]) == \
        ("yarn", 4.0, L, "rope_parameters")
    assert apply_rope(config, "yarn", 2.0, rebase=True).max_position_embeddings == 2 * L

    config.rope_parameters = {"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0}
    with pytest.raises(RopeConfigError, match="linear type does not record the original length.*original_len="):
        apply_rope(config, "yarn", 2.0, rebase=True)
    rebased = apply_rope(config, "yarn", 2.0, rebase=True, original_len=L)
    assert rebased.rope_parameters["original_max_position_embeddings"] == L


def test_a_config_edited_after_apply_is_refused():
    config = apply_rope(load_config("tiny-llama"), "yarn", 4.0)
    config.rope_parameters["factor"] = 8.0
    with pytest.raises(RopeConfigError, match="edited after ropescale wrote it"):
        rope_of(config)


def test_non_rope_config_is_refused():
    from transformers import GPT2Config

    with pytest.raises(RopeConfigError, match="has no RoPE parameters"):
        apply_rope(GPT2Config(n_layer=1), "yarn", 2.0)


# --- dynamic YaRN at runtime ------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_dynamic_yarn_runtime(round_trip, preset):
    """After a reload, enable_dynamic_yarn gives plain RoPE up to L and static YaRN at s = n/L beyond, per row."""
    ids, memory, _ = round_trip
    folder = memory[preset, "dynamic_yarn"][2]
    dynamic = enable_dynamic_yarn(load_model(str(folder)), "rotary_emb")
    static_yarn = memory[preset, "yarn"][0]
    plain = memory[preset, "none"][0]
    torch.testing.assert_close(logits(dynamic, ids), logits(static_yarn, ids), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(dynamic, ids[:, :L]), logits(plain, ids[:, :L]), atol=1e-5, rtol=0)
    # Two rows in one batch: row 0 is one 2L document (s = 2), row 1 packs two L documents (s = 1). Each row gets
    # its own s, whatever the other row holds.
    pos = torch.stack([torch.arange(N), torch.arange(N) % L])
    batch = ids.repeat(2, 1)
    out = logits(dynamic, batch, position_ids=pos, use_cache=False)
    torch.testing.assert_close(out[:1], logits(static_yarn, ids), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1:], logits(plain, ids, position_ids=pos[1:], use_cache=False), atol=1e-5, rtol=0)


def test_enable_dynamic_yarn_needs_a_dynamic_yarn_config():
    model = load_model("tiny-llama", config=apply_rope(load_config("tiny-llama"), "yarn", 2.0))
    with pytest.raises(RopeConfigError, match="carries RoPE method 'yarn', not dynamic_yarn"):
        enable_dynamic_yarn(model, "rotary_emb")


@pytest.mark.parametrize("method", ["yarn", "ntk_aware", "llama3"])
def test_partial_rotary_model(method, tmp_path):
    """Phi rotates half of each head (partial_rotary_factor 0.5): the factor is kept, and transformers' Phi rotary
    module computes the registry's table over the rotary half."""
    from transformers import AutoModelForCausalLM, PhiConfig

    config = PhiConfig(vocab_size=64, hidden_size=64, num_attention_heads=2, num_hidden_layers=1,
                       intermediate_size=64, max_position_embeddings=L)
    scaled = apply_rope(config, method, 4.0)
    assert scaled.rope_parameters["partial_rotary_factor"] == 0.5
    rotary = AutoModelForCausalLM.from_config(scaled).model.rotary_emb
    ours, scale = ROPE_METHODS[method].fn(32, 1e4, 0.5, L, 4.0, {})
    assert rotary.inv_freq.shape == ours.shape == (8,)
    assert ((rotary.inv_freq - ours).abs() / ours).max().item() < 1e-6 and rotary.attention_scaling == scale
    scaled.save_pretrained(tmp_path)
    assert rope_of(AutoConfig.from_pretrained(tmp_path))["method"] == method
