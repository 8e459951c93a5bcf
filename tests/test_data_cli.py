"""``python -m data pack``: the bundled corpus with SmolLM2's tokenizer at 8,192, and a bad source's error line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data.__main__ import main
from data.pack import parse_source

ROOT = Path(__file__).resolve().parents[1]


def pack(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "data", "pack", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_bundled_corpus_at_8192_with_smollm2(tmp_path):
    # One pass of the train split (2.04M tokens) drops one tail of up to 8,191 tokens (up to 0.4%); that is the
    # honest figure for a single pass (99.68% measured). Five passes (each in its own order) are cut as one stream,
    # so one tail (< 8,192 tokens) is dropped for ~10.2M tokens: efficiency >= 1 - 8191 / 10.2M > 99.9% whatever
    # the tail.
    stats_path = tmp_path / "stats.json"
    proc = pack("--model", "smollm2-135m", "--seq-len", "8192", "--passes", "5", "--cache-dir", str(tmp_path / "c"),
                "--stats-out", str(stats_path))
    assert proc.returncode == 0, proc.stderr
    assert "efficiency" in proc.stderr and "packed set:" in proc.stdout
    stats = json.loads(stats_path.read_text())
    assert stats["seq_len"] == 8192 and stats["rows"] * 8192 == stats["kept_tokens"]
    assert stats["stream_tokens"] == stats["kept_tokens"] + stats["dropped_tokens"] and stats["dropped_tokens"] < 8192
    assert stats["padding_tokens"] == 0 and stats["efficiency"] >= 0.999
    assert 2_000_000 < stats["document_tokens"] < 2_100_000 and stats["documents"] == 7

    one = pack("--model", "smollm2-135m", "--seq-len", "8192", "--cache-dir", str(tmp_path / "c"))
    assert one.returncode == 0 and "reusing tokenized documents" in one.stderr
    single = json.loads(_stats_of(one.stdout))
    assert single["dropped_tokens"] < 8192 and single["efficiency"] == single["kept_tokens"] / single["stream_tokens"]


def _stats_of(stdout: str) -> str:
    folder = stdout.split("packed set: ", 1)[1].split(" (", 1)[0]
    return (Path(folder) / "stats.json").read_text()


def test_bad_source_exits_with_one_error_line(tmp_path, capsys):
    code = main(["pack", "--model", "tiny-llama", "--source", f"files:{tmp_path / 'missing.jsonl'}", "--cache-dir",
                 str(tmp_path / "c")])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: file not found: {tmp_path / 'missing.jsonl'}"
    assert main(["pack", "--model", "tiny-llama", "--mode", "pose", "--seq-len", "64"]) == 2
    assert capsys.readouterr().err.strip() == "error: mode pose needs pose_target_len > seq_len (64), got None"
    assert main(["pack", "--model", "tiny-llama", "--whole-docs", "--seq-len", "64"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: whole_docs needs mode: reset (mode is concat;")


def test_whole_docs_from_the_command_line(tmp_path, capsys):
    """The bundled books (7 documents, each longer than a row) at 65,536 tokens, whole: full rows of each book, the
    books' rests fitted into rows and padded; nothing dropped, the padding counted and printed."""
    assert main(["pack", "--model", "tiny-llama", "--mode", "reset", "--whole-docs", "--seq-len", "65536",
                 "--cache-dir", str(tmp_path / "c"), "--stats-out", str(tmp_path / "s.json")]) == 0
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["dropped_tokens"] == 0 and stats["kept_tokens"] == stats["stream_tokens"]
    assert stats["padding_tokens"] == stats["rows"] * 65536 - stats["stream_tokens"] > 0
    assert f"padding {stats['padding_tokens']:,}" in capsys.readouterr().err


def test_source_syntax():
    spec = parse_source("hub:emozilla/pg19,split=test,streaming=true,max_docs=10,weight=0.5")
    assert (spec.kind, spec.name, spec.split, spec.streaming, spec.max_docs, spec.weight) == (
        "hub", "emozilla/pg19", "test", True, 10, 0.5)
    assert parse_source("bundled:heldout").split == "heldout" and parse_source("files:a/*.txt").path == "a/*.txt"
