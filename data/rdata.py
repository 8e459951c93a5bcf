"""A minimal reader for R's lazy-load databases (``.rdx`` index + ``.rdb`` blobs), enough to pull the
character vectors out of an R data package (Debian's ``r-cran-janeaustenr``) without an R installation.

R writes each object with ``serialize()`` in XDR (big-endian) format, version 2 or 3, and the lazy-load blob
is zlib-compressed behind a 4-byte big-endian uncompressed length. Only the object kinds that data packages
use are decoded: NULL, symbols, pairlists, character/logical/integer/double vectors and generic lists.
Anything else raises ``ValueError`` naming the SEXP type, so a different package version fails loudly.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

# SEXP type codes (R Internals, "Serialization formats").
NILSXP, SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = 0, 1, 2, 9, 10, 13, 14, 16, 19
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, EMPTYENV_SXP, BASEENV_SXP, MISSINGARG_SXP = 255, 254, 253, 242, 241, 251
_NA_INT = -(2**31)


class _Reader:
    def __init__(self, buf: bytes) -> None:
        if buf[:2] != b"X\n":
            raise ValueError("not an XDR-serialized R object (expected the 'X\\n' header)")
        self.buf, self.pos, self.refs = buf, 2, []
        version = self.int()
        self.int(), self.int()  # writer R version, minimal reader version
        if version == 3:
            self.string(self.int())  # native encoding, e.g. "UTF-8"
        elif version != 2:
            raise ValueError(f"R serialization version {version} is not supported (2 or 3 are)")

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.buf, self.pos)
        self.pos += 4
        return v

    def string(self, n: int) -> bytes:
        s = self.buf[self.pos : self.pos + n]
        self.pos += n
        return s

    def item(self):
        flags = self.int()
        kind = flags & 0xFF
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if kind in (NILVALUE_SXP, NILSXP, GLOBALENV_SXP, EMPTYENV_SXP, BASEENV_SXP, MISSINGARG_SXP):
            return None
        if kind == REFSXP:
            return self.refs[(flags >> 8) - 1]
        if kind == SYMSXP:
            name = self.item()  # a CHARSXP
            self.refs.append(name)
            return name
        if kind == LISTSXP:
            out = {}
            while kind == LISTSXP:
                if has_attr:
                    self.item()
                tag = self.item() if has_tag else f"_{len(out)}"
                out[tag] = self.item()
                flags = self.int()
                kind = flags & 0xFF
                has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
            if kind not in (NILVALUE_SXP, NILSXP):
                raise ValueError(f"malformed pairlist: ends with SEXP type {kind}")
            return out
        if kind == CHARSXP:
            n = self.int()
            return None if n == -1 else self.string(n).decode("utf-8")
        if kind in (LGLSXP, INTSXP):
            n = self.int()
            vals = list(struct.unpack_from(f">{n}i", self.buf, self.pos))
            self.pos += 4 * n
            value = [None if v == _NA_INT else v for v in vals]
        elif kind == REALSXP:
            n = self.int()
            value = list(struct.unpack_from(f">{n}d", self.buf, self.pos))
            self.pos += 8 * n
        elif kind in (STRSXP, VECSXP):
            value = [self.item() for _ in range(self.int())]
        else:
            raise ValueError(f"R object of SEXP type {kind} is not supported by this reader")
        if has_attr:
            attrs = self.item()
            names = attrs.get("names") if isinstance(attrs, dict) else None
            if names is not None and kind == VECSXP:
                return dict(zip(names, value))
        return value


def unserialize(buf: bytes):
    """Decode one XDR-serialized R object into Python lists, dicts (named lists/pairlists), str and numbers."""
    return _Reader(buf).item()


def read_lazyload_db(package_dir: str | Path, db: str = "data/Rdata") -> dict[str, object]:
    """Read every variable of an R lazy-load database, e.g. ``<pkg>/data/Rdata.{rdx,rdb}``.

    Returns ``{variable name: decoded object}``. Raises FileNotFoundError naming the missing file.
    """
    base = Path(package_dir) / db
    rdx, rdb = base.with_suffix(".rdx"), base.with_suffix(".rdb")
    for f in (rdx, rdb):
        if not f.is_file():
            raise FileNotFoundError(f"R lazy-load file not found: {f}")
    index = unserialize(gzip.decompress(rdx.read_bytes()))
    blob = rdb.read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        raw = blob[int(offset) : int(offset) + int(length)]
        (n,) = struct.unpack_from(">I", raw, 0)
        data = zlib.decompress(raw[4:])
        if len(data) != n:
            raise ValueError(f"{rdb}: variable {name!r} decompressed to {len(data)} bytes, index says {n}")
        out[name] = unserialize(data)
    return out
