"""The bundled corpus (``data/corpus/``): public-domain books, with a named held-out split.

``split="train"`` never contains a held-out document; ``split="heldout"`` is for evaluation only. Texts are verified
against the sha256 in ``MANIFEST.json`` on read, so a corrupted or edited file fails loudly.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
SPLITS = ("train", "heldout", "all")


@dataclass(frozen=True)
class Document:
    name: str
    text: str
    split: str


def manifest() -> list[dict]:
    """The manifest's document entries (name, title, file, split, chars, sha256, source, license)."""
    return json.loads((CORPUS_DIR / "MANIFEST.json").read_text())["documents"]


def load_corpus(split: str = "train") -> list[Document]:
    """The bundled documents of ``split`` (train, heldout or all), in manifest order."""
    if split not in SPLITS:
        raise ValueError(f"unknown corpus split '{split}'; choose one of {', '.join(SPLITS)}")
    docs = []
    for entry in manifest():
        if split != "all" and entry["split"] != split:
            continue
        raw = gzip.decompress((CORPUS_DIR / entry["file"]).read_bytes())
        if hashlib.sha256(raw).hexdigest() != entry["sha256"]:
            raise ValueError(f"{CORPUS_DIR / entry['file']} does not match its sha256 in MANIFEST.json; "
                             "rebuild it with `python -m data.build_corpus`")
        docs.append(Document(entry["name"], raw.decode("utf-8"), entry["split"]))
    return docs
