"""The passkey wording: written once here, used by the synthetic training documents (``data.synthetic``) and scored by
the evaluation (``eval.passkey``), so that training and evaluation cannot drift apart.

The prompt is the standard one of the PI, YaRN and LongLoRA evaluations (after Mohtashami & Jaggi's landmark
attention paper): a task statement, the filler sentence group repeated, the key line, more filler, the question.
"""

from __future__ import annotations

import random

TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
PROMPT_VERSION = 1  # bump when the wording or layout changes: results of different versions are not comparable


SENTENCES = [f"{s}." for s in FILLER.removesuffix(".").split(". ")]  # the filler group's five sentences


def filler_text(n_groups: int, rng: random.Random | None = None) -> str:
    """``n_groups`` filler groups: the evaluation's group repeated or, with ``rng``, as many sentences drawn from the
    group at random. Repeated groups put every distance across the filler on a lattice of the group's length
    (29 testbed tokens), which a model can exploit with a rotary pair that turns about once per group instead of
    looking the key up by content (docs/testbed.md, runs 8-9); drawn sentences (4-7 tokens) spread distances evenly."""
    if rng is None:
        return " ".join([FILLER] * n_groups)
    return " ".join(rng.choice(SENTENCES) for _ in range(n_groups * len(SENTENCES)))


def prompt_text(key: str, n_before: int, n_after: int, rng: random.Random | None = None) -> str:
    """The prompt with ``n_before`` filler groups before the key line and ``n_after`` after it (``filler_text``: drawn
    sentences with ``rng``; the evaluation repeats the group)."""
    parts = [TASK, filler_text(n_before, rng), KEY_LINE.format(key=key), filler_text(n_after, rng), QUESTION]
    return "\n".join(p for p in parts if p)


def wording() -> list:
    """The version and every piece of the wording: what caches of documents made from it must key on."""
    return [PROMPT_VERSION, TASK, FILLER, KEY_LINE, QUESTION]
