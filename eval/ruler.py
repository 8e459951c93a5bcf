"""A RULER-style synthetic suite (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context
Language Models?", section 3), generated offline: retrieval with several needles, multi-hop tracing and aggregation,
scored by the share of expected answers found, per task, length and depth.

Tasks (each prompt plain text: instruction, context, question, answer prefix, as a base model needs;
``--chat-template`` puts the first three in the tokenizer's chat template as one user message):

- ``niah_single``: one needle "The special number for <key> is <7 digits>." in real text; asked for that key.
- ``niah_multikey``: the same with three more needles of other keys (distractors) at random places.
- ``niah_multivalue``: four needles of the same key with four numbers; all four are expected.
- ``niah_multiquery``: four needles of four keys; all four numbers are asked for at once.
- ``vt``: variable tracking: "VAR QWERT = 12345." then four hops "VAR ASDFG = VAR QWERT." hidden in the text; all
  five names holding the value are expected.
- ``cwe``: common-word extraction: a numbered list where ten words appear 30 times and the others 3 times; the ten
  are expected (no depth: the words are spread over the whole list).
- ``fwe``: frequent-word extraction: coded six-letter words with Zipf counts (alpha 2), the most frequent one
  replaced by "...."; the next three are expected (no depth).

The haystack is the bundled corpus's held-out split (``data/corpus``: public-domain books, never trained on), cut
into sentences and started at a seeded place, so the needle competes with real prose rather than repeated filler.
Keys are two words of that text joined by a hyphen; numbers are 7 digits; words for ``cwe`` come from the same text.
Every prompt is the longest one of at most ``length - max_new_tokens`` tokens (the granularity is one word of the
text, one list item or one coded word); depth d puts the (first) needle after round(d * n) of the n sentences. A
sample is drawn from an RNG seeded by (seed, task, length, index), so one seed gives the same prompts everywhere, and
the depths of one sample share its haystack, keys and numbers: only the needle's place moves, so a heatmap row
compares like with like, and the text before the earlier needle is a prefix that two depths share.

Scoring is RULER's ``string_match_all``: control characters of the answer become newlines, then the score is the
share of expected strings found in it, case-insensitively. Decoding is greedy with a KV cache; the depths of one
sample run one after the other, each reusing the cache of the prefix it shares with the previous one
(``eval.common.SharedPrefix``; ``--no-shared-prefix`` prefills every prompt in full).

    python -m eval.ruler --model smollm2-135m --lengths 4096,8192 --samples 4
    python -m eval.ruler --model smollm2-135m --rope yarn --factor 2 --lengths 16384 --tasks niah_single,vt
"""

from __future__ import annotations

import functools
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from data.corpus import load_corpus
from eval.common import (
    EvalError,
    EvalModel,
    SharedPrefix,
    Timer,
    draw_grid,
    grid_figure,
    log,
    plot_lines,
    shared_prefix_for,
)
from eval.task import EvalTask, task_main
from utils.cli import exit_process, run_cli
from utils.files import save_figure, write_atomic, write_json
from utils.schema import Depth, Length, StrictModel

VERSION = 2  # 2: the depths of one sample share its haystack (the RNG is seeded without the depth)
NUMBER_NEEDLE = "The special number for {key} is {value}."


@dataclass(frozen=True)
class Context:
    """What a task builds from ``n`` haystack units: the context text, the question, the start of the answer (the
    model continues it), the expected answers, and the character offset of the (first) needle in the context (None:
    no depth)."""

    text: str
    question: str
    answer_prefix: str
    answers: tuple[str, ...]
    needle_at: int | None


@dataclass(frozen=True)
class Task:
    """One task: its instruction, its answer budget, whether it has a depth, and its builder
    ``build(rng, n, depth, length) -> Context`` (n: haystack words, list items or coded words)."""

    name: str
    instruction: str
    max_new_tokens: int
    has_depth: bool
    build: Callable[[random.Random, int, float, int], Context]


@dataclass(frozen=True)
class Sample:
    """One prompt: ``ids`` (its tokens, at most ``length - max_new_tokens``), the expected ``answers``, the token
    index where the (first) needle starts, and ``units`` (haystack words, list items or coded words)."""

    task: str
    length: int
    depth: float | None
    index: int
    text: str
    ids: list[int]
    answers: tuple[str, ...]
    needle_token: int | None
    units: int
    max_new_tokens: int


# ------------------------------------------------------------------------------------------- the held-out text


@functools.cache
def sentences() -> tuple[str, ...]:
    """The held-out split cut into sentences (whitespace collapsed; runs shorter than 20 characters dropped)."""
    text = " ".join(d.text for d in load_corpus("heldout"))
    parts = re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text))
    return tuple(p for p in parts if len(p) >= 20)


@functools.cache
def words() -> tuple[str, ...]:
    """Distinct lowercase words of 4-9 letters in the held-out split, sorted (keys and ``cwe``'s words)."""
    return tuple(sorted({w for w in re.findall(r"[a-z]+", " ".join(sentences()).lower()) if 4 <= len(w) <= 9}))


def haystack(rng: random.Random, n: int) -> list[str]:
    """``n`` words of consecutive sentences from a seeded start (wrapping around the split), as sentences; the last
    one is cut after the n-th word, so that the prompt length can be fitted one word at a time."""
    pool = sentences()
    i, units, left = rng.randrange(len(pool)), [], n
    while left > 0:
        head = pool[i % len(pool)].split(" ")[:left]
        units.append(" ".join(head))
        left -= len(head)
        i += 1
    return units


def make_key(rng: random.Random) -> str:
    return "-".join(rng.sample(words(), 2))


def make_number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def join_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def insert(units: list[str], placed: list[tuple[int, str]]) -> tuple[str, list[int]]:
    """``units`` joined by spaces with each (slot, sentence) of ``placed`` put before unit ``slot`` (n: at the end);
    returns the text and the character offset of each placed sentence, in the order given."""
    by_slot: dict[int, list[int]] = {}
    for i, (slot, _) in enumerate(placed):
        by_slot.setdefault(slot, []).append(i)
    pieces, offsets, pos = [], [0] * len(placed), 0
    for slot in range(len(units) + 1):
        for i in by_slot.get(slot, []):
            offsets[i] = pos
            pieces.append(placed[i][1])
            pos += len(placed[i][1]) + 1
        if slot < len(units):
            pieces.append(units[slot])
            pos += len(units[slot]) + 1
    return " ".join(pieces), offsets


# ------------------------------------------------------------------------------------------------- the tasks


def _niah(keys: int, values: int, queries: int) -> Callable[[random.Random, int, float, int], Context]:
    """Needles "The special number for K is V." in ``n`` words of text: ``queries`` keys asked (``values`` numbers
    each), the other ``keys - queries`` keys are distractors; the first asked needle after round(depth x sentences)
    sentences, the rest between random sentences."""

    def build(rng: random.Random, n: int, depth: float, length: int) -> Context:
        units = haystack(rng, n)
        n = len(units)
        names = []
        while len(names) < keys:
            if (k := make_key(rng)) not in names:
                names.append(k)
        asked = names[:queries]
        needles = [(k, make_number(rng)) for k in names for _ in range(values if k in asked else 1)]
        first = round(depth * n)
        placed = [(first if i == 0 else rng.randint(0, n), NUMBER_NEEDLE.format(key=k, value=v))
                  for i, (k, v) in enumerate(needles)]
        text, offsets = insert(units, placed)
        answers = tuple(v for k, v in needles if k in asked)
        many = len(answers) > 1
        q = (f"What are all the special numbers for {join_list(asked)} mentioned in the text?" if many else
             f"What is the special number for {asked[0]} mentioned in the text?")
        prefix = (f"The special numbers for {join_list(asked)} are" if many else
                  f"The special number for {asked[0]} is")
        return Context(text, q, prefix, answers, offsets[0])

    return build


def _vt(rng: random.Random, n: int, depth: float, length: int, hops: int = 4) -> Context:
    """One chain "VAR A = 12345." -> "VAR B = VAR A." ... (``hops`` links) in ``n`` words of text; the first
    statement after round(depth x sentences) sentences, the others at sorted random places after it."""
    units = haystack(rng, n)
    n = len(units)
    names = []
    while len(names) < hops + 1:
        if (v := "".join(rng.choices(string.ascii_uppercase, k=5))) not in names:
            names.append(v)
    value = str(rng.randint(10_000, 99_999))
    first = round(depth * n)
    slots = [first] + sorted(rng.randint(first, n) for _ in range(hops))
    statements = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(hops)]
    text, offsets = insert(units, list(zip(slots, statements)))
    question = f"Question: Which variables are assigned the value {value}, directly or through other variables?"
    return Context(text, question, f"The variables assigned the value {value} are:", tuple(names), offsets[0])


def _cwe(rng: random.Random, n: int, depth: float, length: int, common: int = 10) -> Context:
    """A numbered list: ``common`` words 30 times each and ``n`` other words 3 times each (6 and 1 below 4,096
    tokens, as RULER does, so that short prompts still hold rare words), shuffled; the common words are expected."""
    freq_common, freq_rare = (30, 3) if length >= 4096 else (6, 1)
    chosen = rng.sample(words(), common + n)
    items = chosen[:common] * freq_common + chosen[common:] * freq_rare
    rng.shuffle(items)
    text = " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))
    question = f"Question: What are the {common} most common words in the list above?"
    return Context(text, question, f"The {common} words that appear most often in the list are:",
                   tuple(chosen[:common]), None)


def _fwe(rng: random.Random, n: int, depth: float, length: int, alpha: float = 2.0) -> Context:
    """``n`` coded words (random six-letter strings) whose counts fall as rank^-alpha; the most frequent is shown as
    "...." (noise to ignore), the next three are expected."""
    vocab = max(5, n // 8)
    codes = []
    while len(codes) < vocab:
        if (c := "".join(rng.choices(string.ascii_lowercase, k=6))) not in codes:
            codes.append(c)
    zeta = sum(k ** -alpha for k in range(1, vocab + 1))
    counts = [max(1, int(n * k ** -alpha / zeta)) for k in range(1, vocab + 1)]
    for k in (3, 2, 1):  # ranks 4, 3, 2 strictly ahead of the next: no tie decides the answer at small n
        counts[k] = max(counts[k], counts[k + 1] + 1)
    counts[0] = max(counts[0], counts[1] + 1)
    items = ["...." if k == 0 else c for k, c in enumerate(codes) for _ in range(counts[k])]
    rng.shuffle(items)
    question = "Question: Ignoring the dots '....', what are the three most frequent coded words in the text above?"
    return Context(" ".join(items), question, "The three most frequent coded words are:", tuple(codes[1:4]), None)


_NIAH_INSTRUCTION = ("Some special numbers are hidden in the text below. Memorize them: you will be asked about them "
                     "afterwards.")
TASKS: dict[str, Task] = {t.name: t for t in (
    Task("niah_single", _NIAH_INSTRUCTION, 16, True, _niah(keys=1, values=1, queries=1)),
    Task("niah_multikey", _NIAH_INSTRUCTION, 16, True, _niah(keys=4, values=1, queries=1)),
    Task("niah_multivalue", _NIAH_INSTRUCTION, 48, True, _niah(keys=1, values=4, queries=1)),
    Task("niah_multiquery", _NIAH_INSTRUCTION, 48, True, _niah(keys=4, values=1, queries=4)),
    Task("vt", "Memorize and track the chain of variable assignments hidden in the text below.", 40, True, _vt),
    Task("cwe", "Below is a numbered list of words. Some words appear more often than others; memorize the ones that "
         "appear most often.", 120, False, _cwe),
    Task("fwe", "Read the coded text below and keep count of how often each coded word appears.", 40, False, _fwe),
)}


class RulerSettings(StrictModel):
    """The ``eval.ruler`` section and ``python -m eval.ruler``'s options."""

    tasks: list[Literal[tuple(TASKS)]] = Field(default=list(TASKS), min_length=1)
    """The suite's tasks (default: all seven)."""
    lengths: list[Length] = Field(default=[4096, 8192], min_length=1)
    """Prompt lengths in tokens."""
    depths: list[Depth] = Field(default=[0.0, 0.5, 1.0], min_length=1)
    """Needle depths in [0, 1], for the tasks that have one."""
    samples: int = Field(default=2, ge=1, le=10**4)
    """Prompts per (task, length, depth)."""
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    """Seed of the samples."""
    threshold: float | None = Field(default=None, gt=0.0, le=1.0)
    """Score for the effective length (default: 0.9 x the score at the longest length within the model's original
    context)."""
    chat_template: bool = False
    """Wrap each prompt in the tokenizer's chat template (chat models; default: the plain prompt a base model
    continues)."""
    shared_prefix: bool = True
    """Reuse the KV cache of the prefix a prompt shares with the previous one (the answers are the same up to
    rounding; off: every prompt prefilled in full, slower)."""


# -------------------------------------------------------------------------------------------------- samples


def task_of(name: str) -> Task:
    """The task called ``name``; EvalError naming the valid ones otherwise."""
    if name not in TASKS:
        raise EvalError(f"unknown task '{name}'; choose from {', '.join(TASKS)}")
    return TASKS[name]


def sample_rng(seed: int, task: str, length: int, index: int) -> random.Random:
    """The RNG of one sample, the same at every depth; a string seed hashes the same way on every platform
    (sha512)."""
    return random.Random(f"ruler/{seed}/{task}/{length}/{index}")


def build_sample(tokenizer, task: str, length: int, depth: float | None, index: int, seed: int = 0,
                 chat: bool = False) -> Sample:
    """The longest prompt of ``task`` with at most ``length - max_new_tokens`` tokens (see the module docstring).

    Plain (base models): "instruction, context, question, Answer: <answer prefix>". ``chat``: instruction, context
    and question as one user message through the tokenizer's chat template, then the answer prefix after the
    assistant's turn begins (as RULER does for chat models); EvalError if the tokenizer has no template.
    """
    t = task_of(task)
    if t.has_depth and (depth is None or not 0.0 <= depth <= 1.0):
        raise EvalError(f"{task} needs a depth in [0, 1], got {depth}")
    if chat and not getattr(tokenizer, "chat_template", None):
        raise EvalError("--chat-template: this model's tokenizer has no chat template; drop --chat-template (a base "
                        "model gets the plain prompt)")
    budget = length - t.max_new_tokens
    depth_used = depth if t.has_depth else 0.0

    def encode(text: str) -> list[int]:
        # a chat template writes its own special tokens (BOS included, where the model has one)
        return tokenizer(text, add_special_tokens=not chat).input_ids

    def make(n: int) -> tuple[Context, str, list[int]]:
        ctx = t.build(sample_rng(seed, task, length, index), n, depth_used, length)
        user = f"{t.instruction}\n\n{ctx.text}\n\n{ctx.question}"
        if chat:
            text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                 add_generation_prompt=True) + ctx.answer_prefix
        else:
            text = f"{user}\nAnswer: {ctx.answer_prefix}"
        return ctx, text, encode(text)

    def fits(n: int) -> bool:
        return len(make(n)[2]) <= budget

    if not fits(1):
        raise EvalError(f"length {length} is too short for {task} with {t.max_new_tokens} answer tokens (needs at "
                        f"least {len(make(1)[2]) + t.max_new_tokens}); use a longer --lengths")
    # the largest n that fits: double until one does not, then bisect (lo always fits, hi never does), so that one
    # more unit would not fit
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    n = lo
    ctx, text, ids = make(n)
    needle_token = None
    if ctx.needle_at is not None:
        # the token holding the needle's first character (with a byte-level BPE the space before it is part of that
        # token, so the tokens of the text before the needle would count one too many)
        char = text.index(ctx.text) + ctx.needle_at
        offsets = tokenizer(text, add_special_tokens=not chat, return_offsets_mapping=True).offset_mapping
        needle_token = next(i for i, (_, end) in enumerate(offsets) if end > char)
    return Sample(task, length, depth if t.has_depth else None, index, text, ids, ctx.answers, needle_token, n,
                  t.max_new_tokens)


# -------------------------------------------------------------------------------------------------- scoring


def clean(prediction: str) -> str:
    """RULER's post-processing: control characters become newlines, then the answer is stripped."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def string_match_all(prediction: str, answers: tuple[str, ...] | list[str]) -> float:
    """The share of ``answers`` that occur in the cleaned ``prediction``, case-insensitively (0 to 1)."""
    pred = clean(prediction).lower()
    return sum(a.lower() in pred for a in answers) / len(answers)


# ----------------------------------------------------------------------------------------------- evaluation


def evaluate_ruler(model, tokenizer, tasks: list[str], lengths: list[int], depths: list[float], samples: int,
                   seed: int = 0, shared_prefix: bool = True, chat: bool = False) -> dict:
    """Greedy answers and ``string_match_all`` scores for every task, length and depth (tasks without a depth: one
    cell per length), ``samples`` prompts each. Returns ``cells`` (task, length, depth, score, samples), the prompt
    tokens, the ones taken from the shared-prefix cache (``reused_tokens``) and the seconds spent. Lengths in
    ascending order (dynamic RoPE keeps the largest table it saw); the depths of one sample one after the other, so
    that each reuses the prefix it shares with the previous one (``shared_prefix``, see ``eval.common.SharedPrefix``).
    ``chat``: prompts through the tokenizer's chat template (``build_sample``).
    """
    if samples < 1:
        raise EvalError(f"--samples must be >= 1, got {samples}")
    decoder = SharedPrefix(model, enabled=shared_prefix)
    cells, tokens, seconds = [], 0, 0.0
    for length in sorted(lengths):
        for task in tasks:
            cell_depths = depths if TASKS[task].has_depth else [None]
            runs: dict[float | None, list[dict]] = {d: [] for d in cell_depths}
            for index in range(samples):
                for depth in cell_depths:
                    s = build_sample(tokenizer, task, length, depth, index, seed, chat)
                    with Timer() as t:
                        out = decoder.decode(s.ids, s.max_new_tokens, tokenizer.eos_token_id)
                    answer = tokenizer.decode(out, skip_special_tokens=True)
                    score = string_match_all(answer, s.answers)
                    tokens += len(s.ids)
                    seconds += t.seconds
                    runs[depth].append(dict(index=index, answers=list(s.answers), prediction=answer, score=score,
                                            prompt_tokens=len(s.ids), needle_token=s.needle_token,
                                            seconds=round(t.seconds, 3)))
                    where = "" if depth is None else f" depth {depth:g}"
                    log(f"ruler {task} length {length}{where} #{index}: {score:.2f} ({len(s.ids)} tokens, "
                        f"{t.seconds:.1f} s) answer {answer[:60]!r}")
            cells += [dict(task=task, length=length, depth=d, score=sum(r["score"] for r in runs[d]) / samples,
                           samples=runs[d]) for d in cell_depths]
    return dict(cells=cells, prompt_tokens=tokens, reused_tokens=decoder.reused, seconds=round(seconds, 3))


def effective_length(by_length: dict[str, float], threshold: float) -> int | None:
    """The longest evaluated length whose averaged score is at least ``threshold`` and at every shorter evaluated
    length too (RULER's reading: the context up to which the model holds); None if the shortest already fails."""
    best = None
    for length, score in sorted(((int(k), v) for k, v in by_length.items())):
        if score < threshold:
            break
        best = length
    return best


def summarize(model_info: dict, settings: dict, raw: dict, threshold: float | None) -> dict:
    """Scores per task and length (mean over depths and samples), per length (mean over tasks), the threshold and
    the effective length. ``threshold`` None: 0.9 x the averaged score at the longest evaluated length within the
    model's original context (no threshold and no effective length when no evaluated length is within it, or when
    the model scores 0 there)."""
    cells = sorted(raw["cells"], key=lambda c: (c["task"], c["length"], -1 if c["depth"] is None else c["depth"]))
    by_task: dict[str, dict[str, float]] = {}
    for task in settings["tasks"]:
        for length in sorted(settings["lengths"]):
            scores = [c["score"] for c in cells if c["task"] == task and c["length"] == length]
            by_task.setdefault(task, {})[str(length)] = sum(scores) / len(scores)
    by_length = {str(n): sum(by_task[t][str(n)] for t in by_task) / len(by_task) for n in sorted(settings["lengths"])}
    rule = "given"
    if threshold is None:
        native = [n for n in sorted(settings["lengths"]) if n <= (model_info.get("original_context") or 0)]
        if not native:
            rule = "none: no evaluated length within the original context"
        elif by_length[str(native[-1])] == 0:  # 0.9 x 0 would let every length pass
            rule = f"none: the score at {native[-1]} (within the original context) is 0"
        else:
            threshold = round(0.9 * by_length[str(native[-1])], 4)
            rule = f"0.9 x the score at {native[-1]} (native)"
    return dict(kind="ruler", version=VERSION, model=model_info, settings=settings,
                definition="ruler: string_match_all (share of expected strings in the greedy answer), averaged "
                           "over depths and samples per task and length, then over tasks per length",
                by_task=by_task, by_length=by_length, threshold=threshold, threshold_rule=rule,
                effective_length=None if threshold is None else effective_length(by_length, threshold),
                cells=cells, prompt_tokens=raw["prompt_tokens"], reused_tokens=raw["reused_tokens"],
                seconds=raw["seconds"])


def ruler_markdown(result: dict) -> str:
    lengths = list(result["by_length"])
    lines = [f"# RULER-style suite: {result['model']['label']}", "",
             "| task | " + " | ".join(lengths) + " |", "|---|" + "---|" * len(lengths)]
    for task, scores in result["by_task"].items():
        lines.append(f"| {task} | " + " | ".join(f"{scores[n]:.2f}" for n in lengths) + " |")
    lines.append("| **average** | " + " | ".join(f"**{result['by_length'][n]:.2f}**" for n in lengths) + " |")
    thr = result["threshold"]
    lines += ["", f"Effective length: {result['effective_length'] or 'none'} (threshold "
                  f"{'none' if thr is None else f'{thr:.3f}'}: {result['threshold_rule']}).", "",
              f"Definition: {result['definition']}.", ""]
    return "\n".join(lines)


def write_ruler(result: dict, folder: Path) -> None:
    """ruler.json, ruler.md and one depth x length heatmap per task (ruler_<task>.png) in ``folder``."""
    lengths = sorted(result["settings"]["lengths"])
    for task in result["settings"]["tasks"]:
        cells = [c for c in result["cells"] if c["task"] == task]
        depths = sorted({c["depth"] for c in cells}, key=lambda d: -1 if d is None else d)
        rows = [("all" if d is None else f"{d:g}", d) for d in depths]
        fig = grid_figure(lengths, len(rows))
        ax = fig.subplots()
        im = draw_grid(ax, lengths, rows, {(c["length"], c["depth"]): c["score"] for c in cells}, ".2f", "depth",
                       f"{task}: {result['model']['label']}")
        fig.colorbar(im, ax=ax, label="score")
        save_figure(fig, folder / f"ruler_{task}.png")
    write_atomic(folder / "ruler.md", ruler_markdown(result))
    write_json(folder / "ruler.json", result)


def run(em: EvalModel, s: RulerSettings) -> dict:
    """``EvalTask.run``: the suite on a loaded model with settings ``s``."""
    tasks = list(dict.fromkeys(s.tasks))
    share = shared_prefix_for(s.shared_prefix, em.info)
    settings = dict(tasks=tasks, lengths=s.lengths, depths=s.depths, samples=s.samples, seed=s.seed,
                    max_new_tokens={t: TASKS[t].max_new_tokens for t in tasks}, shared_prefix=share,
                    chat_template=s.chat_template)
    log(f"ruler: {em.info['label']} ({em.info['model']})")
    with torch.inference_mode():
        raw = evaluate_ruler(em.model, em.tokenizer, tasks, s.lengths, s.depths, s.samples, s.seed, share,
                             s.chat_template)
    return summarize(em.info, settings, raw, s.threshold)


def plot(entries: list[tuple[dict, dict]], path: Path) -> None:
    """``eval.compare``'s picture: the suite's score (mean over tasks) against length, one line per run."""
    plot_lines(entries, "by_length", "RULER-style score (mean over tasks)", "RULER-style suite by context length",
               path, unit_range=True)


def check(s: RulerSettings, tokenizer) -> None:
    """``EvalTask.check``: every task's prompt and answer fit the shortest length under ``tokenizer`` (and its chat
    template, if asked for, exists)."""
    for task in dict.fromkeys(s.tasks):
        build_sample(tokenizer, task, min(s.lengths), s.depths[0] if TASKS[task].has_depth else None, 0, s.seed,
                     s.chat_template)


EVAL_TASK = EvalTask(
    name="ruler",
    module="eval.ruler",  # not __name__: that is "__main__" under `python -m`
    description="The RULER-style synthetic suite: needles, variable tracking, word extraction (eval/ruler.py).",
    settings=RulerSettings,
    run=run,
    write=write_ruler,
    summary=lambda result: {**{f"ruler@{n}": v for n, v in result["by_length"].items()},
                            "ruler_effective": result["effective_length"]},
    metrics=lambda s: [f"ruler@{n}" for n in sorted(set(s.lengths))] + ["ruler_effective"],
    goal="maximize",
    objective=lambda s: f"ruler@{max(s.lengths)}",
    files=("ruler.json", "ruler.md", "ruler_*.png"),
    formats=(("ruler@", ".2f"),),
    plot=plot,
    check=check,
    renamed={"ruler_lengths": "lengths", "ruler_tasks": "tasks", "ruler_depths": "depths",
             "ruler_samples": "samples"},
)


def main(argv: list[str] | None = None) -> dict:
    return task_main(EVAL_TASK, argv, __doc__)


if __name__ == "__main__":
    exit_process(run_cli(main))
