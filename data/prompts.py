"""The passkey wording: written once here, used by the synthetic training documents (``data.synthetic``) and scored by
the evaluation (``eval.passkey``), so that training and evaluation cannot drift apart.

The prompt is the standard one of the PI, YaRN and LongLoRA evaluations (after Mohtashami & Jaggi's landmark
attention paper): a task statement, the filler sentence group repeated, the key line, more filler, the question.
"""

from __future__ import annotations

TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
PROMPT_VERSION = 1  # bump when the wording or layout changes: results of different versions are not comparable


def prompt_text(key: str, n_before: int, n_after: int) -> str:
    """The prompt with ``n_before`` filler groups before the key line and ``n_after`` after it."""
    parts = [TASK, " ".join([FILLER] * n_before), KEY_LINE.format(key=key), " ".join([FILLER] * n_after), QUESTION]
    return "\n".join(p for p in parts if p)


def wording() -> list:
    """The version and every piece of the wording: what caches of documents made from it must key on."""
    return [PROMPT_VERSION, TASK, FILLER, KEY_LINE, QUESTION]
