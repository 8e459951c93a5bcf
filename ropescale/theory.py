"""What a RoPE scaling method does at a target length, from the model's RoPE settings alone (no forward pass).

The numbers ``python -m ropescale plan`` reports before anything is trained. A model trained at the original
length L saw, in rotary pair i, the angles 0 .. L theta_i (the phase at the end of its window); at the target length
T a scaled model reaches T theta'_i. (Counting the last position as L - 1 instead would make Position Interpolation
at exactly T = s L overshoot by a fraction of one position: a rounding artefact, not an extension limit.)

- **Out of bound** (the failure mode the NTK-aware discussion names, YaRN paper section 3.1-3.2): a pair that never
  made a full turn within L (L theta_i < 2 pi: it saw only an arc of the circle) and whose scaled angle at the
  target passes the end of that arc (T theta'_i > L theta_i) meets angles it never saw in training. Pairs
  that turned at least once saw every angle and cannot go out of bound.
- **Effective extension**: the longest length n at which no pair is out of bound. Position Interpolation,
  NTK-by-parts and YaRN divide every unturned pair by s, so theirs is about s L; NTK-aware divides pair i by
  lambda^i (lambda = (alpha s)^(2/(d-2)), d the rotary dimension), exactly s only in the last pair, so its effective
  extension is shorter than s L and the nominal s = T / L does not reach T: ``factor_for_target`` computes the s
  that does.
- **Critical dimension** (Liu et al. 2023, "Scaling Laws of RoPE-based Extrapolation", section 3):
  d_extra = 2 ceil((d/2) log_base(L / 2 pi)), the number of channels whose wavelength fits inside L (92 of 128 for
  Llama 2: base 1e4, L 4096); with a new base b', the extrapolation limit is 2 pi b'^(d_extra/d), so a plain base
  change reaches T with b' = (T / 2 pi)^(d / d_extra) (``theta_for_target``).
- **Base lower bound** (Men et al. 2024, "Base of RoPE Bounds Context Length", section 3): the long-term decay of
  the ability to tell similar tokens from random ones requires B(m) = sum_i cos(m theta_i) >= 0 for every distance
  m up to the context length; the smallest base that satisfies it bounds the length a base can serve. B is not
  monotonic in the base (a larger base can fail where a smaller one passed), so the bound is found by a scan from
  below over bases with two significant digits, the grid that reproduces the paper's table.
- **Similarity kernel**: K(m) = sum_i cos(m theta'_i) / (d/2), RoPE's long-term decay curve (1 at m = 0).
- **Adjacent-token angle**: theta'_i, the angle between neighbouring positions in pair i; where scaling divides it,
  adjacent tokens are harder to tell apart (the "local relations" damage one uniform s does; by-parts methods keep
  the fast pairs at their trained angle).
"""

from __future__ import annotations

import math

import torch

from ropescale.methods import ROPE_METHODS, RopeConfigError, rotary_dim, validate_method

_DYNAMIC = ("dynamic_ntk", "dynamic_yarn")  # their frequencies depend on the current length
_TOL = 1e-6  # relative: the methods return float32 frequencies (~6e-8 relative error)


def scaled_rope(head_dim: int, base: float, original_len: int, method: str, factor: float,
                params: dict | None = None, partial_rotary_factor: float = 1.0,
                seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(theta, theta_scaled, attention_scale)``: float64 ``[rotary_dim/2]`` frequencies before and after
    ``method`` at ``factor`` (dynamic methods at ``seq_len``, default the target length round(L s))."""
    params = dict(params or {})
    validate_method(method, factor, params, original_len, rotary_dim=rotary_dim(head_dim, partial_rotary_factor))
    args = (head_dim, base, partial_rotary_factor, original_len)
    theta, _ = ROPE_METHODS["none"].fn(*args, 1.0, {})
    scaled, attention = ROPE_METHODS[method].fn(*args, factor, params,
                                                seq_len=seq_len or round(original_len * factor))
    return theta.double(), scaled.double(), attention


def frequencies(head_dim: int, base: float, original_len: int, method: str, factor: float, params: dict | None = None,
                partial_rotary_factor: float = 1.0, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(theta, theta_scaled)`` of ``scaled_rope``."""
    return scaled_rope(head_dim, base, original_len, method, factor, params, partial_rotary_factor, seq_len)[:2]


def unturned(theta: torch.Tensor, original_len: int) -> torch.Tensor:
    """Bool ``[rotary_dim/2]``: the pairs that never made a full turn within L (L theta_i < 2 pi)."""
    return original_len * theta < 2 * math.pi * (1 - _TOL)


def spectrum(head_dim: int, base: float, original_len: int, partial_rotary_factor: float = 1.0) -> dict:
    """How a model's rotary pairs fall into NTK-by-parts' regions (YaRN paper, section 3.2) at its defaults
    (alpha 1, beta 32 from ``ROPE_METHODS["ntk_by_parts"]``): the share of pairs that turn more than beta times
    within L (``high``: left alone), fewer than alpha times (``low``: interpolated like PI) and between (``ramp``),
    with the counts and the thresholds. A real model has about a third in each (Llama-2-7B 33/39/28%, SmolLM2-135M
    34/28/38%); a short native context leaves no pair for by-parts to keep (head_dim 64, base 1e4, L 256: 3/38/59%).
    ``still``: the pairs that turn less than one radian across L (``slowest_angle``: the slowest pair's angle at L),
    where a query and a key that match by content keep most of their product at any distance inside the window
    (cos 1 = 0.54); a pair of the ``low`` region may still turn up to 2 pi. Llama-2-7B has 6 of 64, SmolLM2-135M 6 of
    32, Mistral-7B at 8k 1 of 64 (0.95 rad); head_dim 64 at base 1e3 and L 1,024 none (1.27 rad)."""
    defaults = ROPE_METHODS["ntk_by_parts"].defaults
    alpha, beta = defaults["alpha"], defaults["beta"]
    theta, _ = frequencies(head_dim, base, original_len, "none", 1.0, None, partial_rotary_factor)
    angles = original_len * theta.double()  # radians each pair turns across L
    turns = angles / (2 * math.pi)
    n = turns.numel()
    high, low = int((turns > beta).sum()), int((turns < alpha).sum())
    return {"alpha": alpha, "beta": beta, "pairs": n, "high": high, "ramp": n - high - low, "low": low,
            "high_share": high / n, "ramp_share": (n - high - low) / n, "low_share": low / n,
            "still": int((angles < 1).sum()), "slowest_angle": float(angles.min())}


def out_of_bound(theta: torch.Tensor, scaled: torch.Tensor, original_len: int, length: int) -> torch.Tensor:
    """Bool ``[rotary_dim/2]``: pairs whose angles up to ``length`` leave the arc seen in training."""
    return unturned(theta, original_len) & (length * scaled > original_len * theta * (1 + _TOL))


def effective_extension(head_dim: int, base: float, original_len: int, method: str, factor: float,
                        params: dict | None = None, partial_rotary_factor: float = 1.0,
                        limit: int | None = None) -> int | None:
    """The longest length n at which no pair is out of bound; None when no length up to
    ``limit`` (default 1024 L) shows one (every pair turned within L, or the method keeps them all inside).

    Static methods: n = L min over unturned pairs of theta_i / theta'_i (rounded down). Dynamic methods recompute their
    frequencies for every length, so the length is found by bisection (their angles grow with n)."""
    limit = limit or 1024 * original_len
    args = (head_dim, base, original_len, method, factor, params, partial_rotary_factor)
    if method not in _DYNAMIC:
        theta, scaled = frequencies(*args)
        mask = unturned(theta, original_len)
        if not mask.any():
            return None
        ratio = float((theta[mask] / scaled[mask]).min())
        n = math.floor(original_len * ratio * (1 + _TOL))
        return None if n > limit else n

    def ok(n: int) -> bool:
        theta, scaled = frequencies(*args, seq_len=n)
        return not out_of_bound(theta, scaled, original_len, n).any()

    if ok(limit):
        return None
    lo, hi = original_len, limit  # ok(lo): at L every method is plain RoPE or inside its trained range
    if not ok(lo):
        return original_len - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def factor_for_target(head_dim: int, base: float, original_len: int, method: str, target: int,
                      params: dict | None = None, partial_rotary_factor: float = 1.0,
                      max_factor: float | None = None) -> float | None:
    """The smallest s (to 0.1%) at which ``method``'s effective extension reaches ``target``: the nominal
    target / L for PI, NTK-by-parts and YaRN, more for NTK-aware (the "set s higher than theory" of its authors,
    computed). None when no s up to ``max_factor`` (default 64 x nominal) reaches it (e.g. ``theta``, whose
    frequencies do not depend on s)."""
    nominal = target / original_len
    if nominal < 1:
        raise RopeConfigError(f"target {target} is below the original length {original_len}")
    hi = max_factor or 64 * nominal

    def reaches(s: float) -> bool:
        n = effective_extension(head_dim, base, original_len, method, s, params, partial_rotary_factor,
                                limit=4 * target)
        return n is None or n >= target

    if reaches(nominal):
        return nominal
    if not reaches(hi):
        return None
    lo = nominal
    while hi / lo > 1.001:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if reaches(mid) else (mid, hi)
    return hi


def critical_dim(head_dim: int, base: float, original_len: int) -> int:
    """Liu et al. 2023: d_extra = 2 ceil((d/2) log_base(L / 2 pi)), the channels whose wavelength fits in L (the
    rest never complete a period in training); capped at ``head_dim``."""
    d = head_dim
    return min(d, 2 * math.ceil(d / 2 * math.log(original_len / (2 * math.pi)) / math.log(base)))


def theta_for_target(head_dim: int, base: float, original_len: int, target: int) -> float:
    """Liu et al. 2023: the base b' whose extrapolation limit 2 pi b'^(d_extra/d) equals ``target``, with d_extra the
    critical dimension of the original base and L."""
    return (target / (2 * math.pi)) ** (head_dim / critical_dim(head_dim, base, original_len))


def _decay_chunks(theta: torch.Tensor, length: int, chunk: int):
    """B(m) = sum_i cos(m theta_i) for m = 0 .. ``length`` - 1, ``chunk`` distances at a time (float64 each)."""
    for start in range(0, length, chunk):
        m = torch.arange(start, min(start + chunk, length), dtype=torch.float64)
        yield torch.cos(m[:, None] * theta[None, :]).sum(1)


def decay_sum(theta: torch.Tensor, length: int, chunk: int = 8192) -> torch.Tensor:
    """Men et al.'s B(m) = sum_i cos(m theta_i) for m = 0 .. ``length`` - 1: float64 ``[length]``."""
    return torch.cat(list(_decay_chunks(theta, length, chunk)))


def satisfies_decay(head_dim: int, base: float, length: int, chunk: int = 4096) -> bool:
    """Men et al.'s criterion for ``base`` at ``length``: B(m) >= 0 for every m in 0 .. length-1 (stops at the
    first chunk that fails)."""
    theta = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return not any((b < 0).any() for b in _decay_chunks(theta, length, chunk))


def base_lower_bound(head_dim: int, length: int, digits: int = 2, stop: float = 1e12) -> float | None:
    """Men et al. 2024: the smallest base with ``digits`` significant digits (1.0e2, 1.1e2, .. 9.9e2, 1.0e3, .. for
    the default 2) that satisfies the decay criterion at ``length``; None below ``stop``.

    A scan from below, not a bisection: the criterion is not monotonic in the base. Below the base from which it
    always holds, it holds only in narrow windows, so the answer depends on the grid; this grid reproduces the
    paper's table (d = 128, lengths in thousands: 4.3e3 at 1k .. 7.8e6 at 128k, a test checks it), while a 0.2%
    geometric grid finds narrower windows lower down (1.16e4 at 2k, 2.34e5 at 16k)."""
    if length < 1 or not 1 <= digits <= 6:
        raise RopeConfigError(f"base_lower_bound needs length >= 1 and 1 <= digits <= 6 (got {length}, {digits})")
    first, last = 10 ** (digits - 1), 10 ** digits  # mantissas first .. last - 1, times 10^(exponent - digits + 1)
    exponent = 0
    while True:
        for mantissa in range(first, last):
            b = mantissa * 10.0 ** (exponent - digits + 1)
            if b >= stop:
                return None
            if b > 1 and satisfies_decay(head_dim, b, length):
                return b
        exponent += 1


def kernel(scaled: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    """K(m) = mean over pairs of cos(m theta'_i) at each distance: float64, the shape of ``distances``."""
    return torch.cos(distances.double()[..., None] * scaled).mean(-1)


def dimension_rows(theta: torch.Tensor, scaled: torch.Tensor, original_len: int, target: int) -> list[dict]:
    """One row per rotary pair: wavelength before/after, turns within L and within the target, the share of the
    circle covered within L and within the target (1 = every angle), the adjacent-token angle before/after, and
    whether the pair is out of bound at the target."""
    oob = out_of_bound(theta, scaled, original_len, target)
    rows = []
    for i, (t0, t) in enumerate(zip(theta.tolist(), scaled.tolist())):
        seen, reached = original_len * t0, target * t
        rows.append({"index": i, "wavelength": 2 * math.pi / t0, "wavelength_scaled": 2 * math.pi / t,
                     "turns_L": seen / (2 * math.pi), "turns_target": reached / (2 * math.pi),
                     "coverage_L": min(1.0, seen / (2 * math.pi)), "coverage_target": min(1.0, reached / (2 * math.pi)),
                     "adjacent_angle": t0, "adjacent_angle_scaled": t, "out_of_bound": bool(oob[i])})
    return rows


def method_theory(head_dim: int, base: float, original_len: int, target: int, method: str, factor: float,
                  params: dict | None = None, partial_rotary_factor: float = 1.0) -> dict:
    """Everything above for one (method, factor): per-pair rows, the count of out-of-bound pairs, the effective
    extension and the factor that reaches ``target``, the attention scale, and the loss of local resolution (the
    mean over pairs of theta'_i / theta_i, 1 = adjacent tokens as distinct as in training)."""
    args = (head_dim, base, original_len)
    theta, scaled, attention = scaled_rope(*args, method, factor, params, partial_rotary_factor, seq_len=target)
    rows = dimension_rows(theta, scaled, original_len, target)
    return {
        "method": method, "factor": float(factor), "params": {**ROPE_METHODS[method].defaults, **(params or {})},
        "out_of_bound": sum(r["out_of_bound"] for r in rows),
        "effective_extension": effective_extension(*args, method, factor, params, partial_rotary_factor),
        "factor_for_target": factor_for_target(*args, method, target, params, partial_rotary_factor),
        "attention_scale": attention,
        "adjacent_resolution": float((scaled / theta).mean()),
        "rows": rows,
    }
