"""The packed-set cache: reuse on the same key (no tokenization at all), rebuild on a changed key, nothing
half-written after a failure."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import data.pack
from data.config import DataConfig, DataError, SourceSpec
from data.pack import build_packed
from models.load import load_tokenizer

TEXT = ("Anne Elliot had been a very pretty girl, but her bloom had vanished early; and as even in its height, her "
        "father had found little to admire in her. ") * 20


@pytest.fixture
def tokenize_calls(monkeypatch):
    """Count calls of the tokenizing step (the real function runs)."""
    calls = []
    real = data.pack.tokenize_texts

    def counting(texts, *args, **kw):
        calls.append(len(texts))
        return real(texts, *args, **kw)

    monkeypatch.setattr(data.pack, "tokenize_texts", counting)
    return calls


@pytest.fixture
def setup(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(4):
        (folder / f"d{i}.txt").write_text(f"Document {i}. " + TEXT[: 600 + 300 * i])
    cfg = DataConfig(sources=[SourceSpec(kind="files", path=str(folder))], seq_len=256, mode="reset",
                     cache_dir=str(tmp_path / "cache"))
    return cfg, load_tokenizer("tiny-llama"), folder


def test_same_key_reuses_without_tokenizing(setup, tokenize_calls, capsys):
    cfg, tok, _ = setup
    first = build_packed(cfg, tok)
    assert tokenize_calls == [4]
    capsys.readouterr()
    second = build_packed(cfg, tok)
    assert tokenize_calls == [4], "the second build tokenized again"
    assert "reusing cached packed set" in capsys.readouterr().err
    assert second.path == first.path and second.stats == first.stats
    assert np.array_equal(second.arrays["input_ids"], first.arrays["input_ids"])
    # block_cross_doc changes how the model is called, not the rows: same key.
    assert build_packed(cfg.model_copy(update={"block_cross_doc": True}), tok).path == first.path
    assert tokenize_calls == [4]


def test_changed_packing_key_repacks_without_retokenizing(setup, tokenize_calls, capsys):
    cfg, tok, _ = setup
    first = build_packed(cfg, tok)
    other = build_packed(cfg.model_copy(update={"seq_len": 128}), tok)
    assert other.path != first.path and other.seq_len == 128
    assert tokenize_calls == [4]
    assert "reusing tokenized documents" in capsys.readouterr().err
    seeded = build_packed(cfg.model_copy(update={"seed": 1}), tok)
    assert seeded.path != first.path and not np.array_equal(seeded.arrays["input_ids"], first.arrays["input_ids"])


def test_changed_data_or_tokenizer_retokenizes(setup, tokenize_calls):
    cfg, tok, folder = setup
    first = build_packed(cfg, tok)
    (folder / "d0.txt").write_text("Changed. " + TEXT)
    edited = build_packed(cfg, tok)
    assert edited.path != first.path and tokenize_calls == [4, 4]
    tok.add_tokens(["<extra>"])  # a different tokenizer definition
    assert build_packed(cfg, tok).path != edited.path and tokenize_calls == [4, 4, 4]


def test_failed_packing_leaves_nothing(setup, monkeypatch):
    cfg, tok, _ = setup
    real = data.pack.write_json

    def fail_on_rows_meta(path, obj, **kw):
        if "rows" in str(path) and str(path).endswith("meta.json"):
            raise OSError("disk full (injected after the rows were written)")
        real(path, obj, **kw)

    monkeypatch.setattr(data.pack, "write_json", fail_on_rows_meta)
    with pytest.raises(OSError, match="injected"):
        build_packed(cfg, tok)
    root = data.pack.cache_root(cfg)
    assert list((root / "rows").iterdir()) == []  # no final folder, no temporary one
    monkeypatch.setattr(data.pack, "write_json", real)
    assert len(build_packed(cfg, tok)) > 0  # and the next build completes


def test_failed_tokenizing_leaves_nothing(setup, tmp_path):
    cfg, tok, folder = setup
    (folder / "zz.txt.gz").write_bytes(b"not gzip at all")  # read after the good files
    with pytest.raises(DataError, match="zz.txt.gz"):
        build_packed(cfg, tok)
    root = data.pack.cache_root(cfg)
    assert list((root / "tokens").iterdir()) == []
    assert not (root / "rows").exists() or list((root / "rows").iterdir()) == []


def _pack(cache: Path) -> list[str]:
    return [sys.executable, "-m", "data", "pack", "--model", "tiny-llama", "--seq-len", "256", "--source",
            "bundled:heldout", "--cache-dir", str(cache)]


def _finals(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


@pytest.mark.slow
def test_a_cache_build_killed_midway_leaves_no_cache_and_the_next_build_is_right(tmp_path):
    root = Path(__file__).resolve().parents[1]
    cache, clean = tmp_path / "cache", tmp_path / "clean"
    # SIGKILLed once the documents are tokenized into the temporary folder, before the rename (utils/faults.py)
    killed = subprocess.run(_pack(cache), cwd=root, capture_output=True, env={**os.environ,
                                                                               "ROPESCALE_FAULT": "pack/tokens:0"})
    assert killed.returncode == -signal.SIGKILL
    assert list(cache.glob("tokens/.*.tmp-*")), "the kill came before the temporary folder was written"
    assert _finals(cache / "tokens") == [] and _finals(cache / "rows") == []  # nothing that looks complete
    subprocess.run(_pack(cache), cwd=root, check=True, capture_output=True)
    subprocess.run(_pack(clean), cwd=root, check=True, capture_output=True)
    for kind in ("tokens", "rows"):
        (built,), (fresh,) = _finals(cache / kind), _finals(clean / kind)
        assert built.name == fresh.name and list(fresh.glob("*.npy"))
        for f in sorted(fresh.glob("*.npy")):
            assert np.array_equal(np.load(built / f.name), np.load(f)), f.name
