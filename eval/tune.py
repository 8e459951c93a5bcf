"""The measured part of ``python -m ropescale tune``: scoring candidates of ``ropescale.search`` on a model, training
free, and the final comparison on text the search did not see.

Objectives (lower is better; the unscaled model's native loss is measured once as the reference):

- ``ppl``: the mean loss over every position of ``windows`` windows of ``target`` tokens of the search stretch
  (``eval.candidates.position_nll``, eval.perplexity's scorer), feasible when the candidate's native cost (its loss
  over positions below L minus the unscaled model's there) is at most ``native_tolerance`` nats, the planner's rule;
- ``needle``: the mean loss of the answer tokens of pass-key prompts of ``target`` tokens (the wording of
  data/prompts, the answer as data.synthetic's training documents write it) at ``NEEDLE_DEPTHS``, with keys from
  their own seed (``tune/...``), never the evaluation's (LongRoPE2's needle-driven search, 2025); always feasible;
- ``mixed``: ``ppl``'s loss plus ``needle``'s, with ``ppl``'s feasibility.

The text: the held-out token stream (eval.perplexity's, documents joined) is split in two stretches: the search
scores the first ``windows`` windows, the report the last ``report_windows`` windows; they never overlap.
"""

from __future__ import annotations

import random
import time

import torch

from data.prompts import prompt_text
from data.synthetic import passkey_document
from eval.candidates import position_nll, summarize
from eval.common import EvalError, load_eval_model, log
from eval.passkey import build_prompt
from eval.perplexity import score, token_stream, tokenize_documents
from ropescale.search import Candidate

OBJECTIVES = ("ppl", "needle", "mixed")
NEEDLE_DEPTHS = (0.125, 0.375, 0.625, 0.875)  # between the evaluation's 0, 0.25, ..., 1


def split_stream(ids: torch.Tensor, target: int, windows: int, report_windows: int) -> tuple[torch.Tensor,
                                                                                                   torch.Tensor]:
    """(search, report): the first ``windows`` x ``target`` tokens of ``ids`` and its last ``report_windows`` x
    ``target``; long ``[n]`` each. Refused when they would overlap."""
    need = (windows + report_windows) * target
    if ids.numel() < need:
        raise EvalError(f"the held-out text has {ids.numel():,} tokens; {windows} search and {report_windows} "
                        f"report window(s) of {target:,} need {need:,}: give more text (--data), or fewer windows")
    return ids[: windows * target], ids[ids.numel() - report_windows * target:]


def needle_documents(tokenizer, target: int, depths: tuple[float, ...] = NEEDLE_DEPTHS,
                     seed: int = 0) -> list[tuple[torch.Tensor, int]]:
    """(ids ``[n]``, answer start) of one pass-key document per depth, as long as fits in ``target`` tokens: the
    evaluation's prompt (``eval.passkey.build_prompt``) followed by its answer."""
    docs = []
    for i, depth in enumerate(depths):
        key = str(random.Random(f"tune/{seed}/{target}/{depth:.6f}/{i}").randint(10000, 99999))
        answer = len(tokenizer(passkey_document(key, 1, 1)).input_ids) - len(tokenizer(prompt_text(key, 1, 1))
                                                                              .input_ids)
        p = build_prompt(tokenizer, target, depth, key, answer + 1)
        ids = tokenizer(passkey_document(key, p.n_before, p.n_filler - p.n_before)).input_ids
        if ids[: len(p.ids)] != p.ids:
            raise EvalError("the tokenizer does not keep the prompt's tokens when the answer follows; use --objective "
                            "ppl with this tokenizer")
        docs.append((torch.tensor(ids), len(p.ids)))
    return docs


def answer_nll(model, docs: list[tuple[torch.Tensor, int]], chunk_size: int = 1024) -> float:
    """Mean loss of the answer tokens (teacher-forced) over ``docs``: eval.perplexity's scorer on the whole document,
    scoring from the answer's first token (the chunked loss: no [T, vocab] logits)."""
    total, count = 0.0, 0
    for ids, start in docs:
        r = score(model, ids, [(0, ids.numel(), start)], chunk_size=chunk_size)
        total, count = total + float(r["nll_sum"]), count + r["tokens"]
    return total / count


def forwards_per_candidate(kind: str, windows: int) -> int:
    """Forward passes one candidate costs under objective ``kind``."""
    return (windows if kind != "needle" else 0) + (len(NEEDLE_DEPTHS) if kind != "ppl" else 0)


def check_settings(kind: str, target: int, original_len: int, windows: int, report_windows: int,
                   native_tolerance: float) -> None:
    """The objective's settings, checked before anything is loaded (one-line EvalError)."""
    if kind not in OBJECTIVES:
        raise EvalError(f"--objective must be one of {', '.join(OBJECTIVES)} (got {kind!r})")
    if target <= original_len:
        raise EvalError(f"--target {target} must be above the original length {original_len}")
    if not (1 <= windows <= 1000 and 1 <= report_windows <= 1000 and 0 <= native_tolerance <= 10):
        raise EvalError(f"--windows and --report-windows must be 1 to 1000 and --native-tolerance 0 to 10 nats "
                        f"(got {windows}, {report_windows}, {native_tolerance})")


class Objective:
    """``objective(candidate) -> numbers``: loads ``spec`` under the candidate (training-free) and scores it; see
    the module docstring. ``forwards`` counts the model forwards spent."""

    def __init__(self, spec: str, texts: list[str], target: int, original_len: int, kind: str = "ppl",
                 windows: int = 2, report_windows: int = 2, native_tolerance: float = 0.05, dtype: str = "float32",
                 chunk_size: int = 1024):
        check_settings(kind, target, original_len, windows, report_windows, native_tolerance)
        self.spec, self.target, self.original_len, self.kind = spec, target, original_len, kind
        self.windows, self.report_windows, self.native_tolerance = windows, report_windows, native_tolerance
        self.dtype, self.chunk_size, self.forwards = dtype, chunk_size, 0
        em = load_eval_model(spec, {}, dtype)
        ids = torch.tensor(token_stream(tokenize_documents(em.tokenizer, texts), em.tokenizer.eos_token_id))
        self.search_ids, self.report_ids = split_stream(ids, target, windows, report_windows)
        self.stretches = {"search": [0, windows * target], "report": [ids.numel() - report_windows * target,
                                                                       ids.numel()], "tokens": ids.numel()}
        self.needles = needle_documents(em.tokenizer, target) if kind != "ppl" else []
        with torch.inference_mode():
            self.reference = {part: self._ppl(em.model, part) for part in ("search", "report")}

    def _ppl(self, model, part: str, reference: dict | None = None) -> dict:
        ids, n = (self.search_ids, self.windows) if part == "search" else (self.report_ids, self.report_windows)
        self.forwards += n
        nll = position_nll(model, ids, self.target, n, self.chunk_size)
        out = summarize(nll, self.original_len, reference, 0.1, 16)
        return {k: out[k] for k in ("target_nll", "native_nll", "native_cost", "reference_loss")}

    def load(self, c: Candidate):
        return load_eval_model(self.spec, dict(method=c.method, factor=c.factor, params=dict(c.params),
                                               original_len=self.original_len, rebase=False), self.dtype).model

    def __call__(self, c: Candidate) -> dict:
        t0, model = time.perf_counter(), self.load(c)
        out: dict = {}
        with torch.inference_mode():
            if self.kind != "needle":
                out.update(self._ppl(model, "search", self.reference["search"]))
            if self.kind != "ppl":
                self.forwards += len(self.needles)
                out["needle_nll"] = answer_nll(model, self.needles)
        value = out.get("target_nll", 0.0) + out.get("needle_nll", 0.0)  # each objective adds the losses it scored
        feasible = self.kind == "needle" or out["native_cost"] <= self.native_tolerance
        return {**out, "value": value, "feasible": feasible, "seconds": round(time.perf_counter() - t0, 2)}

    def report(self, c: Candidate) -> dict:
        """The candidate on the report stretch (text the search never scored): loss at the target, native cost."""
        with torch.inference_mode():
            return self._ppl(self.load(c), "report", self.reference["report"])


def log_scored(s) -> None:
    sc = s.score
    what = f"loss {sc['target_nll']:.4f}, native cost {sc['native_cost']:+.4f}" if "target_nll" in sc else ""
    if "needle_nll" in sc:
        what += (", " if what else "") + f"needle {sc['needle_nll']:.4f}"
    log(f"tune: gen {s.generation} {s.candidate.origin}: {what}{'' if sc['feasible'] else ' (over the native cost)'}"
        f" ({sc['seconds']:.1f} s)")
