"""The packed-set cache: one folder per key, written under a temporary name and renamed into place when complete.

Two levels, so that a sweep over seq_len or mode tokenizes once:

- ``tokens/tok-<hash>``: every document tokenized; keyed by the sources' settings (except weight), the data behind
  them (bundled manifest sha256s, local file contents) and the tokenizer (name, vocabulary size, sha256 of its full
  definition);
- ``rows/<mode>-<seq_len>-<hash>``: the packed rows; keyed by the tokens key plus weights, BOS/EOS ids, seq_len,
  mode (and PoSE settings), min_doc_tokens, passes and seed.

Both include a format version. Left out, because they do not change a row: ``block_cross_doc`` (how the model is
called), ``num_proc`` and ``cache_dir``. A hub dataset is known only by name, config, split and revision: pin the
revision, or a changed upstream dataset goes unnoticed.

A folder under its final name is always complete (``meta.json`` is written last, then the folder is renamed); a
failed build removes its temporary folder, and a killed one leaves only a ``.tmp-`` folder that is never read.
"""

from __future__ import annotations

from pathlib import Path

from data.config import DataConfig
from utils.files import cache_dir, json_digest, user_path

FORMAT_VERSION = 1
META = "meta.json"


def cache_root(cfg: DataConfig) -> Path:
    """``cfg.cache_dir`` or ``$ROPESCALE_CACHE/packed``."""
    if cfg.cache_dir:
        return user_path(cfg.cache_dir)
    return cache_dir() / "packed"


def tokens_key(cfg: DataConfig, tokenizer: dict, fingerprints: list) -> str:
    """Key of the tokenized documents: the sources (settings except weight, and the data behind them) and the
    tokenizer. ``tok-<16 hex digits>``."""
    sources = [s.model_dump(exclude={"weight"}) for s in cfg.sources]
    parts = {"format": FORMAT_VERSION, "sources": sources, "data": fingerprints, "tokenizer": tokenizer}
    if cfg.on_bad_document != "error":  # only when set, so that the keys of every earlier build still hold
        parts["on_bad_document"] = cfg.on_bad_document
    return "tok-" + json_digest(parts)[:16]


def rows_key(cfg: DataConfig, tokens: str, specials: tuple[int | None, int]) -> str:
    """Key of the packed rows: the tokenized documents' key plus every packing setting that changes a row.
    ``<mode>-<seq_len>-<16 hex digits>``."""
    parts = {
        "format": FORMAT_VERSION,
        "tokens": tokens,
        "weights": [s.weight for s in cfg.sources],
        "bos_eos": list(specials),
        "seq_len": cfg.seq_len,
        "mode": cfg.mode,
        "pose": [cfg.pose_target_len, cfg.pose_chunks] if cfg.mode == "pose" else None,
        "min_doc_tokens": cfg.min_doc_tokens,
        "passes": cfg.passes,
        "seed": cfg.seed,
    }
    if cfg.whole_docs:  # only when set, so that the keys of existing sets stay valid
        parts["whole_docs"] = True
    return f"{cfg.mode}-{cfg.seq_len}-{json_digest(parts)[:16]}"


def is_complete(path: Path) -> bool:
    return (path / META).is_file()
