"""Training-free scoring of RoPE candidates at a target length: the measured part of ``python -m ropescale plan``.

Each candidate (method, factor) is applied to the model without training, and the loss of every position of
windows of ``target`` tokens from held-out text is measured with eval.perplexity's scorer (``score``: one forward per
window, the chunked loss). From the per-position loss:

- ``target_nll``: the mean over every position of the window (what the extended model costs at the target length);
- ``native_nll``: the mean over positions below L, and ``native_cost`` = that minus the unscaled model's own
  ``native_nll`` (what the method costs inside the window the model was trained on; > 0 = worse);
- ``buckets``: the mean over equal position ranges (``perplexity.position_buckets``);
- ``effective_context``: the start of the first bucket past L whose mean loss exceeds ``reference_loss`` by more
  than ``tolerance`` nats (the target itself when none does), where ``reference_loss`` is the unscaled model's mean
  loss over positions L/2 .. L-1: the second half of its trained window, where it has seen plenty of context (the
  first positions of any window cost more whatever the method, so they are no yardstick).

The unscaled model (method ``none``) is scored first as the reference. ``search="scan"`` (the default) scores each
method's factors in increasing order and stops that method at the first factor whose target loss is above the best
loss of its smaller factors: the loss of a training-free method against s is unimodal in every plan measured
(results/plan: SmolLM2 at 16k, the testbed at 4x and 8x), so the factors past the rise would not be picked, and
skipping them halves the forwards (one forward at 16k is about two minutes on 2 cores). ``search="grid"`` scores
every candidate.
"""

from __future__ import annotations

import torch

from eval.common import EvalError, Timer, load_eval_model, log
from eval.perplexity import position_buckets, score, token_stream, tokenize_documents

REFERENCE = ("none", 1.0)


def position_nll(model, ids: torch.Tensor, length: int, windows: int, chunk_size: int = 1024) -> torch.Tensor:
    """Mean NLL per predicted position over the first ``windows`` non-overlapping windows of ``length`` tokens of
    ``ids``: float ``[length - 1]`` (entry t = prediction of token t+1)."""
    if ids.numel() < length * windows:
        raise EvalError(f"the text has {ids.numel()} tokens, fewer than {windows} window(s) of {length}; use more "
                        "data (--data), fewer --windows or a shorter --target")
    total = torch.zeros(length - 1, dtype=torch.float64)
    for k in range(windows):
        r = score(model, ids, [(k * length, (k + 1) * length, k * length + 1)], chunk_size=chunk_size,
                  keep_first=True)
        total += r["first_nll"].double()
    return total / windows


def summarize(nll: torch.Tensor, original_len: int, reference: dict | None, tolerance: float,
              n_buckets: int) -> dict:
    """The numbers of one candidate from its per-position NLL ``[target - 1]`` (see the module docstring);
    ``reference`` is the unscaled model's summary (None: this is it)."""
    native = float(nll[: original_len - 1].mean())
    settled = float(nll[original_len // 2 - 1 : original_len - 1].mean())  # positions L/2 .. L-1
    ref_native = native if reference is None else reference["native_nll"]
    ref_loss = settled if reference is None else reference["reference_loss"]
    buckets = position_buckets(nll, n_buckets)
    effective = nll.numel() + 1
    for b in buckets:
        if b["start"] >= original_len and b["nll"] > ref_loss + tolerance:
            effective = b["start"]
            break
    return {"target_nll": float(nll.mean()), "native_nll": native, "native_cost": native - ref_native,
            "reference_loss": ref_loss, "effective_context": effective, "buckets": buckets}


SEARCHES = ("scan", "grid")


def score_candidates(spec: str, candidates: list[tuple[str, float]], texts: list[str], target: int,
                     original_len: int, windows: int = 1, n_buckets: int = 16, tolerance: float = 0.1,
                     dtype: str = "float32", chunk_size: int = 1024,
                     search: str = "scan") -> tuple[list[dict], list[dict]]:
    """Score the unscaled model and the (method, factor) ``candidates`` on ``windows`` windows of ``target`` tokens.

    Returns (rows, skipped): one row per scored model (reference first; method, factor, seconds and
    ``summarize``'s numbers), and one {method, factor, reason} per candidate ``search="scan"`` left out (see the
    module docstring)."""
    if target <= original_len:
        raise EvalError(f"--target {target} must be above the original length {original_len}")
    if windows < 1 or n_buckets < 1 or tolerance <= 0:
        raise EvalError(f"--windows and --buckets must be >= 1 and --tolerance > 0 (got {windows}, {n_buckets}, "
                        f"{tolerance})")
    if search not in SEARCHES:
        raise EvalError(f"--search must be one of {', '.join(SEARCHES)} (got {search!r})")
    methods = list(dict.fromkeys(m for m, f in candidates if (m, f) != REFERENCE))
    order = [REFERENCE] + [(m, f) for m in methods for f in sorted({f for mm, f in candidates if mm == m})]
    rows, skipped, ids, reference, rose = [], [], None, None, {}
    for method, factor in order:
        if method in rose:
            skipped.append({"method": method, "factor": float(factor), "reason": rose[method]})
            continue
        variant = {} if (method, factor) == REFERENCE else dict(method=method, factor=factor, params=None,
                                                                  original_len=original_len, rebase=False)
        em = load_eval_model(spec, variant, dtype)
        if ids is None:
            # the texts end to end, as eval.perplexity's sliding mode joins them: long [n]
            ids = torch.tensor(token_stream(tokenize_documents(em.tokenizer, texts), em.tokenizer.eos_token_id))
        with torch.inference_mode(), Timer() as timer:
            nll = position_nll(em.model, ids, target, windows, chunk_size)
        del em
        row = {"method": method, "factor": float(factor), "seconds": round(timer.seconds, 1),
               **summarize(nll, original_len, reference, tolerance, n_buckets)}
        reference = reference or row
        log(f"plan: {method} x{factor:g}: loss {row['target_nll']:.4f} at {target}, native cost "
            f"{row['native_cost']:+.4f}, effective context {row['effective_context']} ({timer.seconds:.0f} s)")
        best = min((r for r in rows if r["method"] == method), key=lambda r: r["target_nll"], default=None)
        rows.append(row)
        if search == "scan" and best is not None and row["target_nll"] > best["target_nll"]:
            rose[method] = (f"not scored: the loss rose at x{factor:g} ({row['target_nll']:.4f} > "
                            f"{best['target_nll']:.4f} at x{best['factor']:g})")
    for s in skipped:
        log(f"plan: {s['method']} x{s['factor']:g} {s['reason']}")
    return rows, skipped


def recommend(rows: list[dict], native_tolerance: float = 0.05) -> list[dict]:
    """Per method, the factor with the lowest target-length loss among those whose native cost is at most
    ``native_tolerance`` nats (all of them when none is), ranked across methods by that loss; each with ``why``."""
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        if r["method"] != REFERENCE[0]:
            by_method.setdefault(r["method"], []).append(r)
    best = []
    for same in by_method.values():
        ok = [x for x in same if x["native_cost"] <= native_tolerance] or same
        best.append(min(ok, key=lambda x: x["target_nll"]))
    ranked = sorted(best, key=lambda x: x["target_nll"])
    return [{**r, "rank": k + 1,
             "why": f"loss {r['target_nll']:.4f} at the target, native cost {r['native_cost']:+.4f} nats, "
                    f"effective context {r['effective_context']:,}"} for k, r in enumerate(ranked)]
