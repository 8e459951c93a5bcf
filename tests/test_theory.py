"""ropescale.theory against hand computations, the papers' numbers and brute-force scans of the angles."""

import math

import pytest
import torch

from ropescale import theory
from ropescale.methods import RopeConfigError

LLAMA2 = dict(head_dim=128, base=10000.0, original_len=4096)


def test_critical_dimension_of_llama2_is_92():
    # Liu et al. 2023, section 3: d_extra = 2 ceil(64 log_1e4(4096 / 2 pi)) = 2 ceil(45.03) = 92 for Llama 2.
    assert theory.critical_dim(**LLAMA2) == 92
    # a base so small that every wavelength fits in L: all channels
    assert theory.critical_dim(128, 10.0, 4096) == 128


def test_theta_for_target_reaches_the_target_with_the_critical_dimension():
    b = theory.theta_for_target(**LLAMA2, target=32768)
    # by hand: (32768 / 2 pi)^(128 / 92)
    assert b == pytest.approx((32768 / (2 * math.pi)) ** (128 / 92))
    # the critical channel's wavelength under the new base is the target (Liu et al.'s extrapolation limit)
    assert 2 * math.pi * b ** (92 / 128) == pytest.approx(32768)


def _brute_force_extension(theta, scaled, L, limit):
    """The first length n at which some pair that never turned within L reaches an angle beyond any it saw: every
    integer position's angle is computed (no closed form)."""
    seen = torch.arange(L + 1, dtype=torch.float64)[:, None] * theta  # angles at positions 0..L
    unturned = seen.max(0).values < 2 * math.pi
    trained_max = seen.max(0).values
    for n in range(L, limit):
        reached = n * scaled  # the newest position's angle; earlier ones were checked at smaller n
        if (unturned & (reached > trained_max * (1 + 1e-6))).any():
            return n - 1
    return None


@pytest.mark.parametrize("factor,alpha", [(4.0, 1.0), (8.0, 1.0), (4.0, 1.5)])
def test_ntk_aware_effective_extension_matches_a_brute_force_scan(factor, alpha):
    args = dict(head_dim=32, base=10000.0, original_len=256)
    theta, scaled = theory.frequencies(**args, method="ntk_aware", factor=factor, params={"alpha": alpha})
    brute = _brute_force_extension(theta, scaled, 256, limit=round(256 * factor * alpha) + 10)
    got = theory.effective_extension(**args, method="ntk_aware", factor=factor, params={"alpha": alpha})
    assert got == brute
    # NTK-aware falls short of s L (only its last pair is divided by s) unless alpha makes up for it
    if alpha == 1.0:
        assert got < 256 * factor


def test_ntk_aware_needs_a_larger_factor_and_the_closed_form_agrees():
    # NTK-aware divides pair i by lambda^i, lambda = s^(2/(d-2)); the first unturned pair (i_c = 46 for Llama 2)
    # bounds it: L lambda^i_c >= T  <=>  s >= (T/L)^((d-2) / (2 i_c)).
    theta, _ = theory.frequencies(**LLAMA2, method="none", factor=1.0)
    i_c = int((~(4096 * theta >= 2 * math.pi)).nonzero()[0])
    assert i_c == 46
    s = theory.factor_for_target(**LLAMA2, method="ntk_aware", target=16384)
    assert s == pytest.approx(4 ** (126 / (2 * i_c)), rel=2e-3)
    assert s > 6  # far above the nominal 4
    ext = theory.effective_extension(**LLAMA2, method="ntk_aware", factor=s)
    assert ext >= 16384


@pytest.mark.parametrize("method", ["linear", "ntk_by_parts", "yarn", "llama3"])
def test_interpolating_methods_reach_s_times_L_with_no_pair_out_of_bound(method):
    t = theory.method_theory(**LLAMA2, target=16384, method=method, factor=4.0)
    assert t["out_of_bound"] == 0
    assert t["effective_extension"] == 16384
    assert t["factor_for_target"] == 4.0


def test_plain_rope_and_a_base_change():
    t = theory.method_theory(**LLAMA2, target=16384, method="none", factor=4.0)
    assert t["effective_extension"] == 4096 and t["factor_for_target"] is None  # extrapolation: the factor is moot
    assert t["out_of_bound"] == sum(r["turns_L"] < 1 for r in t["rows"]) == 64 - 46
    big = theory.method_theory(**LLAMA2, target=16384, method="theta", factor=4.0, params={"rope_theta": 1e6})
    assert big["out_of_bound"] == 0  # every unturned pair is slowed by at least 4 x with base 1e6


def test_rows_and_local_resolution():
    t = theory.method_theory(**LLAMA2, target=16384, method="linear", factor=4.0)
    assert t["adjacent_resolution"] == pytest.approx(0.25)  # PI divides every adjacent-token angle by s
    by_parts = theory.method_theory(**LLAMA2, target=16384, method="ntk_by_parts", factor=4.0)
    assert by_parts["adjacent_resolution"] > 0.6  # the fast pairs keep their angle
    row = by_parts["rows"][0]
    assert row["adjacent_angle"] == row["adjacent_angle_scaled"] == pytest.approx(1.0)  # theta_0 = 1 is kept
    assert row["coverage_L"] == 1.0 and row["turns_L"] == pytest.approx(4096 / (2 * math.pi))
    last = by_parts["rows"][-1]
    assert last["coverage_target"] == pytest.approx(last["coverage_L"], rel=1e-6)  # interpolated exactly
    assert last["coverage_L"] < 1


def test_kernel_starts_at_one_and_decays():
    theta, scaled = theory.frequencies(**LLAMA2, method="yarn", factor=4.0)
    k = theory.kernel(scaled, torch.tensor([0.0, 10.0, 1000.0]))
    assert k[0] == pytest.approx(1.0) and k[1] < 1 and abs(k[2]) < k[1]


def test_decay_criterion_by_hand():
    # d = 2: B(m) = cos(m) whatever the base (theta_0 = 1): it holds for m = 0, 1 and fails at m = 2.
    assert theory.satisfies_decay(2, 10.0, 2) and not theory.satisfies_decay(2, 10.0, 3)
    assert theory.base_lower_bound(2, 3, stop=1e6) is None
    b = theory.base_lower_bound(16, 64)
    step = 10 ** (math.floor(math.log10(b)) - 1)  # the grid's spacing in b's decade
    below = b - step if round(b / step) > 10 else b * 0.99  # the grid point before b (9.9e(k-1) before 1.0e(k))
    assert theory.satisfies_decay(16, b, 64) and not theory.satisfies_decay(16, below, 64)
    exponents = -torch.arange(0, 16, 2, dtype=torch.float64) / 16
    assert theory.decay_sum(b**exponents, 64).min() >= 0 > theory.decay_sum(below**exponents, 64).min()


# Men et al. 2024, "Base of RoPE Bounds Context Length": the lower bound of the base for d = 128 at context lengths
# 1k .. 128k (thousands of tokens), as the paper tabulates it.
MEN_TABLE = {1: 4.3e3, 2: 1.6e4, 4: 2.7e4, 8: 8.4e4, 16: 3.1e5, 32: 6.4e5, 64: 2.1e6, 128: 7.8e6}


@pytest.mark.parametrize("thousands", sorted(MEN_TABLE))
def test_base_lower_bound_matches_men_et_al(thousands):
    assert theory.base_lower_bound(128, 1000 * thousands) == pytest.approx(MEN_TABLE[thousands], rel=0.10)


def test_bad_input_is_one_clear_error():
    with pytest.raises(RopeConfigError, match="below the original length"):
        theory.factor_for_target(**LLAMA2, method="yarn", target=1000)
    with pytest.raises(RopeConfigError, match="unknown RoPE method"):
        theory.method_theory(**LLAMA2, target=8192, method="yarm", factor=2.0)
    with pytest.raises(RopeConfigError, match="digits"):
        theory.base_lower_bound(128, 4096, digits=0)


@pytest.mark.parametrize("shape,shares,still", [
    (dict(head_dim=128, base=1e4, original_len=4096), (33, 39, 28), 6),    # Llama-2-7B
    (dict(head_dim=128, base=1e4, original_len=8192), (41, 38, 22), 1),    # Mistral-7B
    (dict(head_dim=128, base=5e5, original_len=8192), (30, 25, 45), 20),   # Llama-3-8B
    (dict(head_dim=128, base=1e6, original_len=32768), (38, 25, 38), 15),  # Qwen3
    (dict(head_dim=64, base=1e5, original_len=8192), (34, 28, 38), 6),     # SmolLM2-135M
    (dict(head_dim=64, base=1e4, original_len=256), (3, 38, 59), 12),      # the committed testbed (native 256)
    (dict(head_dim=64, base=1e3, original_len=1024), (25, 50, 25), 0),     # a native-1,024 testbed
    (dict(head_dim=64, base=1.6e3, original_len=1024), (25, 47, 28), 1),
    (dict(head_dim=64, base=1e4, original_len=2048), (28, 38, 34), 5),
])
def test_spectrum_shares_match_a_count_of_turns_per_pair(shape, shares, still):
    """The share of pairs in each NTK-by-parts region (> 32 turns within L, between, < 1), and the pairs that turn less
    than a radian across L, against a count written out here: the angle of pair i at L = L base^(-2i/d), its turns
    that over 2 pi."""
    s = theory.spectrum(**shape)
    d, L, b = shape["head_dim"], shape["original_len"], shape["base"]
    angles = [L * b ** (-2 * i / d) for i in range(d // 2)]
    turns = [a / (2 * math.pi) for a in angles]
    assert (s["high"], s["low"]) == (sum(t > 32 for t in turns), sum(t < 1 for t in turns))
    assert s["high"] + s["ramp"] + s["low"] == s["pairs"] == d // 2
    assert tuple(round(100 * s[k]) for k in ("high_share", "ramp_share", "low_share")) == shares
    assert s["still"] == sum(a < 1 for a in angles) == still and s["slowest_angle"] == pytest.approx(min(angles))
    assert theory.spectrum(**shape, partial_rotary_factor=0.5)["pairs"] == d // 4
