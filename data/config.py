"""The data config: where the text comes from and how it becomes rows (``DataConfig``, one ``SourceSpec`` per source).

Every field is documented where it is declared; ``configs/schema.py`` embeds ``DataConfig`` as the ``data:`` section
of a run config. Validation rejects combinations that would train on something other than what was asked (a
boundary block outside ``reset`` mode, a PoSE target no longer than the window).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from utils.cli import UserError
from utils.schema import StrictModel


class DataError(UserError):
    """Data that cannot be turned into rows; the message is one line naming the problem and the fix."""


# The settings of each synthetic generator (data/synthetic.py) and their defaults; checked here, with the rest of a
# source, when a config is loaded.
SYNTHETIC_PARAMS = {"passkey": {"min_filler": 0, "max_filler": 5, "seed": 0, "shuffle": 0},
                    "copy": {"max_numbers": 12, "min_filler": 0, "max_filler": 0, "seed": 0, "shuffle": 0},
                    "repeat": {"min_words": 5, "max_words": 50, "min_filler": 0, "max_filler": 0, "seed": 0,
                               "shuffle": 0}}
_MAY_BE_ZERO = {"seed", "min_filler", "max_filler", "shuffle"}  # numbers and words counted must be at least 1
# Upper bounds (a setting past them is a typo, not a document any window holds): 12 numbers, 2,000 words, 1,000
# filler groups (about 30,000 tokens), seeds below 2^31.
_MOST = {"max_numbers": 12, "min_words": 2000, "max_words": 2000, "min_filler": 1000, "max_filler": 1000,
         "seed": 2**31 - 1}


def check_synthetic_params(name: str, params: dict[str, Any]) -> None:
    """Raise DataError (one line) unless ``params`` are valid settings of synthetic generator ``name``."""
    if name not in SYNTHETIC_PARAMS:
        raise DataError(f"unknown synthetic generator '{name}'; use one of: {', '.join(SYNTHETIC_PARAMS)}")
    valid = SYNTHETIC_PARAMS[name]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise DataError(f"synthetic {name}: unknown params {', '.join(unknown)}; valid: {', '.join(valid)}")
    for key, value in params.items():
        lowest = 0 if key in _MAY_BE_ZERO else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < lowest:
            kind = "a non-negative" if lowest == 0 else "a positive"
            raise DataError(f"synthetic {name}: params.{key} must be {kind} integer, got {value!r}")
        if key in _MOST and value > _MOST[key]:
            raise DataError(f"synthetic {name}: params.{key} ({value}) is above its limit {_MOST[key]}; lower it")
    merged = {**valid, **params}
    if merged["shuffle"] > 1:
        raise DataError(f"synthetic {name}: params.shuffle must be 0 (repeated filler groups) or 1 (sentences drawn "
                        f"at random), got {merged['shuffle']}")
    for low, high in (("min_filler", "max_filler"), ("min_words", "max_words")):
        if low in merged and merged[low] > merged[high]:
            raise DataError(f"synthetic {name}: params.{low} ({merged[low]}) exceeds params.{high} "
                            f"({merged[high]}); lower {low} or raise {high}")


class SourceSpec(StrictModel):
    kind: Literal["bundled", "hub", "files", "synthetic"]
    """`bundled`: the corpus in data/corpus (split: train, heldout or all); `hub`: `datasets.load_dataset(name,
    config, split=split)` (a hub id, or a local dataset folder); `files`: local .txt (one document per file),
    .jsonl and .parquet files (one document per record), optionally .gz-compressed, given by `path`; `synthetic`:
    `max_docs` documents made by the generator `name` (data/synthetic.py: `passkey`, `copy`, `repeat`) with
    `params`."""
    name: str | None = None
    """Hub dataset id (e.g. `emozilla/pg19`) or local dataset folder; `hub` only. For `synthetic`: the generator."""
    path: str | None = None
    """A file, a folder (searched recursively for supported files) or a glob (`data/**/*.jsonl`); `files` only."""
    split: str = "train"
    """Split to read: the corpus split for `bundled`, the dataset split for `hub`; unused for `files`."""
    text_field: str = "text"
    """Field holding the document text in jsonl/parquet records and hub datasets."""
    config: str | None = None
    """Hub dataset configuration name (the second argument of `datasets.load_dataset`)."""
    revision: str | None = None
    """Hub dataset revision (a commit, tag or branch); pin it so that the cache key names exactly this data."""
    streaming: bool = False
    """Read a hub dataset (or parquet files) as a stream instead of downloading and converting it whole; set
    `max_docs` with it for very large sets (PG19, RedPajama)."""
    max_docs: int | None = Field(default=None, gt=0)
    """Read at most this many documents (before filters) from the source."""
    params: dict[str, Any] = {}
    """Generator settings; `synthetic` only (passkey: `min_filler`, `max_filler`, `seed`, `shuffle`; copy:
    `max_numbers`, `min_filler`, `max_filler`, `seed`, `shuffle`; repeat: `min_words`, `max_words`, `min_filler`,
    `max_filler`, `seed`, `shuffle`; see data/synthetic.py)."""
    weight: float = Field(default=1.0, gt=0)
    """How many times each of the source's documents enters one pass: 2.0 repeats every document twice, 0.5 keeps a
    seeded half of them, 1.5 all of them plus a seeded half again. Mixes sources by (document-count) weight."""

    @model_validator(mode="after")
    def _where(self):
        if self.kind == "hub" and not self.name:
            raise ValueError("a hub source needs `name` (a dataset id or a local dataset folder)")
        if self.kind == "files" and not self.path:
            raise ValueError("a files source needs `path` (a file, a folder or a glob)")
        if self.kind == "bundled" and self.split not in ("train", "heldout", "all"):
            raise ValueError(f"bundled split must be train, heldout or all, got '{self.split}'")
        if self.kind == "synthetic":
            if not self.name or not self.max_docs:
                raise ValueError(f"a synthetic source needs `name` (one of: {', '.join(SYNTHETIC_PARAMS)}) and "
                                 "`max_docs` (how many documents to generate)")
            check_synthetic_params(self.name, self.params)
        elif self.params:
            raise ValueError(f"`params` is for synthetic sources only (this source is {self.kind})")
        return self

    def label(self) -> str:
        """A short human name for messages and stats: `bundled:train`, `hub:emozilla/pg19`, `files:data/*.txt`."""
        return f"{self.kind}:{self.split if self.kind == 'bundled' else self.name or self.path}"


class DataConfig(StrictModel):
    sources: list[SourceSpec] = Field(default_factory=lambda: [SourceSpec(kind="bundled", split="train")])
    """The documents, read in this order, then mixed by weight and shuffled by `seed`."""
    seq_len: int = Field(default=8192, gt=1)
    """Tokens per row (the training length; for `pose`, the short window L_c)."""
    mode: Literal["concat", "reset", "pose"] = "concat"
    """`concat`: positions 0..seq_len-1 run across documents (how PI and YaRN trained); `reset`: positions restart
    at 0 at each document start and labels never cross a document boundary; `pose`: PoSE skip-wise positions that
    reach `pose_target_len` inside a window of seq_len tokens."""
    block_cross_doc: bool = False
    """`reset` only: also block attention between documents of a row (varlen attention; on CPU transformers'
    packed mask, see `data.loader.forward_kwargs`). Changes how the model is called, not the rows."""
    whole_docs: bool = False
    """`reset` only: a document of at most seq_len tokens is never cut across two rows. Each goes into the first of
    the open rows it fits in (first fit in stream order; up to 64 rows open, the oldest then padded and closed), so
    short documents fill the gaps long ones leave; longer documents are cut into full rows and a rest placed the same
    way; the padding (EOS tokens, no loss, a document of its own) is counted in the stats. Without it about
    length/seq_len of the documents straddle a row boundary, and a pass-key document cut there has its key in one row
    and its question in the next: nothing to retrieve from (docs/data.md)."""
    pose_target_len: int | None = Field(default=None, gt=1)
    """`pose` only: the target context L_t; every position id is below it."""
    pose_chunks: int = Field(default=2, ge=2)
    """`pose` only: chunks per row, each with its own skip offset (PoSE uses 2)."""
    min_doc_tokens: int = Field(default=0, ge=0)
    """Drop (and count) documents with fewer tokens than this, before packing; PI and YaRN trained on PG19 books
    longer than the target length."""
    add_bos: bool | None = None
    """Put the tokenizer's BOS token before each document. None: only if the tokenizer adds one by itself
    (Llama-2 does; SmolLM2 and the tiny byte tokenizer do not). An EOS always follows each document."""
    passes: int = Field(default=1, ge=1)
    """Times the documents are laid into the token stream, each pass in a new seeded order. Rows are cut from the
    whole stream, so one partial tail (< seq_len tokens) is dropped per build rather than one per pass."""
    seed: int = 0
    """Seed for the document order of each pass, weight subsets and PoSE offsets (the row order is the loader's)."""
    cache_dir: str | None = None
    """Where packed sets are kept; default `$ROPESCALE_CACHE/packed` (`~/.cache/ropescale/packed`)."""
    on_bad_document: Literal["error", "skip"] = "error"
    """A document that cannot be read (a truncated file, a JSONL line that is not a JSON object, a record without
    the text field): `error` stops with one line naming the file and line; `skip` leaves it out and counts it in the
    packing stats (with the first few reasons)."""
    num_proc: int = Field(default=1, ge=1)
    """Tokenizer processes (datasets' `map(num_proc=...)`); does not change the result."""

    @model_validator(mode="after")
    def _modes(self):
        if not self.sources:
            raise ValueError("data.sources is empty; give at least one source")
        if self.whole_docs and self.mode != "reset":
            raise ValueError(f"whole_docs needs mode: reset (mode is {self.mode}; only there does a row hold whole "
                             "documents that start at position 0)")
        if self.block_cross_doc and self.mode != "reset":
            raise ValueError(f"block_cross_doc needs mode: reset (mode is {self.mode}; positions must restart at "
                             "each document for the boundary to be seen)")
        if self.mode == "pose":
            if self.pose_target_len is None or self.pose_target_len <= self.seq_len:
                raise ValueError(f"mode pose needs pose_target_len > seq_len ({self.seq_len}), got "
                                 f"{self.pose_target_len}")
            if self.pose_chunks > self.seq_len:
                raise ValueError(f"pose_chunks ({self.pose_chunks}) cannot exceed seq_len ({self.seq_len})")
        elif self.pose_target_len is not None:
            raise ValueError(f"pose_target_len is only used with mode: pose (mode is {self.mode})")
        return self
