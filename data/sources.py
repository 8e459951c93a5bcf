"""Reading documents from a source: the bundled corpus, a hub dataset (or a local dataset folder), local files.

Each source yields plain ``str`` documents in a fixed order, with counts of what was skipped or repaired:

- UTF-8 policy: bytes that are not valid UTF-8 are replaced with U+FFFD (one per invalid sequence, Python's
  ``errors="replace"``) and counted; so are lone surrogates that JSON escapes can produce. Nothing is dropped
  silently, and the counts are in the stats.
- Empty or whitespace-only documents are skipped and counted.
- A bad document (an unreadable or truncated file, a JSONL line that is not a JSON object, a record without the
  text field or whose text is not a string) fails at once with one line naming the file (and the line for JSONL);
  with ``data.on_bad_document: skip`` it is skipped and counted instead, with the first few reasons kept in the
  stats. A source that cannot be loaded at all, or a dataset without the text column, always fails.

Hub datasets go through ``datasets.load_dataset`` (optionally ``streaming=True``); the same call reads a local
dataset folder, which is how it is tested here (no network). Local ``.txt`` files are one document each;
``.jsonl`` records and ``.parquet`` rows are one document each; ``.txt.gz`` and ``.jsonl.gz`` are read compressed.
"""

from __future__ import annotations

import glob
import gzip
import json
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from dataclasses import field as dataclass_field
from pathlib import Path

from data.config import DataError, SourceSpec
from data.corpus import load_corpus, manifest
from utils.files import file_sha256, user_path

SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".parquet")
_REPLACEMENT = "\ufffd"
_REPLACEMENT_UTF8 = _REPLACEMENT.encode()


@dataclass
class SourceStats:
    """What one source gave: documents read and kept, skipped empties, repaired UTF-8."""

    source: str
    documents_read: int = 0
    documents_kept: int = 0
    empty_skipped: int = 0
    invalid_utf8_documents: int = 0
    invalid_utf8_replaced: int = 0
    bad_skipped: int = 0
    bad_examples: list[str] = dataclass_field(default_factory=list)  # the first reasons, as the error reads

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Unreadable:
    """In place of a document's text: why it could not be read (one line naming the file, and the line)."""

    reason: str


BAD_EXAMPLES = 3


def decode_utf8(raw: bytes) -> tuple[str, int]:
    """Decode ``raw`` as UTF-8, replacing each invalid sequence with U+FFFD; returns (text, sequences replaced).

    U+FFFD characters already in the input are valid UTF-8 (EF BF BD) and are not counted: EF is never a
    continuation byte, so no invalid sequence can swallow one.
    """
    text = raw.decode("utf-8", errors="replace")
    return text, text.count(_REPLACEMENT) - raw.count(_REPLACEMENT_UTF8)


def clean_text(value: str) -> tuple[str, int]:
    """A decoded string that may hold lone surrogates (JSON ``\\ud800`` escapes) -> (valid text, replacements)."""
    try:
        value.encode("utf-8")
        return value, 0
    except UnicodeEncodeError:
        return decode_utf8(value.encode("utf-8", errors="surrogatepass"))


def expand_files(path: str) -> list[Path]:
    """The supported files named by ``path``: a file, a folder (recursive) or a glob; sorted. Raises DataError."""
    if any(c in path for c in "*?["):
        found = [Path(p) for p in glob.glob(path, recursive=True)]
        files = sorted(p for p in found if p.name.endswith(SUFFIXES) and not p.is_dir())
        if not files:
            raise DataError(f"no {'/'.join(SUFFIXES)} files match '{path}'")
        return files
    p = user_path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.name.endswith(SUFFIXES) and not f.is_dir())
        if not files:
            raise DataError(f"folder {p} holds no {'/'.join(SUFFIXES)} files")
        return files
    if not p.exists() and not p.is_symlink():
        raise DataError(f"file not found: {p}")
    if not p.name.endswith(SUFFIXES):
        raise DataError(f"{p}: unsupported file type; use one of {', '.join(SUFFIXES)}")
    return [p]


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _read_bytes(path: Path) -> bytes:
    try:
        with _open(path) as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


def _field(record: dict, name: str, where: str):
    """The record's text, or Unreadable naming the fields the record has."""
    if name not in record:
        return Unreadable(f"{where}: text field '{name}' not found; fields: "
                          f"{', '.join(map(str, record)) or '(none)'} (set text_field)")
    return record[name]


def _jsonl_records(path: Path, field: str) -> Iterator[tuple[str, object, int]]:
    try:
        with _open(path) as f:
            for lineno, line in enumerate(f, 1):  # line by line: a large file is never held whole
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                # Decode before parsing, so that invalid bytes are replaced and counted (as the record's).
                text, bad = decode_utf8(line)
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as e:
                    yield where, Unreadable(f"{where}: not valid JSON ({e.msg}); each line must be one JSON "
                                            "object"), bad
                    continue
                if not isinstance(record, dict):
                    yield where, Unreadable(f"{where}: expected a JSON object, got {type(record).__name__}"), bad
                    continue
                yield where, _field(record, field, where), bad
    except (OSError, EOFError, zlib.error) as e:  # the rest of the file is lost: one bad document
        yield str(path), Unreadable(f"cannot read {path}: {getattr(e, 'strerror', None) or e}"), 0


def _load_dataset(kind: str, spec: SourceSpec, hf_cache: Path | None, **kw):
    import datasets

    where = ", ".join(kw["data_files"]) if "data_files" in kw else spec.name
    try:
        return datasets.load_dataset(kind, split=kw.pop("split", spec.split), streaming=spec.streaming,
                                     cache_dir=str(hf_cache) if hf_cache else None, **kw)
    except UnicodeDecodeError as e:
        raise DataError(f"{where} is not valid UTF-8 ({e.reason} at byte {e.start}); read local files with "
                        "kind: files, which replaces invalid bytes and counts them") from None
    except DataError:
        raise
    except Exception as e:  # datasets raises many types (FileNotFoundError, ValueError, ArrowInvalid, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"could not load {where}: {first}") from None


def _dataset_records(ds, field: str, where: str) -> Iterator[tuple[str, object, int]]:
    columns = getattr(ds, "column_names", None)
    if columns is not None and field not in columns:
        raise DataError(f"{where}: text field '{field}' not found; fields: {', '.join(columns)} (set text_field)")
    try:
        for i, record in enumerate(ds):
            yield f"{where}#{i}", _field(record, field, where), 0
    except UnicodeDecodeError as e:
        raise DataError(f"{where} is not valid UTF-8 ({e.reason}); read local files with kind: files") from None


def _raw_documents(spec: SourceSpec, hf_cache: Path | None) -> Iterator[tuple[str, object, int]]:
    """(name, value, invalid UTF-8 sequences already replaced) in source order; value is str, bytes, None, or
    Unreadable for a bad document."""
    if spec.kind == "bundled":
        for doc in load_corpus(spec.split):
            yield doc.name, doc.text, 0
    elif spec.kind == "synthetic":
        from data.synthetic import generate

        for i, text in enumerate(generate(spec.name, spec.max_docs, spec.params)):
            yield f"{spec.label()}#{i}", text, 0
    elif spec.kind == "hub":
        kw = {"revision": spec.revision} if spec.revision else {}
        ds = _load_dataset(spec.name, spec, hf_cache, name=spec.config, **kw)
        yield from _dataset_records(ds, spec.text_field, spec.label())
    else:
        for path in expand_files(spec.path):
            if path.name.endswith((".txt", ".txt.gz")):
                try:
                    yield str(path), _read_bytes(path), 0
                except DataError as e:
                    yield str(path), Unreadable(str(e)), 0
            elif path.name.endswith((".jsonl", ".jsonl.gz")):
                yield from _jsonl_records(path, spec.text_field)
            else:
                if not path.is_file():
                    raise DataError(f"cannot read {path}: not a readable file")
                ds = _load_dataset("parquet", spec, hf_cache, data_files=[str(path)], split="train")
                yield from _dataset_records(ds, spec.text_field, str(path))


def read_source(spec: SourceSpec, hf_cache: Path | None = None,
                on_bad_document: str = "error") -> tuple[list[str], SourceStats]:
    """All documents of ``spec`` (up to ``max_docs`` read), as valid non-blank strings, and what was skipped.

    A bad document raises DataError naming the path (and line, or field), or with ``on_bad_document="skip"`` is
    counted in the stats and left out; like an empty one, it counts toward ``max_docs`` (documents read).
    """
    stats = SourceStats(spec.label())
    texts = []
    for name, value, bad in _raw_documents(spec, hf_cache):
        if spec.max_docs is not None and stats.documents_read >= spec.max_docs:
            break
        stats.documents_read += 1
        if value is None:
            value = ""
        if not isinstance(value, (bytes, str, Unreadable)):
            value = Unreadable(f"{name}: text field '{spec.text_field}' holds {type(value).__name__}, not text")
        if isinstance(value, Unreadable):
            if on_bad_document != "skip":
                raise DataError(value.reason + "; or set data.on_bad_document: skip to leave such documents out")
            stats.bad_skipped += 1
            if len(stats.bad_examples) < BAD_EXAMPLES:
                stats.bad_examples.append(value.reason)
            continue
        if isinstance(value, bytes):
            text, more = decode_utf8(value)
        else:
            text, more = clean_text(value)
        bad += more
        if bad:
            stats.invalid_utf8_documents += 1
            stats.invalid_utf8_replaced += bad
        if not text.strip():
            stats.empty_skipped += 1
            continue
        texts.append(text)
    stats.documents_kept = len(texts)
    return texts, stats


def _file_digest(path: Path) -> str:
    try:
        return file_sha256(path)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def source_fingerprint(spec: SourceSpec) -> list:
    """What the cache key must know about the data behind ``spec`` beyond its settings: the bundled manifest's
    sha256s, or (path, sha256) of each local file. A hub id is known only by name, config, split and revision."""
    if spec.kind == "bundled":
        return [e["sha256"] for e in manifest() if spec.split in ("all", e["split"])]
    if spec.kind == "synthetic":
        from data.synthetic import fingerprint

        return [fingerprint(spec.name)]
    root = spec.path if spec.kind == "files" else spec.name
    if spec.kind == "hub" and not user_path(root).exists():
        return []
    if spec.kind == "hub":
        files = sorted(f for f in user_path(root).rglob("*") if f.is_file())
    else:
        files = expand_files(root)
    return [[str(f.resolve()), _file_digest(f)] for f in files]
