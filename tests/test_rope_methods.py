"""The method registry against transformers' own init functions, against the YaRN paper's formulas (written here
from arXiv 2309.00071, section 3), and against the properties the paper states."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from ropescale.methods import ROPE_METHODS, RopeConfigError, mscale, validate_method

GRID = list(itertools.product([64, 128], [1e4, 1e5, 5e5], [2048, 4096, 8192], range(2, 33)))


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).abs() / ref.double().abs()).max().item()


def hf(rope_parameters: dict, head_dim: int, max_pos: int, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """transformers' own (inv_freq, attention scale) for these rope_parameters on a Llama config."""
    config = LlamaConfig(hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim,
                         max_position_embeddings=max_pos, rope_parameters=dict(rope_parameters))
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":
        return LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    return ROPE_INIT_FUNCTIONS[rope_type](config, seq_len=seq_len)


def longrope_lists(dim: int) -> dict:
    # Deterministic, non-trivial per-dimension factors (LongRoPE's searched factors grow with the dimension).
    return {"short_factor": [1.0 + 0.01 * i for i in range(dim // 2)],
            "long_factor": [1.0 + 0.5 * i for i in range(dim // 2)]}


# (our method, our params, transformers' rope_parameters, max_position_embeddings, seq_len) for one grid point.
def cases(hd: int, base: float, L: int, s: int):
    f = float(s)
    yarn = {"rope_type": "yarn", "rope_theta": base, "factor": f, "original_max_position_embeddings": L}
    lr = longrope_lists(hd)
    return [
        ("none", {}, {"rope_type": "default", "rope_theta": base}, L, None),
        ("theta", {"rope_theta": base * s}, {"rope_type": "default", "rope_theta": base * s}, L * s, None),
        ("linear", {}, {"rope_type": "linear", "rope_theta": base, "factor": f}, L * s, None),
        ("dynamic_ntk", {}, {"rope_type": "dynamic", "rope_theta": base, "factor": f}, L, None),
        ("dynamic_ntk", {}, {"rope_type": "dynamic", "rope_theta": base, "factor": f}, L, L * s),
        ("dynamic_ntk", {}, {"rope_type": "dynamic", "rope_theta": base, "factor": f}, L, 3 * L + 7),
        # NTK-aware is transformers' dynamic at factor 1 evaluated at n = s L (an independent formula path).
        ("ntk_aware", {}, {"rope_type": "dynamic", "rope_theta": base, "factor": 1.0}, L, L * s),
        ("yarn", {}, yarn, L * s, None),
        ("yarn", {"truncate": False, "beta_fast": 16, "beta_slow": 2},
         {**yarn, "truncate": False, "beta_fast": 16.0, "beta_slow": 2.0}, L * s, None),
        # attn_factor: the key SGLang reads for the multiplier (ropescale.methods.servers_attn_factor).
        ("yarn", {"attention_factor": 0.8}, {**yarn, "attention_factor": 0.8, "attn_factor": 0.8 / mscale(f)}, L * s,
         None),
        ("yarn", {"mscale": 0.707, "mscale_all_dim": 1.0}, {**yarn, "mscale": 0.707, "mscale_all_dim": 1.0}, L * s,
         None),
        ("ntk_by_parts", {}, {**yarn, "attention_factor": 1.0, "attn_factor": 1 / mscale(f), "truncate": False},
         L * s, None),
        ("ntk_by_parts", {"alpha": 2, "beta": 16, "truncate": True},
         {**yarn, "attention_factor": 1.0, "attn_factor": 1 / mscale(f), "beta_fast": 16.0, "beta_slow": 2.0}, L * s,
         None),
        # Dynamic YaRN at length n is static YaRN at s = n / L.
        ("dynamic_yarn", {}, {**yarn, "factor": 2.5}, L * s, int(2.5 * L)),
        ("llama3", {}, {"rope_type": "llama3", "rope_theta": base, "factor": f, "original_max_position_embeddings": L,
                        "low_freq_factor": 1.0, "high_freq_factor": 4.0}, L * s, None),
        ("llama3", {"low_freq_factor": 2, "high_freq_factor": 16},
         {"rope_type": "llama3", "rope_theta": base, "factor": f, "original_max_position_embeddings": L,
          "low_freq_factor": 2.0, "high_freq_factor": 16.0}, L * s, None),
        ("longrope", lr, {"rope_type": "longrope", "rope_theta": base, "factor": f,
                          "original_max_position_embeddings": L, **lr}, L * s, None),
        ("longrope", lr, {"rope_type": "longrope", "rope_theta": base, "factor": f,
                          "original_max_position_embeddings": L, **lr}, L * s, L * s),
    ]


@pytest.mark.parametrize("method", [m for m in ROPE_METHODS])
def test_equals_transformers_on_grid(method):
    """inv_freq and attention scale equal transformers' init functions (rel 1e-6) on head_dim {64,128} x base
    {1e4,1e5,5e5} x original {2k,4k,8k} x factor 2..32 (every integer), for every parameter form listed in cases()."""
    checked = 0
    for hd, base, L, s in GRID:
        for m, params, rp, max_pos, seq_len in cases(hd, base, L, s):
            if m != method:
                continue
            ref, ref_scale = hf(rp, hd, max_pos, seq_len)
            ours, scale = ROPE_METHODS[m].fn(hd, base, 1.0, L, float(s), params, seq_len=seq_len)
            assert ours.dtype == torch.float32 and ours.shape == (hd // 2,)
            assert rel_err(ours, ref) < 1e-6, (m, params, hd, base, L, s, seq_len, rel_err(ours, ref))
            assert scale == pytest.approx(ref_scale, rel=1e-6), (m, params, hd, base, L, s)
            checked += 1
    assert checked >= len(GRID)


@pytest.mark.parametrize("method,rope_type", [("linear", "linear"), ("dynamic_ntk", "dynamic"), ("yarn", "yarn"),
                                              ("llama3", "llama3"), ("longrope", "longrope")])
def test_partial_rotary_equals_transformers(method, rope_type):
    """partial_rotary_factor 0.5 (GPT-NeoX/Phi style): the rotary dim is half the head, as transformers computes."""
    for hd, base, L, s in GRID[::7]:
        params = longrope_lists(hd // 2) if method == "longrope" else {}
        rp = {"rope_type": rope_type, "rope_theta": base, "factor": float(s), "partial_rotary_factor": 0.5,
              "original_max_position_embeddings": L, **params}
        if rope_type == "llama3":
            rp.update(low_freq_factor=1.0, high_freq_factor=4.0)
        if rope_type == "dynamic":
            del rp["original_max_position_embeddings"]
        seq_len = 3 * L if method in ("dynamic_ntk", "longrope") else None
        ref, ref_scale = hf(rp, hd, L if rope_type == "dynamic" else L * s, seq_len)
        ours, scale = ROPE_METHODS[method].fn(hd, base, 0.5, L, float(s), params, seq_len=seq_len)
        assert ours.shape == (hd // 4,)
        assert rel_err(ours, ref) < 1e-6 and scale == pytest.approx(ref_scale, rel=1e-6)


# --- the paper's formulas, written from arXiv 2309.00071 section 3 ------------------------------------------------


def paper_theta(D: int, b: float) -> torch.Tensor:
    # theta_d = b^(-2d/|D|), d = 0 .. |D|/2 - 1
    return torch.tensor([b ** (-2 * d / D) for d in range(D // 2)], dtype=torch.float64)


def paper_by_parts(D: int, b: float, L: int, s: float, alpha: float, beta: float) -> torch.Tensor:
    # 3.2: lambda_d = 2 pi b^(2d/|D|), r(d) = L / lambda_d,
    # gamma(r) = 0 if r < alpha, 1 if r > beta, (r - alpha)/(beta - alpha) otherwise,
    # h(theta_d) = (1 - gamma(r(d))) theta_d / s + gamma(r(d)) theta_d
    out = []
    for d in range(D // 2):
        theta = b ** (-2 * d / D)
        r = L / (2 * math.pi * b ** (2 * d / D))
        gamma = 0.0 if r < alpha else 1.0 if r > beta else (r - alpha) / (beta - alpha)
        out.append((1 - gamma) * theta / s + gamma * theta)
    return torch.tensor(out, dtype=torch.float64)


def test_ntk_aware_equals_paper_on_grid():
    # 3.1: b' = b s^(|D|/(|D|-2)), theta'_d = b'^(-2d/|D|)
    for hd, base, L, s in GRID:
        ours, scale = ROPE_METHODS["ntk_aware"].fn(hd, base, 1.0, L, float(s), {})
        assert rel_err(ours, paper_theta(hd, base * s ** (hd / (hd - 2)))) < 1e-6 and scale == 1.0


def test_yarn_paper_ramp_equals_paper_on_grid():
    """ramp='ratio' is the paper's YaRN exactly: by-parts with alpha=1, beta=32 and sqrt(1/t) = 0.1 ln s + 1 (3.4)."""
    for hd, base, L, s in GRID:
        ours, scale = ROPE_METHODS["yarn"].fn(hd, base, 1.0, L, float(s), {"ramp": "ratio"})
        assert rel_err(ours, paper_by_parts(hd, base, L, s, 1.0, 32.0)) < 1e-6
        assert scale == pytest.approx(0.1 * math.log(s) + 1, rel=1e-12)
        by_parts, _ = ROPE_METHODS["ntk_by_parts"].fn(hd, base, 1.0, L, float(s), {"ramp": "ratio"})
        assert torch.equal(by_parts, ours)


def test_yarn_default_ramp_equals_paper_outside_the_blend_band():
    """The default ramp (transformers'/reference code's, linear in d) has the paper's end points: untruncated, it equals
    the paper on every dimension with r > beta or r < alpha, and only the blend inside the band differs."""
    for hd, base, L, s in GRID:
        ours, _ = ROPE_METHODS["yarn"].fn(hd, base, 1.0, L, float(s), {"truncate": False})
        paper = paper_by_parts(hd, base, L, s, 1.0, 32.0)
        r = L * paper_theta(hd, base) / (2 * math.pi)
        outside = (r > 32) | (r < 1)
        assert rel_err(ours[outside], paper[outside]) < 1e-6
        band = ~outside
        # Both blends lie between theta/s and theta.
        theta = paper_theta(hd, base)
        assert bool(((ours[band] <= theta[band] * (1 + 1e-6)) & (ours[band] >= theta[band] / s * (1 - 1e-6))).all())


# --- properties ---------------------------------------------------------------------------------------------------

dims = st.sampled_from([16, 32, 64, 96, 128, 256])
bases = st.floats(1e3, 1e7)
lengths = st.integers(64, 131072)
factors = st.floats(1.0, 64.0)


def identity_params(method: str, hd: int, base: float) -> dict:
    """Parameters under which a method's change comes from the factor alone (theta and longrope take theirs from
    params: the new base, the per-dimension lists)."""
    return {"theta": {"rope_theta": base}, "longrope": {"short_factor": [1.0] * (hd // 2),
                                                         "long_factor": [1.0] * (hd // 2)}}.get(method, {})


@settings(max_examples=60, deadline=None)
@given(hd=dims, base=bases, L=lengths)
def test_factor_one_is_none_for_every_method(hd, base, L):
    none, _ = ROPE_METHODS["none"].fn(hd, base, 1.0, L, 1.0, {})
    for m in ROPE_METHODS:
        inv, scale = ROPE_METHODS[m].fn(hd, base, 1.0, L, 1.0, identity_params(m, hd, base))
        assert torch.equal(inv, none), m
        assert scale == 1.0, m


@pytest.mark.parametrize("s", [2, 4, 8, 16, 32, 3, 5.5, 12.25])
def test_pi_positions_are_exactly_m_over_s(s):
    """PI: the angle at position m is the unscaled angle at m/s; bit-exact in float32 when s is a power of two."""
    inv_pi, _ = ROPE_METHODS["linear"].fn(128, 1e4, 1.0, 4096, float(s), {})
    inv, _ = ROPE_METHODS["none"].fn(128, 1e4, 1.0, 4096, 1.0, {})
    m = torch.arange(0, 4096 * 4, dtype=torch.float32)[:, None]
    scaled, direct = m * inv_pi, (m / s) * inv
    if math.log2(s).is_integer():
        assert torch.equal(scaled, direct)
    else:
        torch.testing.assert_close(scaled, direct, rtol=1e-6, atol=1e-6)


@settings(max_examples=100, deadline=None)
@given(hd=dims, base=bases, L=lengths, s=factors)
def test_ntk_aware_lowest_frequency_equals_pi(hd, base, L, s):
    ntk, _ = ROPE_METHODS["ntk_aware"].fn(hd, base, 1.0, L, s, {})
    pi, _ = ROPE_METHODS["linear"].fn(hd, base, 1.0, L, s, {})
    assert ntk[-1].item() == pytest.approx(pi[-1].item(), rel=1e-6)
    assert ntk[0].item() == 1.0  # and the highest is kept


@settings(max_examples=150, deadline=None)
@given(hd=dims, base=bases, L=lengths, s=st.floats(1.01, 64.0), alpha=st.floats(0.25, 4.0),
       width=st.floats(1.5, 64.0), ramp=st.sampled_from(["dim", "ratio"]))
def test_by_parts_keeps_short_and_divides_long_wavelengths(hd, base, L, s, alpha, width, ramp):
    """3.2: wavelength < L/beta untouched; wavelength > L/alpha divided by s exactly (both ramps, untruncated)."""
    beta = alpha * width
    inv, scale = ROPE_METHODS["ntk_by_parts"].fn(hd, base, 1.0, L, s, {"alpha": alpha, "beta": beta, "ramp": ramp})
    none, _ = ROPE_METHODS["none"].fn(hd, base, 1.0, L, 1.0, {})
    pi, _ = ROPE_METHODS["linear"].fn(hd, base, 1.0, L, s, {})
    wavelength = 2 * math.pi / paper_theta(hd, base)
    short = wavelength < L / beta * (1 - 1e-9)
    long = wavelength > L / alpha * (1 + 1e-9)
    assert torch.equal(inv[short], none[short])
    assert torch.equal(inv[long], pi[long])
    assert scale == 1.0
    # yarn untruncated has the same regions
    yarn, _ = ROPE_METHODS["yarn"].fn(hd, base, 1.0, L, s, {"beta_fast": beta, "beta_slow": alpha, "truncate": False,
                                                             "ramp": ramp})
    assert torch.equal(yarn, inv)


@settings(max_examples=60, deadline=None)
@given(hd=dims, base=bases, L=lengths, s=factors, frac=st.floats(0.0, 1.0))
def test_dynamic_methods_are_none_up_to_the_original_length(hd, base, L, s, frac):
    n = max(1, round(frac * L))
    none, _ = ROPE_METHODS["none"].fn(hd, base, 1.0, L, 1.0, {})
    for m in ("dynamic_ntk", "dynamic_yarn"):
        for seq_len in (None, n, L):
            inv, scale = ROPE_METHODS[m].fn(hd, base, 1.0, L, s, {}, seq_len=seq_len)
            assert torch.equal(inv, none) and scale == 1.0, (m, seq_len)


@pytest.mark.parametrize("method", list(ROPE_METHODS))
def test_length_dependent_marks_exactly_the_methods_whose_table_follows_the_length(method):
    # the evals reuse a cached prompt prefix only when the table is the same at every length (eval.common)
    L, s = 4096, 4.0
    params = {"rope_theta": 5e5} if method == "theta" else longrope_lists(64) if method == "longrope" else {}
    tables = [ROPE_METHODS[method].fn(64, 1e4, 1.0, L, s, params, seq_len=n) for n in (L // 2, 2 * L, 3 * L, 5 * L)]
    varies = any(not torch.equal(t[0], tables[0][0]) or t[1] != tables[0][1] for t in tables)
    assert varies == ROPE_METHODS[method].length_dependent


@settings(max_examples=40, deadline=None)
@given(hd=dims, base=bases, L=st.integers(64, 65536), over=st.floats(1.0001, 40.0))
def test_dynamic_yarn_is_yarn_at_the_current_ratio(hd, base, L, over):
    n = math.ceil(over * L)
    dyn, a = ROPE_METHODS["dynamic_yarn"].fn(hd, base, 1.0, L, 2.0, {}, seq_len=n)
    static, b = ROPE_METHODS["yarn"].fn(hd, base, 1.0, L, n / L, {})
    assert torch.equal(dyn, static) and a == b == pytest.approx(0.1 * math.log(n / L) + 1)


def test_llama3_is_the_paper_ramp_on_r():
    """Llama 3.1's smoothing is the paper's by-parts ramp with alpha = low_freq_factor, beta = high_freq_factor."""
    for hd, base, L, s in GRID[::5]:
        inv, _ = ROPE_METHODS["llama3"].fn(hd, base, 1.0, L, float(s), {"low_freq_factor": 1, "high_freq_factor": 4})
        assert rel_err(inv, paper_by_parts(hd, base, L, s, 1.0, 4.0)) < 1e-6


# --- validation ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,factor,params,L,target,fragment", [
    ("yarm", 2, {}, 4096, None, "unknown RoPE method 'yarm'; did you mean 'yarn'?"),
    ("linear", 0.5, {}, 4096, None, "factor must be a number >= 1 (got 0.5)"),
    ("linear", float("nan"), {}, 4096, None, "factor must be a number >= 1"),
    ("yarn", 2, {"beta_fast": 1, "beta_slow": 1}, 4096, None, "beta_fast > beta_slow"),
    ("ntk_by_parts", 2, {"alpha": 8, "beta": 4}, 4096, None, "beta > alpha"),
    ("llama3", 8, {"low_freq_factor": 4, "high_freq_factor": 1}, 4096, None, "high_freq_factor > low_freq_factor"),
    ("yarn", 2, {"beta_fst": 16}, 4096, None, "unknown parameter 'beta_fst' for method 'yarn'; did you mean "
                                              "'beta_fast'?"),
    ("linear", 2, {"alpha": 2}, 4096, None, "method 'linear' takes no parameters (got 'alpha')"),
    ("linear", 2, {}, 4096, 2048, "target length 2048 is below the original length 4096"),
    ("theta", 2, {}, 4096, None, "method 'theta' needs parameter 'rope_theta'"),
    ("longrope", 2, {"short_factor": [1.0] * 3, "long_factor": [1.0] * 32}, 4096, None,
     "'short_factor' has 3 entries; this model has 32 rotary pairs"),
    ("longrope", 2, {"long_factor": [1.0] * 32}, 4096, None, "needs parameter 'short_factor'"),
    ("yarn", 2, {"mscale": 1.0}, 4096, None, "give mscale and mscale_all_dim together"),
    ("yarn", 2, {"ramp": "log"}, 4096, None, "parameter 'ramp' must be one of dim, ratio"),
    ("ntk_aware", 2, {"alpha": 0.5}, 4096, None, "parameter 'alpha' of ntk_aware must be a number >= 1"),
    ("dynamic_yarn", 2, {"attention_factor": 1.0}, 4096, None, "unknown parameter 'attention_factor'"),
    ("linear", 2, {}, 0, None, "original length must be a positive integer"),
])
def test_validation_errors_are_one_clear_line(method, factor, params, L, target, fragment):
    with pytest.raises(RopeConfigError) as e:
        validate_method(method, factor, params, L, target, rotary_dim=64)
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)
    assert isinstance(e.value, ValueError)


def test_method_functions_validate_their_input():
    with pytest.raises(RopeConfigError, match="beta_fast > beta_slow"):
        ROPE_METHODS["yarn"].fn(64, 1e4, 1.0, 4096, 4.0, {"beta_fast": 1, "beta_slow": 2})
    with pytest.raises(RopeConfigError, match="'long_factor' has 31 entries"):
        ROPE_METHODS["longrope"].fn(64, 1e4, 1.0, 4096, 4.0, {"short_factor": [1.0] * 32, "long_factor": [1.0] * 31})
