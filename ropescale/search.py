"""The search behind ``python -m ropescale tune``: what a candidate is, the two search spaces and their constraints,
and the evolutionary loop. Pure: the objective is a function handed in (``eval.tune`` scores candidates on a model).

Two spaces:

- ``ParamSpace``, a method's own parameters (NTK-aware's alpha, which multiplies s in its base change, so it is
  searched only with s fixed: alpha s is all the table sees; NTK-by-parts' alpha and beta; YaRN's beta_slow,
  beta_fast and attention factor) and, optionally, the scale factor s itself. The formulas' values were fitted to
  one model (YaRN paper, sections 3.2-3.4: alpha = 1, beta = 32 and 0.1 ln s + 1 "for LLaMA"); the search fits them
  to the model at hand. Genes live in [0, 1] and map to each
  parameter's range (log-scaled where the parameter is a ratio), so one mutation size suits every gene.
- ``PairSpace``, LongRoPE's form (Ding et al. 2024, section 3.2): one rescale factor lambda_d >= 1 per rotary pair,
  theta_d / lambda_d, non-decreasing with the pair index (that is, with the wavelength: a longer wave is never
  interpolated less than a shorter one), the first ``keep`` pairs optionally left at 1 (LongRoPE's n-hat: the
  highest frequencies carry local order and are not touched), and an attention factor. Every static method is such
  a table (``ropescale.apply.longrope_form``), so PI, NTK-aware and YaRN seed the population exactly.

The loop (LongRoPE, Algorithm 1): a population seeded from the methods' own tables plus mutations of them; each
generation keeps the best ``parents``, makes children by mutation (multiplicative steps on lambda, Gaussian steps on
genes) and by crossover (each pair or gene from one of two parents), repairs every child into the constraints, scores
only candidates whose table was not scored before (``table_key``), and stops when the budget of scored candidates is
spent.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ropescale.apply import longrope_form
from ropescale.methods import (
    BY_PARTS_DEFAULTS,
    NTK_AWARE_DEFAULTS,
    ROPE_METHODS,
    YARN_DEFAULTS,
    RopeConfigError,
    mscale,
    rotary_dim,
)

SPACES = ("params", "pairs")
# (name, low, high, log-scaled): the range each method parameter is searched in. Wide around the papers' values
# (alpha = 1, beta = 32, attention 0.1 ln s + 1) but inside what keeps the ramp meaningful.
PARAM_GENES = {
    "ntk_aware": (("alpha", 1.0, 4.0, True),),  # the validator: alpha >= 1 (alpha s must reach s)
    "ntk_by_parts": (("alpha", 0.25, 8.0, True), ("beta", 2.0, 128.0, True)),
    "yarn": (("beta_slow", 0.25, 8.0, True), ("beta_fast", 2.0, 128.0, True), ("attention_factor", 0.8, 1.6, False)),
}
FACTOR_RANGE = (1.0, 2.5)  # s searched from the nominal T / L to 2.5x it (the planner measured up to 2x)
SEED_METHODS = ("linear", "ntk_aware", "yarn")  # LongRoPE's initial population: PI, NTK and YaRN
ATTENTION_RANGE = (1.0, 1.6)  # the per-pair space's attention factor (cos/sin multiplier); up to YaRN's own at s


@dataclass(frozen=True, eq=False)  # equal by ``key``, not by field: two tables at one s are two candidates
class Candidate:
    """One point of a space: applied as ``method`` at ``factor`` with ``params`` (for the per-pair space: longrope's
    ``short_factor`` = ``long_factor``, one divisor per rotary pair, and ``attention_factor``)."""

    method: str
    factor: float
    params: dict = field(hash=False, compare=False)
    origin: str = field(default="", compare=False)  # how it was made: a seed's name, "mutation", "crossover"

    @property
    def key(self) -> str:
        """Identity for the cache of scores where the model's RoPE is not known (``evolve`` without ``identity``;
        rounded, so float noise does not make a new candidate)."""
        def rnd(v):
            return [round(x, 6) for x in v] if isinstance(v, list) else (round(v, 6) if isinstance(v, float) else v)
        return json.dumps([self.method, round(self.factor, 6), {k: rnd(v) for k, v in sorted(self.params.items())}])


class ParamSpace:
    """A method's parameters (``PARAM_GENES``) and, with ``search_factor``, s in ``FACTOR_RANGE`` x nominal."""

    def __init__(self, method: str, nominal: float, search_factor: bool = True):
        if method not in PARAM_GENES:
            raise RopeConfigError(f"tune --space params searches {', '.join(PARAM_GENES)} (got {method!r}); for "
                                  "other methods use --space pairs")
        if not 1.0 <= nominal <= 1e4:
            raise RopeConfigError(f"the target must be 1 to 10000 times the original length (got s = {nominal:g})")
        self.method, self.nominal, self.search_factor = method, nominal, search_factor
        # NTK-aware's table depends on alpha * s only: with s searched, alpha would only repeat the same tables
        own = [] if (method == "ntk_aware" and search_factor) else list(PARAM_GENES[method])
        self.genes = own + ([("factor", nominal * FACTOR_RANGE[0], nominal * FACTOR_RANGE[1], True)]
                            if search_factor else [])

    def _value(self, gene: tuple, u: float) -> float:
        _, lo, hi, log = gene
        return lo * (hi / lo) ** u if log else lo + (hi - lo) * u

    def _unit(self, gene: tuple, v: float) -> float:
        _, lo, hi, log = gene
        u = math.log(v / lo) / math.log(hi / lo) if log else (v - lo) / (hi - lo)
        return min(1.0, max(0.0, u))

    def candidate(self, units: list[float], origin: str) -> Candidate:
        # six significant digits: the defaults come back as written (1, 32), not 0.9999999999999999
        values = {g[0]: float(f"{self._value(g, u):.6g}") for g, u in zip(self.genes, self.repair(units))}
        factor = values.pop("factor", self.nominal)
        if not values and self.method == "ntk_aware":
            values = dict(NTK_AWARE_DEFAULTS)  # s searched: alpha stays at 1
        return Candidate(self.method, factor, values, origin)

    def units(self, c: Candidate) -> list[float]:
        values = {**c.params, "factor": c.factor}
        return [self._unit(g, values[g[0]]) for g in self.genes]

    def published(self) -> dict:
        """The method's parameters as the paper (and transformers) set them, for this space's genes."""
        return {"ntk_aware": dict(NTK_AWARE_DEFAULTS),
                "ntk_by_parts": {"alpha": BY_PARTS_DEFAULTS["alpha"], "beta": BY_PARTS_DEFAULTS["beta"]},
                "yarn": {"beta_slow": YARN_DEFAULTS["beta_slow"], "beta_fast": YARN_DEFAULTS["beta_fast"],
                         "attention_factor": mscale(self.nominal)}}[self.method]

    def repair(self, units: list[float]) -> list[float]:
        """Clamp to [0, 1]; the ramp's two ends in order, beta at least twice alpha (so the ramp has width): beta
        raised to 2 alpha, or alpha lowered to beta / 2 where beta is at the top of its range."""
        u = [min(1.0, max(0.0, x)) for x in units]
        names = [g[0] for g in self.genes]
        for lo_name, hi_name in (("alpha", "beta"), ("beta_slow", "beta_fast")):
            if lo_name in names and hi_name in names:
                i, j = names.index(lo_name), names.index(hi_name)
                a, b = self._value(self.genes[i], u[i]), self._value(self.genes[j], u[j])
                if b < 2 * a:
                    u[j] = self._unit(self.genes[j], 2 * a)
                    u[i] = self._unit(self.genes[i], min(a, self._value(self.genes[j], u[j]) / 2))
        return u

    def seeds(self) -> list[Candidate]:
        """The method at its published parameters and the nominal s (what the formulas give)."""
        names = {g[0] for g in self.genes}
        defaults = {k: v for k, v in self.published().items() if k in names}
        return [self.candidate(self.units(Candidate(self.method, self.nominal, defaults)), "default")]

    def mutate(self, c: Candidate, rng: random.Random, sigma: float = 0.12) -> Candidate:
        u = self.units(c)
        k = rng.randrange(len(u))  # at least one gene moves
        u = [x + rng.gauss(0, sigma) if (i == k or rng.random() < 0.3) else x for i, x in enumerate(u)]
        return self.candidate(u, "mutation")

    def crossover(self, a: Candidate, b: Candidate, rng: random.Random) -> Candidate:
        return self.candidate([x if rng.random() < 0.5 else y for x, y in zip(self.units(a), self.units(b))],
                              "crossover")


class PairSpace:
    """LongRoPE's per-pair factors for a model's RoPE (``head_dim``, ``base``, ``original_len``,
    ``partial_rotary_factor``) at scale ``factor``: lambda in [1, ``max_lambda``], non-decreasing, the first
    ``keep`` pairs at 1; plus the attention factor in ``ATTENTION_RANGE`` (widened to YaRN's own at s). With
    ``keep`` > 0 the seeds are the methods' tables with their first pairs set to 1."""

    def __init__(self, head_dim: int, base: float, original_len: int, factor: float, keep: int = 0,
                 max_lambda: float | None = None, partial_rotary_factor: float = 1.0):
        self.dim = rotary_dim(head_dim, partial_rotary_factor)
        self.pairs = self.dim // 2
        if not 1.0 < factor <= 1e4:
            raise RopeConfigError(f"the scale factor must be above 1 and at most 10000 (got {factor:g})")
        if not 0 <= keep < self.pairs:
            raise RopeConfigError(f"--keep must be from 0 to {self.pairs - 1} (the model has {self.pairs} rotary "
                                  f"pairs; got {keep})")
        self.max_lambda = 2.0 * factor if max_lambda is None else max_lambda
        if not factor <= self.max_lambda <= 1e5:
            raise RopeConfigError(f"--max-lambda must be at least the scale factor {factor:g} and at most 1e5 "
                                  f"(got {self.max_lambda:g})")
        self.base, self.original_len, self.factor, self.keep = base, original_len, factor, keep
        # YaRN's own temperature must stay reachable (0.1 ln s + 1 passes 1.6 beyond s = e^6)
        self.attention_range = (ATTENTION_RANGE[0], max(ATTENTION_RANGE[1], mscale(factor)))

    def candidate(self, lam: list[float], attention: float, origin: str) -> Candidate:
        lam, attention = self.repair(lam, attention)
        return Candidate("longrope", self.factor, {"short_factor": lam, "long_factor": list(lam),
                                                   "attention_factor": attention}, origin)

    def repair(self, lam: list[float], attention: float) -> tuple[list[float], float]:
        """Into the constraints: 1 <= lambda <= max, the first ``keep`` at 1, non-decreasing (a running maximum)."""
        if len(lam) != self.pairs:
            raise RopeConfigError(f"{len(lam)} factors for {self.pairs} rotary pairs")
        t = torch.tensor(lam, dtype=torch.float64).clamp(1.0, self.max_lambda)
        t[: self.keep] = 1.0
        t = torch.cummax(t, 0).values
        lo, hi = self.attention_range
        return [float(x) for x in t], min(hi, max(lo, float(attention)))

    def table(self, method: str, params: dict | None = None) -> Candidate:
        """``method``'s own table at this space's s as a candidate (exact: ``longrope_form``), repaired."""
        form = longrope_form(method, self.factor, dict(params or {}), self.original_len, self.base, self.dim)
        return self.candidate(form["short_factor"], form["attention_factor"], method)

    def seeds(self) -> list[Candidate]:
        return [self.table(m) for m in SEED_METHODS]

    def mutate(self, c: Candidate, rng: random.Random, sigma: float = 0.15) -> Candidate:
        """Each pair with probability 1/4 (at least one) times exp(N(0, sigma)); the attention factor likewise."""
        lam = list(c.params["short_factor"])
        k = rng.randrange(self.keep, self.pairs)
        lam = [x * math.exp(rng.gauss(0, sigma)) if (i == k or rng.random() < 0.25) else x for i, x in enumerate(lam)]
        att = c.params["attention_factor"] * (math.exp(rng.gauss(0, sigma / 4)) if rng.random() < 0.25 else 1.0)
        return self.candidate(lam, att, "mutation")

    def crossover(self, a: Candidate, b: Candidate, rng: random.Random) -> Candidate:
        """One cut point (LongRoPE crosses over contiguous runs of pairs), the attention factor from either."""
        cut = rng.randrange(1, self.pairs)
        la, lb = a.params["short_factor"], b.params["short_factor"]
        att = (a if rng.random() < 0.5 else b).params["attention_factor"]
        return self.candidate(la[:cut] + lb[cut:], att, "crossover")


def table_key(c: Candidate, dim: int, base: float, original_len: int) -> str:
    """What a model computes under ``c``: its ``dim // 2`` inverse frequencies and its attention scale, to seven
    significant digits. Distinct parameters can make one table (YaRN's ramp ends are floored and ceiled to whole
    pairs, so a range of beta_fast gives the same table: on SmolLM2 at 16k, 2 of the first 6 YaRN candidates), and
    a forward pass on a table already scored would only repeat its score."""
    inv, scale = ROPE_METHODS[c.method].fn(dim, base, 1.0, original_len, c.factor, dict(c.params))
    return json.dumps([float(f"{x:.7g}") for x in inv.tolist()] + [float(f"{scale:.7g}")])


def default_candidate(method: str, factor: float) -> Candidate:
    """A method at its published parameters (its own rope type): the comparison row of a search."""
    return Candidate(method, factor, {}, "default")


@dataclass
class Scored:
    candidate: Candidate
    score: dict  # the objective's numbers; "value" ranks (lower is better), "feasible" first
    generation: int


def rank_key(s: Scored) -> tuple:
    """Feasible first, then the lower value; a non-finite value (a diverged candidate) last of its kind."""
    v = s.score["value"]
    return (not s.score["feasible"], v if math.isfinite(v) else math.inf)


def evolve(space, score: Callable[[Candidate], dict], budget: int, population: int = 8, parents: int = 4,
           seed: int = 0, on_scored: Callable[[Scored], None] | None = None,
           identity: Callable[[Candidate], str] | None = None) -> list[Scored]:
    """Search ``space`` for the candidate with the lowest ``score(c)["value"]`` among feasible ones, scoring at most
    ``budget`` distinct candidates: distinct by ``identity(c)`` (``table_key`` where the model's RoPE is known), else
    by ``Candidate.key``. Returns every scored candidate in order (``generation`` 0: the seeds and their
    mutations)."""
    if budget < 1 or population < 2 or not 1 <= parents < population:
        raise RopeConfigError(f"the search needs budget >= 1, population >= 2 and 1 <= parents < population (got "
                              f"{budget}, {population}, {parents}): each generation makes population - parents "
                              "children")
    rng = random.Random(seed)
    seen: dict[str, Scored] = {}
    history: list[Scored] = []

    same = identity or (lambda c: c.key)

    def add(c: Candidate, gen: int) -> None:
        key = same(c)
        if key in seen or len(history) >= budget:
            return
        s = Scored(c, score(c), gen)
        seen[key] = s
        history.append(s)
        if on_scored:
            on_scored(s)

    seeds = space.seeds()
    for c in seeds:
        add(c, 0)
    tries = 0
    while len(seen) < min(population, budget) and tries < 20 * population:
        add(space.mutate(rng.choice(seeds), rng), 0)
        tries += 1
    gen = 0
    while len(history) < budget:
        gen += 1
        best = sorted(seen.values(), key=rank_key)[:parents]
        before, tries = len(history), 0
        while len(history) - before < population - parents and len(history) < budget and tries < 20 * population:
            tries += 1
            if len(best) > 1 and rng.random() < 0.5:
                a, b = rng.sample(best, 2)
                add(space.crossover(a.candidate, b.candidate, rng), gen)
            else:
                add(space.mutate(rng.choice(best).candidate, rng), gen)
        if len(history) == before:
            break  # the space is exhausted around the parents (every child already scored)
    return history


def best_per_generation(history: list[Scored]) -> list[dict]:
    """The best scored so far after each generation: the search curve."""
    out, best = [], None
    for g in sorted({s.generation for s in history}):
        for s in (x for x in history if x.generation == g):
            if best is None or rank_key(s) < rank_key(best):
                best = s
        out.append({"generation": g, "scored": sum(1 for s in history if s.generation <= g),
                    "value": best.score["value"], "feasible": best.score["feasible"], "origin": best.candidate.origin})
    return out
