"""Synthetic training documents that teach retrieval inside a short native window: ``passkey``, ``copy``, ``repeat``.

A model only learns to retrieve a pass key if it sees retrieval during training. Three generators:

- ``passkey``: the evaluation's own prompt (``data.prompts.prompt_text``: task statement, filler groups, the key line
  at some depth, more filler, the question) followed by its answer, `` NNNNN.``. The wording lives in
  data/prompts.py only, and eval.passkey scores the same prompt, so training and evaluation cannot drift apart.
  The number of filler groups is drawn uniformly from ``min_filler`` (default 0) to ``max_filler`` and the key's
  depth uniformly among the possible positions, so the key-to-question distance is uniform over the document.
  A ``min_filler`` near ``max_filler`` gives documents that fill the window, whose distances cover it evenly, as
  the evaluation's prompts at the native length do; from 0 the distances crowd at the short end.
- ``copy``: ``Numbers: a b. Again: a b.`` with 1 to ``max_numbers`` random 5-digit numbers. Every digit of the second
  list can only be predicted by looking it up in the first: the look-up a passkey answer needs (an induction head),
  with a dense signal and, in documents of 17-29 tokens, little to search through. Measured on the testbed
  (docs/testbed.md): without these short documents the model never learned to copy within our budget; with them it
  did. ``min_filler`` / ``max_filler`` (default 0) put that many of the passkey prompt's filler groups between the
  list and its repeat, drawn uniformly: every digit of the repeat is then a look-up across the filler, five per
  number where a passkey document has one answer.

- ``repeat``: ``Words: w1 ... wn. Again: w1 ... wn.`` with ``min_words``-``max_words`` words drawn at random from the
  bundled train split's vocabulary (``corpus_words``), and optionally filler between, as ``copy`` has. The repeated
  random sequence is the classic signal for an induction head (Olsson et al. 2022, "In-context learning and
  induction heads"): each word of the repeat follows its predecessor only in the list, at a distance that changes
  from document to document, so neither the words nor their positions predict it, only a look-up by content does;
  a list of n words gives n such look-ups (a ``copy`` number gives five, all among ten digit tokens).

All three take ``shuffle`` (0 or 1, default 0): with 1 the filler groups are as many of the group's sentences drawn at
random (``data.prompts.filler_text``), so that the distances across the filler do not fall on a lattice of the group's
length: a model trained only on repeated groups can find the key by position (a rotary pair that turns about once per
group) instead of by content, and then loses it where that pair's phase drifts (docs/testbed.md, runs 8-9).

A run config uses them as data sources (``kind: synthetic``; ``max_docs`` documents each)::

    sources:
      - {kind: bundled, split: train}
      - {kind: synthetic, name: passkey, max_docs: 8000, params: {max_filler: 5, seed: 0}}
      - {kind: synthetic, name: copy, max_docs: 30000, params: {max_numbers: 2, seed: 0}}

``max_filler`` bounds a passkey document's length: with the testbed tokenizer it holds about 91 + 29.5 tokens per
filler group, so ``max_filler: 5`` stays under 256 with its EOS (tests/test_testbed.py checks it), and
``{min_filler: 40, max_filler: 67}`` gives documents of 1,253-2,036 tokens that fill a 2,048-token row. Documents are a
pure function of (generator, index, params): the same settings give the same documents on every machine.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from functools import lru_cache
from typing import Any

from data.config import SYNTHETIC_PARAMS, check_synthetic_params
from data.corpus import load_corpus, manifest
from data.prompts import filler_text, prompt_text, wording
from utils.files import json_digest

GENERATOR_VERSION = 1  # bump when the document layout changes: the packed-set cache key includes it


def passkey_document(key: str, n_before: int, n_after: int, rng: random.Random | None = None) -> str:
    """One training document: the evaluation prompt with the key after ``n_before`` filler groups and ``n_after``
    groups before the question (drawn sentences with ``rng``: ``data.prompts.filler_text``), then the answer
    (`` <key>.``, as the model should continue the prompt)."""
    return f"{prompt_text(key, n_before, n_after, rng)} {key}."


def passkey_sample(index: int, max_filler: int, seed: int = 0, min_filler: int = 0,
                   shuffle: int = 0) -> tuple[str, str, int, int]:
    """Document ``index`` of the stream: (text, key, n_before, n_after); a pure function of its arguments."""
    rng = random.Random(f"synthetic-passkey/{seed}/{index}")
    n = rng.randint(min_filler, max_filler)
    before = rng.randint(0, n)
    key = str(rng.randint(10000, 99999))
    return passkey_document(key, before, n - before, rng if shuffle else None), key, before, n - before


def copy_sample(index: int, max_numbers: int, seed: int = 0, min_filler: int = 0, max_filler: int = 0,
                shuffle: int = 0) -> str:
    """Document ``index`` of the ``copy`` stream: 1 to ``max_numbers`` random 5-digit numbers, then (with
    ``max_filler``) ``min_filler``-``max_filler`` filler groups (drawn sentences with ``shuffle``), then the same
    list again. Every digit of the second list is predictable only by looking it up in the first, so these documents
    train the look-up (an induction head) with a dense signal; the passkey answer is that look-up."""
    rng = random.Random(f"synthetic-copy/{seed}/{index}")
    numbers = " ".join(str(rng.randint(10000, 99999)) for _ in range(rng.randint(1, max_numbers)))
    # the filler is drawn after the numbers, so that the numbers (and, without filler, the documents) are the
    # stream's as before
    return list_and_repeat("Numbers", numbers, rng, min_filler, max_filler, shuffle)


def list_and_repeat(label: str, items: str, rng: random.Random, min_filler: int, max_filler: int,
                    shuffle: int) -> str:
    """``<label>: <items>. [filler] Again: <items>.``, the layout of ``copy`` and ``repeat``: ``min_filler``-
    ``max_filler`` filler groups drawn from ``rng`` (their sentences too, with ``shuffle``)."""
    filler = filler_text(rng.randint(min_filler, max_filler), rng if shuffle else None)
    return f"{label}: {items}.{' ' + filler if filler else ''} Again: {items}."


@lru_cache(maxsize=1)
def corpus_words() -> tuple[str, ...]:
    """The ``repeat`` documents' vocabulary: every lowercase word of 2+ letters that occurs at least 50 times in the
    bundled train split, sorted (2,155 words, 1.4 testbed tokens each on average: most are one token, so the look-up
    matches whole words; a pure function of the corpus, which its sha256s pin)."""
    counts = Counter(w for doc in load_corpus("train") for w in re.findall(r"[a-z]+", doc.text.lower()))
    return tuple(sorted(w for w, n in counts.items() if n >= 50 and len(w) >= 2))


def repeat_sample(index: int, min_words: int, max_words: int, seed: int = 0, min_filler: int = 0,
                  max_filler: int = 0, shuffle: int = 0) -> str:
    """Document ``index`` of the ``repeat`` stream: ``min_words``-``max_words`` words drawn from ``corpus_words``,
    then ``min_filler``-``max_filler`` filler groups (drawn sentences with ``shuffle``), then the same words again."""
    rng = random.Random(f"synthetic-repeat/{seed}/{index}")
    vocab = corpus_words()
    words = " ".join(rng.choice(vocab) for _ in range(rng.randint(min_words, max_words)))
    return list_and_repeat("Words", words, rng, min_filler, max_filler, shuffle)


def generate(name: str, n_docs: int, params: dict[str, Any]) -> list[str]:
    """``n_docs`` documents of generator ``name`` with ``params`` (see module docstring)."""
    check_synthetic_params(name, params)
    p = {**SYNTHETIC_PARAMS[name], **params}
    if name == "copy":
        return [copy_sample(i, p["max_numbers"], p["seed"], p["min_filler"], p["max_filler"], p["shuffle"])
                for i in range(n_docs)]
    if name == "repeat":
        return [repeat_sample(i, p["min_words"], p["max_words"], p["seed"], p["min_filler"], p["max_filler"],
                              p["shuffle"]) for i in range(n_docs)]
    return [passkey_sample(i, p["max_filler"], p["seed"], p["min_filler"], p["shuffle"])[0] for i in range(n_docs)]


def fingerprint(name: str) -> str:
    """What the packed-set cache must know beyond the source's settings: the generator's version, the prompt
    wording it copies from data/prompts.py (a changed wording must not reuse old rows) and, for ``repeat``, the
    train split's sha256s (its vocabulary)."""
    corpus = [e["sha256"] for e in manifest() if e["split"] == "train"] if name == "repeat" else []
    return json_digest([GENERATOR_VERSION, name, *wording(), *corpus])
