"""Sources (local files, folders, globs, datasets' load_dataset on local data, streaming) and each bad input's
message. No network: the hub code path is exercised on a local dataset folder, the same `load_dataset` call."""

import gzip
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from data.config import DataConfig, DataError, SourceSpec
from data.pack import build_packed
from data.sources import decode_utf8, read_source
from models.load import load_tokenizer

TEXTS = ["Catherine Morland had been a happy child.", "Mr. Woodhouse was fond of society.",
         "The Musgroves came back to receive their happy boys and girls from school."]


def jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def parquet(path, columns):
    pq.write_table(pa.table(columns), path)
    return path


def texts_of(spec, tmp_path):
    texts, stats = read_source(spec, tmp_path / "hf")
    return texts, stats


def test_files_folder_glob_and_gzip(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text(TEXTS[0])
    (tmp_path / "b.txt.gz").write_bytes(gzip.compress(TEXTS[1].encode()))
    jsonl(tmp_path / "sub" / "c.jsonl", [{"text": TEXTS[2]}])
    (tmp_path / "notes.md").write_text("ignored: not a supported type")
    texts, stats = texts_of(SourceSpec(kind="files", path=str(tmp_path)), tmp_path)
    assert texts == TEXTS and stats.documents_read == 3
    texts, _ = texts_of(SourceSpec(kind="files", path=str(tmp_path / "**" / "*.jsonl")), tmp_path)
    assert texts == TEXTS[2:]
    texts, _ = texts_of(SourceSpec(kind="files", path=str(tmp_path / "*.txt*"), max_docs=1), tmp_path)
    assert texts == TEXTS[:1]


@pytest.mark.parametrize("streaming", [False, True])
def test_parquet_and_hub_folder_through_datasets(tmp_path, streaming):
    folder = tmp_path / "ds"
    (folder / "data").mkdir(parents=True)
    parquet(folder / "data" / "train-00000-of-00001.parquet", {"text": TEXTS, "id": [1, 2, 3]})
    hub = SourceSpec(kind="hub", name=str(folder), split="train", streaming=streaming)
    assert texts_of(hub, tmp_path)[0] == TEXTS
    files = SourceSpec(kind="files", path=str(folder / "data" / "*.parquet"), streaming=streaming)
    assert texts_of(files, tmp_path)[0] == TEXTS
    jsonl_folder = tmp_path / "js"
    jsonl_folder.mkdir()
    jsonl(jsonl_folder / "train.jsonl", [{"content": t} for t in TEXTS])
    hub_json = SourceSpec(kind="hub", name=str(jsonl_folder), text_field="content", streaming=streaming)
    assert texts_of(hub_json, tmp_path)[0] == TEXTS


def test_empty_and_whitespace_documents_are_skipped_and_counted(tmp_path):
    jsonl(tmp_path / "d.jsonl", [{"text": TEXTS[0]}, {"text": ""}, {"text": " \n\t "}, {"text": None},
                                 {"text": TEXTS[1]}])
    (tmp_path / "e.txt").write_text("   \n\n  ")
    spec = SourceSpec(kind="files", path=str(tmp_path))
    texts, stats = texts_of(spec, tmp_path)
    assert texts == TEXTS[:2]
    assert (stats.documents_read, stats.empty_skipped, stats.documents_kept) == (6, 4, 2)
    ds = build_packed(DataConfig(sources=[spec], seq_len=16, cache_dir=str(tmp_path / "c")),
                      load_tokenizer("tiny-llama"))
    assert ds.stats["sources"][0]["empty_skipped"] == 4 and ds.stats["documents"] == 2


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    # \xe9 starts a 3-byte sequence that a space interrupts (1 invalid sequence), \xff and \xfe (1 each); the
    # U+FFFD already in the text is valid and must not be counted.
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 au lait \xff\xfe fin \xef\xbf\xbd.")
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "na\xefve"}\n{"text": "lone \\ud800 surrogate"}\n')
    texts, stats = texts_of(SourceSpec(kind="files", path=str(tmp_path)), tmp_path)
    assert texts[0] == "caf\ufffd au lait \ufffd\ufffd fin \ufffd."
    assert texts[1] == "na\ufffdve" and texts[2].startswith("lone \ufffd")
    assert stats.invalid_utf8_replaced == 3 + 1 + 3 and stats.invalid_utf8_documents == 3
    assert decode_utf8("ok \ufffd".encode()) == ("ok \ufffd", 0)
    ds = build_packed(DataConfig(sources=[SourceSpec(kind="files", path=str(tmp_path))], seq_len=16,
                                 cache_dir=str(tmp_path / "c")), load_tokenizer("tiny-llama"))
    assert ds.stats["sources"][0]["invalid_utf8_replaced"] == 7


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "hub"])
def test_missing_text_field_names_it_and_the_fields_there(tmp_path, kind):
    records = {"body": TEXTS, "title": ["a", "b", "c"]}
    if kind == "jsonl":
        spec = SourceSpec(kind="files", path=str(jsonl(tmp_path / "d.jsonl", [{"body": t, "title": "a"}
                                                                             for t in TEXTS])))
    else:
        (tmp_path / "ds").mkdir()
        path = parquet(tmp_path / "ds" / "train.parquet", records)
        spec = (SourceSpec(kind="files", path=str(path)) if kind == "parquet"
                else SourceSpec(kind="hub", name=str(tmp_path / "ds")))
    with pytest.raises(DataError, match=r"text field 'text' not found; fields: body, title"):
        texts_of(spec, tmp_path)


def test_fewer_tokens_than_one_row_gives_both_numbers(tmp_path):
    (tmp_path / "a.txt").write_text(TEXTS[0])
    tokens = len(TEXTS[0].encode()) + 1  # byte tokens + EOS
    cfg = DataConfig(sources=[SourceSpec(kind="files", path=str(tmp_path / "a.txt"))], seq_len=4096,
                     cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match=rf"gives? {tokens} tokens.*fewer than one row of seq_len=4,096"):
        build_packed(cfg, load_tokenizer("tiny-llama"))
    assert list((tmp_path / "c" / "rows").iterdir()) == []


@pytest.mark.parametrize("case", ["broken_link", "bad_gzip", "bad_gzip_jsonl", "bad_parquet", "missing"])
def test_unreadable_file_fails_with_its_path(tmp_path, case):
    bad = {"broken_link": tmp_path / "gone.txt", "bad_gzip": tmp_path / "x.txt.gz",
           "bad_gzip_jsonl": tmp_path / "x.jsonl.gz", "bad_parquet": tmp_path / "x.parquet",
           "missing": tmp_path / "nothing.jsonl"}[case]
    if case == "broken_link":
        bad.symlink_to(tmp_path / "does-not-exist.txt")
    elif case == "bad_gzip":
        bad.write_bytes(b"plain bytes, not gzip")
    elif case == "bad_gzip_jsonl":  # valid start, truncated stream: fails while reading lines
        bad.write_bytes(gzip.compress(b'{"text": "a"}\n' * 1000)[:60])
    elif case == "bad_parquet":
        bad.write_bytes(b"PAR1 this is not a parquet file")
    with pytest.raises(DataError, match=re.escape(str(bad))):
        texts_of(SourceSpec(kind="files", path=str(bad if case != "broken_link" else tmp_path)), tmp_path)


def test_unsupported_or_unmatched_paths(tmp_path):
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(DataError, match="unsupported file type"):
        texts_of(SourceSpec(kind="files", path=str(tmp_path / "a.csv")), tmp_path)
    with pytest.raises(DataError, match="no .* files match"):
        texts_of(SourceSpec(kind="files", path=str(tmp_path / "*.jsonl")), tmp_path)
    with pytest.raises(DataError, match=r"not valid JSON"):
        (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n{broken\n')
        texts_of(SourceSpec(kind="files", path=str(tmp_path / "b.jsonl")), tmp_path)


def test_hub_dataset_that_cannot_load_names_it(tmp_path):
    with pytest.raises(DataError, match="could not load no-such-user/no-such-dataset"):
        texts_of(SourceSpec(kind="hub", name="no-such-user/no-such-dataset"), tmp_path)


@pytest.mark.parametrize("bad, message", [
    (dict(mode="concat", block_cross_doc=True), "block_cross_doc needs mode: reset"),
    (dict(mode="pose", seq_len=64), "pose needs pose_target_len > seq_len"),
    (dict(mode="reset", pose_target_len=128), "only used with mode: pose"),
    (dict(sources=[{"kind": "files"}]), "needs `path`"),
    (dict(seq_len=8, typo=1), "Extra inputs are not permitted"),
])
def test_config_rejects_contradictions(bad, message):
    with pytest.raises(ValidationError, match=message):
        DataConfig(**bad)


def bad_folder(tmp_path):
    """Three good documents among five bad ones: a truncated .txt.gz, a JSONL line that is not JSON, one that is not
    an object, one without the text field, one whose text is a number; returns the folder and the bad file."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.txt").write_text(TEXTS[0])
    (folder / "b.txt.gz").write_bytes(gzip.compress(TEXTS[1].encode() * 50)[:40])  # a truncated download
    (folder / "c.jsonl").write_text("\n".join([json.dumps({"text": TEXTS[1]}), "{broken", "[1, 2]",
                                               json.dumps({"body": "no text field"}), json.dumps({"text": 7}),
                                               json.dumps({"text": TEXTS[2]})]) + "\n")
    return folder


def test_a_bad_document_names_its_file_and_line_by_default(tmp_path):
    folder = bad_folder(tmp_path)
    with pytest.raises(DataError, match=re.escape(f"cannot read {folder / 'b.txt.gz'}")) as e:
        texts_of(SourceSpec(kind="files", path=str(folder)), tmp_path)
    assert "data.on_bad_document: skip" in str(e.value) and "\n" not in str(e.value)
    (folder / "b.txt.gz").unlink()
    with pytest.raises(DataError, match=re.escape(f"{folder / 'c.jsonl'}:2: not valid JSON")):
        texts_of(SourceSpec(kind="files", path=str(folder)), tmp_path)


def test_on_bad_document_skip_counts_and_names_what_it_left_out(tmp_path, capsys):
    folder = bad_folder(tmp_path)
    spec = SourceSpec(kind="files", path=str(folder))
    texts, stats = read_source(spec, tmp_path / "hf", on_bad_document="skip")
    assert texts == [TEXTS[0], TEXTS[1], TEXTS[2]]
    assert (stats.documents_read, stats.bad_skipped, stats.documents_kept) == (8, 5, 3)
    assert stats.bad_examples[0].startswith(f"cannot read {folder / 'b.txt.gz'}")
    assert stats.bad_examples[1].startswith(f"{folder / 'c.jsonl'}:2: not valid JSON") and len(stats.bad_examples) == 3
    cfg = DataConfig(sources=[spec], seq_len=8, cache_dir=str(tmp_path / "c"), on_bad_document="skip")
    ds = build_packed(cfg, load_tokenizer("tiny-llama"))
    assert ds.stats["sources"][0]["bad_skipped"] == 5 and ds.stats["documents"] == 3
    assert "bad documents skipped 5" in capsys.readouterr().err
    # the default still refuses the same data: a different cache key, so the skipping build is not reused for it
    with pytest.raises(DataError, match="cannot read"):
        build_packed(cfg.model_copy(update={"on_bad_document": "error"}), load_tokenizer("tiny-llama"))
