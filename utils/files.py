"""Files and folders written so that a crash never leaves half of one, and the cache folder.

Every write goes to a temporary name in the destination's own folder and is renamed into place (``os.replace`` is
atomic within one filesystem): a reader sees the old content or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from utils.cli import UserError


def user_path(text: str | Path) -> Path:
    """``text`` as a path with a leading ``~`` or ``~user`` expanded; a UserError (one line) when that user has no
    home here (``~0``), where pathlib raises RuntimeError."""
    try:
        return Path(text).expanduser()
    except RuntimeError:
        raise UserError(f"path '{text}' starts with '~' but names no user with a home here; give the full path") \
            from None


def cache_dir() -> Path:
    """Where converted models and packed data live: ``$ROPESCALE_CACHE`` or ``~/.cache/ropescale``."""
    return Path(os.environ.get("ROPESCALE_CACHE", Path.home() / ".cache" / "ropescale"))


def json_digest(obj) -> str:
    """sha256 (hex) of ``obj`` as canonical JSON (sorted keys; other types by ``str``): a cache key."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 (hex) of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# The process's umask, read once (reading it means setting it, briefly, for every thread).
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (parents created) to write; on success it is renamed to ``path``, on
    any error removed, so ``path`` is never left half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it 0600; the file gets the permissions open() would give
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` (parents created) through a temporary file and a rename."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def write_json(path: str | Path, obj, indent: int = 1, sort_keys: bool = False) -> None:
    """``obj`` as JSON (NaN refused: it is not JSON), written atomically, with a final newline."""
    write_atomic(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, allow_nan=False) + "\n")


def replace_dir(tmp: Path, final: Path) -> None:
    """Put the finished folder ``tmp`` in the place of ``final`` (same parent folder), removing an older ``final``."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


@contextmanager
def atomic_dir(final: Path, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a new temporary folder next to ``final``; on success it becomes ``final``, on any error it is removed.

    ``keep_existing``: when ``final`` already exists (another process finished the same folder first, e.g. two ranks
    building the same cache key), keep that copy and drop ours; otherwise an existing ``final`` is replaced.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if not keep_existing:
            replace_dir(tmp, final)
            return
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_figure(fig, path: str | Path, tight: bool = True) -> None:
    """Save a matplotlib Figure as PNG at 110 dpi, atomically; ``tight``: cropped to what is drawn (else the
    figure's own size)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight" if tight else None)
    write_atomic(path, buf.getvalue())
