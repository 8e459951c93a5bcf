"""Packing documents into rows of exactly ``seq_len`` tokens, with labels and position ids, cached on disk.

The pipeline (``build_packed``): read each source (``data.sources``) -> tokenize (``data.tokenize``) -> drop
documents shorter than ``min_doc_tokens`` -> lay the documents into one token stream, ``[BOS] doc EOS`` each, pass
after pass in a seeded order (weights repeat or subsample a source's documents) -> cut the stream into rows; the
partial tail (< seq_len tokens) is dropped and counted, nothing is padded.

Modes (each row carries ``input_ids``, ``labels``, ``position_ids``; labels are aligned with the inputs and the model
or ``models.loss`` shifts them):

- ``concat``: positions 0..seq_len-1 whatever the documents (PI and YaRN trained this way); labels = input_ids, so
  the first token of a document is predicted from the previous document's EOS, as in pretraining.
- ``reset``: positions restart at 0 at every document start (and at the row start, where a document cut by the
  previous row continues without its beginning); the label of each document's first token after the row start is
  -100, so no loss term predicts document B from document A. With ``block_cross_doc`` attention is also confined to
  each document (``data.loader.forward_kwargs``).
- ``whole_docs`` (with ``reset``): documents are fitted into rows whole (first fit, ``fit_documents``) rather than
  cut from the stream, so a document no longer than a row keeps its beginning and its end together; the gaps are
  padded (EOS, no loss) and counted.
- ``pose``: PoSE (Zhu et al. 2023, arXiv 2309.10400, section 3.2): the row (L_c = seq_len tokens of contiguous
  text) is split at random points into ``pose_chunks`` chunks; chunk i keeps consecutive positions shifted by a
  skip offset u_i, with u_0 = 0 and u_i drawn uniformly from [u_{i-1}, L_t - L_c], so positions grow, stay below
  L_t = ``pose_target_len`` and relative distances up to L_t - 1 are seen. Chunk lengths and offsets are drawn anew
  for every row. The text of a row stays contiguous (no content skipping), so every stream token is used once.
  Labels = input_ids.

CLI: ``python -m data pack --model smollm2-135m --seq-len 8192 [--mode reset] [--source files:PATH] ...`` builds
(or reuses) the packed set and prints its stats (``data/__main__.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from data.cache import META, cache_root, is_complete, rows_key, tokens_key
from data.config import DataConfig, DataError, SourceSpec
from data.sources import read_source, source_fingerprint
from data.stats import format_stats, packing_stats
from data.tokenize import special_ids, tokenize_texts, tokenizer_fingerprint
from utils.faults import fault_point
from utils.files import atomic_dir, write_json
from utils.log import Log
from utils.schema import validate

IGNORE_INDEX = -100
ARRAYS = ("input_ids", "labels", "position_ids")
_ROWS_PER_BLOCK = 1024


log = Log("data", err=True)


# ----------------------------------------------------------------------------------------------- pure packing steps


def stream_order(counts: list[int], weights: list[float], passes: int, seed: int) -> np.ndarray:
    """Indices into the concatenated documents of all sources, in stream order: for each pass, every source's
    documents repeated ``floor(weight)`` times plus a seeded ``frac(weight)`` share of them, then shuffled."""
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    order = []
    for p in range(passes):
        rng = np.random.default_rng([seed, 0, p])
        pool = []
        for s, (n, w) in enumerate(zip(counts, weights)):
            ids = np.arange(offsets[s], offsets[s + 1])
            pool += [ids] * int(w)
            extra = round((w - int(w)) * n)
            if extra:
                pool.append(np.sort(rng.choice(ids, size=extra, replace=False)))
        pool = np.concatenate(pool) if pool else np.zeros(0, np.int64)
        order.append(rng.permutation(pool))
    return np.concatenate(order)


def lay_stream(docs: list[np.ndarray], order: np.ndarray, bos: int | None, eos: int) -> tuple[np.ndarray, np.ndarray]:
    """The token stream ``[BOS] docs[i] EOS`` for i in ``order`` -> (tokens [N] int32, document starts [D] int64)."""
    head = [] if bos is None else [bos]
    wrapped = {}
    for i in np.unique(order):
        wrapped[i] = np.concatenate([np.asarray(head, np.int32), docs[i], np.asarray([eos], np.int32)])
    lengths = np.fromiter((len(wrapped[i]) for i in order), dtype=np.int64, count=len(order))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    tokens = np.concatenate([wrapped[i] for i in order]) if len(order) else np.zeros(0, np.int32)
    return tokens, starts


def pose_positions(seq_len: int, target_len: int, chunks: int, rng: np.random.Generator) -> np.ndarray:
    """PoSE position ids [seq_len] for one row (section 3.2): ``chunks`` chunks at random cut points, chunk i shifted
    by u_i with u_0 = 0, u_i ~ U[u_{i-1}, target_len - seq_len]; strictly increasing, max <= target_len - 1."""
    cuts = np.sort(rng.choice(np.arange(1, seq_len), size=chunks - 1, replace=False))
    bias = np.zeros(chunks, np.int64)
    for i in range(1, chunks):
        bias[i] = rng.integers(bias[i - 1], target_len - seq_len, endpoint=True)
    chunk_of = np.searchsorted(cuts, np.arange(seq_len), side="right")
    return np.arange(seq_len) + bias[chunk_of]


def row_labels_positions(input_ids: np.ndarray, doc_start: np.ndarray, mode: str, *, pose_target_len: int | None = None,
                         pose_chunks: int = 2, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Labels and position ids [R, L] for rows ``input_ids`` [R, L]; ``doc_start`` [R, L] marks each document's
    first token (BOS, or its first token)."""
    n_rows, seq_len = input_ids.shape
    cols = np.arange(seq_len)
    labels = input_ids.astype(np.int32, copy=True)
    if mode == "concat":
        positions = np.broadcast_to(cols, (n_rows, seq_len)).copy()
    elif mode == "reset":
        restart = doc_start.copy()
        restart[:, 0] = True  # a document continued from the previous row starts again at 0
        start_col = np.maximum.accumulate(np.where(restart, cols, 0), axis=1)
        positions = cols - start_col
        cross = doc_start.copy()
        cross[:, 0] = False  # the row's first token is never a target (labels are shifted)
        labels[cross] = IGNORE_INDEX
    elif mode == "pose":
        positions = np.stack([pose_positions(seq_len, pose_target_len, pose_chunks, rng) for _ in range(n_rows)])
    else:
        raise DataError(f"unknown packing mode '{mode}'; use concat, reset or pose")
    return labels, positions.astype(np.int32)


# ----------------------------------------------------------------------------------------------- the packed set


class PackedDataset:
    """Rows of a packed set, memory-mapped from its cache folder.

    ``ds[i]`` -> ``{"input_ids", "labels", "position_ids"}``, each an int64 tensor [seq_len]; ``ds.rows(idx)`` the
    same stacked to [len(idx), seq_len]. ``ds.stats`` is the build's stats dict, ``ds.config`` the DataConfig in use.
    """

    def __init__(self, path: str | Path, config: DataConfig | None = None) -> None:
        self.path = Path(path)
        meta = json.loads((self.path / META).read_text())
        self.key = meta["key"]
        self.config = config or DataConfig.model_validate(meta["config"])
        self.stats = meta["stats"]
        self.arrays = {name: np.load(self.path / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
        self.seq_len = self.arrays["input_ids"].shape[1]

    def __len__(self) -> int:
        return self.arrays["input_ids"].shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} out of range for {len(self)} rows")
        return {name: torch.from_numpy(np.asarray(a[i], dtype=np.int64)) for name, a in self.arrays.items()}

    def rows(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        """Rows ``idx`` stacked: int64 tensors [len(idx), seq_len]."""
        idx = np.asarray(idx, dtype=np.int64)
        return {name: torch.from_numpy(np.asarray(a[idx], dtype=np.int64)) for name, a in self.arrays.items()}


def tokenized_documents(cfg: DataConfig, tokenizer, root: Path, key: str) -> Path:
    """The folder ``root/tokens/<key>`` holding every document of ``cfg.sources`` tokenized (no specials, no
    filters): ``tokens.npy`` (int32, all documents back to back), ``offsets.npy`` (int64 [D + 1]), ``source.npy``
    (int32 [D], the source index of each document) and ``meta.json`` (per-source read stats). Built once per key."""
    final = root / "tokens" / key
    if is_complete(final):
        log(f"reusing tokenized documents {final} (same sources and tokenizer; nothing tokenized)")
        return final
    log(f"tokenizing into {final}")
    with atomic_dir(final, keep_existing=True) as tmp:
        docs, source_of, source_stats = [], [], []
        for i, spec in enumerate(cfg.sources):
            texts, stats = read_source(spec, root / "hf-datasets", cfg.on_bad_document)
            ids = tokenize_texts(texts, tokenizer, num_proc=cfg.num_proc)
            del texts
            docs += ids
            source_of += [i] * len(ids)
            source_stats.append(stats.as_dict())
        lengths = np.array([len(a) for a in docs], dtype=np.int64)
        np.save(tmp / "tokens.npy", np.concatenate(docs) if docs else np.zeros(0, np.int32))
        np.save(tmp / "offsets.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
        np.save(tmp / "source.npy", np.array(source_of, dtype=np.int32))
        write_json(tmp / META, {"key": key, "sources": source_stats}, indent=2)
        fault_point("pack/tokens")  # the crash tests' SIGKILL, before the rename (utils/faults.py)
    return final


def _filtered_documents(tok_dir: Path, cfg: DataConfig):
    """Documents (int32 arrays) per source that pass min_doc_tokens, per-source stats, short-filter counts."""
    tokens = np.load(tok_dir / "tokens.npy", mmap_mode="r")
    offsets = np.load(tok_dir / "offsets.npy")
    source_of = np.load(tok_dir / "source.npy")
    source_stats = json.loads((tok_dir / META).read_text())["sources"]
    lengths = np.diff(offsets)
    keep = lengths >= max(cfg.min_doc_tokens, 1)
    per_source = []
    for i, stats in enumerate(source_stats):
        mine = source_of == i
        kept_ids = np.flatnonzero(mine & keep)
        per_source.append([np.asarray(tokens[offsets[d] : offsets[d + 1]]) for d in kept_ids])
        stats["short_filtered"] = int(np.sum(mine & ~keep))
        stats["tokens"] = int(lengths[kept_ids].sum())
    return per_source, source_stats, int(np.sum(~keep)), int(lengths[~keep].sum())


def fit_documents(tokens: np.ndarray, starts: np.ndarray, seq_len: int, pad_id: int,
                  max_open: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lay the stream's documents (``tokens`` [N], document ``starts`` [D]) into whole rows -> (tokens [R * seq_len],
    starts, padding mask [R * seq_len]): first fit in stream order over at most ``max_open`` open rows (the oldest is
    padded and closed when one more is needed); a document longer than ``seq_len`` fills rows of its own and its rest
    is fitted like a document. Every stream token appears once; each run of padding (``pad_id``) is a document."""
    bounds = np.append(starts, len(tokens)).astype(np.int64)
    rows: list[list[tuple[int, int]]] = []  # each row: (start, end) spans of the stream, in order
    room: dict[int, int] = {}  # open row -> free slots
    for a, b in zip(bounds[:-1], bounds[1:]):
        while b - a > seq_len:  # full rows of a long document first
            rows.append([(a, a + seq_len)])
            a += seq_len
        need = b - a
        row = next((r for r, free in room.items() if free >= need), None)
        if row is None:
            if len(room) == max_open:
                del room[next(iter(room))]
            row = len(rows)
            rows.append([])
            room[row] = seq_len
        rows[row].append((a, b))
        room[row] -= need
        if room[row] == 0:
            del room[row]
    out = np.full(len(rows) * seq_len, pad_id, dtype=tokens.dtype)
    pad = np.ones(len(rows) * seq_len, dtype=bool)
    new_starts = []
    for r, spans in enumerate(rows):
        at = r * seq_len
        for a, b in spans:
            out[at : at + b - a] = tokens[a:b]
            pad[at : at + b - a] = False
            new_starts.append(at)
            at += b - a
        if at < (r + 1) * seq_len:
            new_starts.append(at)  # the padding: a document of its own, seen by nothing else under block_cross_doc
    return out, np.asarray(new_starts, dtype=np.int64), pad


def _write_rows(out: Path, tokens: np.ndarray, starts: np.ndarray, cfg: DataConfig,
                pad: np.ndarray | None = None) -> int:
    """Cut ``tokens`` into rows and write the three arrays under ``out`` (labels of ``pad`` [N] tokens ignored);
    returns the row count."""
    seq_len = cfg.seq_len
    n_rows = len(tokens) // seq_len
    is_start = np.zeros(n_rows * seq_len, dtype=bool)
    is_start[starts[starts < n_rows * seq_len]] = True
    arrays = {name: np.lib.format.open_memmap(out / f"{name}.npy", mode="w+", dtype=np.int32,
                                              shape=(n_rows, seq_len)) for name in ARRAYS}
    rng = np.random.default_rng([cfg.seed, 1])
    for a in range(0, n_rows, _ROWS_PER_BLOCK):
        b = min(a + _ROWS_PER_BLOCK, n_rows)
        ids = tokens[a * seq_len : b * seq_len].reshape(b - a, seq_len)
        labels, positions = row_labels_positions(ids, is_start[a * seq_len : b * seq_len].reshape(b - a, seq_len),
                                                  cfg.mode, pose_target_len=cfg.pose_target_len,
                                                  pose_chunks=cfg.pose_chunks, rng=rng)
        if pad is not None:
            labels[pad[a * seq_len : b * seq_len].reshape(b - a, seq_len)] = IGNORE_INDEX
        arrays["input_ids"][a:b], arrays["labels"][a:b], arrays["position_ids"][a:b] = ids, labels, positions
    for arr in arrays.values():
        arr.flush()
    del arrays
    return n_rows


def build_packed(cfg: DataConfig, tokenizer) -> PackedDataset:
    """The packed set ``cfg`` describes: from the cache when its key is there (said on stderr), else built and saved
    atomically (reusing the tokenized documents when only packing settings changed). Its stats are printed on stderr
    either way. Raises DataError on bad input; nothing is left in the cache then."""
    bos, eos = special_ids(tokenizer, cfg.add_bos)
    root = cache_root(cfg)
    tkey = tokens_key(cfg, tokenizer_fingerprint(tokenizer), [source_fingerprint(s) for s in cfg.sources])
    final = root / "rows" / rows_key(cfg, tkey, (bos, eos))
    if is_complete(final):
        ds = PackedDataset(final, cfg)
        log(f"reusing cached packed set {final} (same key; nothing read or tokenized)")
        log(format_stats(ds.stats))
        return ds
    tok_dir = tokenized_documents(cfg, tokenizer, root, tkey)
    log(f"packing into {final}")
    with atomic_dir(final, keep_existing=True) as tmp:
        per_source, source_stats, short, short_tokens = _filtered_documents(tok_dir, cfg)
        docs = [a for kept in per_source for a in kept]
        order = stream_order([len(k) for k in per_source], [s.weight for s in cfg.sources], cfg.passes, cfg.seed)
        tokens, starts = lay_stream(docs, order, bos, eos)
        if len(tokens) < cfg.seq_len:
            raise DataError(f"the sources give {len(tokens):,} tokens after filtering, fewer than one row of "
                            f"seq_len={cfg.seq_len:,}; add documents, lower seq_len or min_doc_tokens")
        pad = None
        stream_tokens = len(tokens)
        if cfg.whole_docs:
            tokens, starts, pad = fit_documents(tokens, starts, cfg.seq_len, eos)
        n_rows = _write_rows(tmp, tokens, starts, cfg, pad)
        stats = packing_stats(
            sources=source_stats, doc_lengths=np.array([len(a) for a in docs], dtype=np.int64), short_filtered=short,
            short_filtered_tokens=short_tokens, stream_docs=len(order), stream_tokens=stream_tokens, rows=n_rows,
            seq_len=cfg.seq_len, mode=cfg.mode, passes=cfg.passes, specials_per_doc=2 if bos is not None else 1,
            padding_tokens=0 if pad is None else int(pad.sum()),
        )
        write_json(tmp / "stats.json", stats, indent=2)
        write_json(tmp / META, {"key": final.name, "tokens_key": tkey, "config": cfg.model_dump(), "stats": stats},
                   indent=2)
    log(format_stats(stats))
    return PackedDataset(final, cfg)


# ------------------------------------------------------------------------------------- command-line sources


def parse_source(text: str) -> SourceSpec:
    """``kind[:value][,key=value...]`` -> SourceSpec; the bare value is the split (bundled), name (hub) or path
    (files): ``bundled:train``, ``hub:emozilla/pg19,streaming=true,max_docs=100``, ``files:data/*.jsonl,weight=2``."""
    kind, _, rest = text.partition(":")
    fields: dict = {"kind": kind}
    main = {"bundled": "split", "hub": "name", "files": "path"}.get(kind, "name")
    for item in rest.split(",") if rest else []:
        key, sep, value = item.partition("=")
        if sep:
            fields[key.strip()] = value
        else:
            fields[main] = item
    return validate(SourceSpec, fields, DataError, "source setting")
