"""Packing invariants with real tokenizers and real text.

Two cases: the tiny byte tokenizer on a jsonl of many documents cut from the bundled corpus (many document
boundaries per row), and SmolLM2's tokenizer on the bundled train split at 8,192. Every check reads the built rows
back from disk and compares them with an independent tokenization of the input documents.
"""

from collections import Counter

import numpy as np
import pytest

from data.config import DataConfig, SourceSpec
from data.corpus import load_corpus
from data.pack import IGNORE_INDEX, build_packed, fit_documents, lay_stream, pose_positions
from data.stats import length_histogram
from models.load import load_tokenizer


def paragraph_documents(n_docs: int = 150, seed: int = 0) -> list[str]:
    """Real documents of varied length: runs of 1-11 consecutive paragraphs of Persuasion."""
    paras = load_corpus("heldout")[0].text.split("\n\n")
    rng = np.random.default_rng(seed)
    docs, i = [], 0
    while i < len(paras) and len(docs) < n_docs:
        k = int(rng.integers(1, 12))
        docs.append("\n\n".join(paras[i : i + k]))
        i += k
    return [d for d in docs if d.strip()]


def write_jsonl(path, texts, field="text"):
    import json

    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts))
    return path


def wrapped(tokenizer, texts, bos, eos) -> Counter:
    """Multiset of [BOS] doc EOS token sequences (as int32 bytes), tokenized here independently of data/."""
    head = [] if bos is None else [bos]
    return Counter(np.asarray(head + tokenizer(t, add_special_tokens=False)["input_ids"] + [eos], np.int32).tobytes()
                   for t in texts)


def complete_documents(ds, eos: int) -> tuple[Counter, bytes]:
    """The rows read back as one stream and split after each EOS: (multiset of complete documents, the partial one
    the rows end with), as int32 bytes."""
    flat = np.asarray(ds.arrays["input_ids"]).reshape(-1)
    pieces = np.split(flat, np.flatnonzero(flat == eos) + 1)
    return Counter(p.tobytes() for p in pieces[:-1]), pieces[-1].tobytes()


def conservation(ds, expected: Counter, eos: int) -> None:
    """Check that the rows are the input documents, each as often as expected, minus a counted tail."""
    complete, partial = complete_documents(ds, eos)
    assert not complete - expected, "rows hold a document more often than the input (duplicated or invented)"
    missing = expected - complete  # documents (partly) in the dropped tail
    if partial:
        assert any(m.startswith(partial) for m in missing), "the last partial document is not a prefix of an input"
    tail = sum(len(m) // 4 for m in missing.elements()) - len(partial) // 4
    assert tail == ds.stats["dropped_tokens"] < ds.seq_len
    assert ds.stats["kept_tokens"] == len(ds) * ds.seq_len == ds.stats["stream_tokens"] - tail


def check_rows(ds, seq_len):
    assert ds.arrays["input_ids"].shape == (len(ds), seq_len) and len(ds) == ds.stats["rows"] > 0
    for i in (0, len(ds) // 2, len(ds) - 1):
        row = ds[i]
        assert set(row) == {"input_ids", "labels", "position_ids"}
        assert all(v.shape == (seq_len,) and str(v.dtype) == "torch.int64" for v in row.values())


def check_reset(ds, eos):
    ids, labels, pos = (np.asarray(ds.arrays[k]) for k in ("input_ids", "labels", "position_ids"))
    doc_start = np.zeros_like(ids, dtype=bool)
    doc_start[:, 1:] = ids[:, :-1] == eos  # a document starts right after an EOS (independent of the packer)
    assert (pos[:, 0] == 0).all()
    assert (pos[:, 1:][doc_start[:, 1:]] == 0).all()
    inside = ~doc_start[:, 1:]
    assert (pos[:, 1:][inside] == pos[:, :-1][inside] + 1).all(), "positions not contiguous inside a document"
    assert (labels[doc_start] == IGNORE_INDEX).all(), "a label crosses a document boundary"
    assert (labels[~doc_start] == ids[~doc_start]).all()
    assert doc_start.sum() > 0


def check_concat(ds):
    ids, labels, pos = (np.asarray(ds.arrays[k]) for k in ("input_ids", "labels", "position_ids"))
    assert (pos == np.arange(ds.seq_len)).all()
    assert (labels == ids).all()


def check_pose(ds, target, chunks):
    ids, labels, pos = (np.asarray(ds.arrays[k]) for k in ("input_ids", "labels", "position_ids"))
    steps = np.diff(pos, axis=1)
    assert (pos[:, 0] == 0).all() and (steps >= 1).all() and pos.max() < target
    assert ((steps > 1).sum(axis=1) <= chunks - 1).all(), "more skips than chunk boundaries"
    assert (steps > 1).any(axis=1).mean() > 0.9, "almost every row should skip"
    # The skips reach the target: the longest relative distance seen is close to target - 1.
    assert (pos[:, -1] - pos[:, 0]).max() >= 0.9 * target
    assert (labels == ids).all()


@pytest.fixture(scope="module")
def tiny_case(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny")
    texts = paragraph_documents()
    tok = load_tokenizer("tiny-llama")
    src = SourceSpec(kind="files", path=str(write_jsonl(tmp / "docs.jsonl", texts)))
    return dict(tok=tok, texts=texts, sources=[src], cache=str(tmp / "cache"), seq_len=512, pose=(256, 4096),
                expected=wrapped(tok, texts, None, tok.eos_token_id))


@pytest.fixture(scope="module")
def smol_case(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smol")
    tok = load_tokenizer("smollm2-135m")
    texts = [d.text for d in load_corpus("train")]
    return dict(tok=tok, texts=texts, sources=[SourceSpec(kind="bundled", split="train")], cache=str(tmp / "cache"),
                seq_len=8192, pose=(2048, 16384), expected=wrapped(tok, texts, None, tok.eos_token_id))


def _build(case, mode, **kw):
    seq_len = case["pose"][0] if mode == "pose" else case["seq_len"]
    if mode == "pose":
        kw["pose_target_len"] = case["pose"][1]
    cfg = DataConfig(sources=case["sources"], seq_len=seq_len, mode=mode, cache_dir=case["cache"], **kw)
    return build_packed(cfg, case["tok"])


CASES = ["tiny_case", pytest.param("smol_case", marks=pytest.mark.slow)]


@pytest.mark.parametrize("case_name", CASES)
@pytest.mark.parametrize("mode", ["concat", "reset", "pose"])
def test_rows_positions_labels_and_conservation(request, case_name, mode):
    case = request.getfixturevalue(case_name)
    tok = case["tok"]
    ds = _build(case, mode)
    check_rows(ds, ds.seq_len)
    bos = tok.bos_token_id if tok("a")["input_ids"][:1] == [tok.bos_token_id] else None
    assert bos is None  # neither tokenizer adds a BOS by itself: documents are `doc EOS`
    conservation(ds, case["expected"], tok.eos_token_id)
    {"concat": check_concat, "reset": lambda d: check_reset(d, tok.eos_token_id),
     "pose": lambda d: check_pose(d, case["pose"][1], 2)}[mode](ds)
    assert ds.stats["documents"] == len(case["texts"])
    assert sum(ds.stats["doc_length_histogram"].values()) == len(case["texts"])


def test_bos_policy_forced_on(tiny_case):
    tok = tiny_case["tok"]
    ds = _build(tiny_case, "reset", add_bos=True)
    conservation(ds, wrapped(tok, tiny_case["texts"], tok.bos_token_id, tok.eos_token_id), tok.eos_token_id)
    ids, pos = np.asarray(ds.arrays["input_ids"]), np.asarray(ds.arrays["position_ids"])
    after_eos = np.zeros_like(ids, dtype=bool)
    after_eos[:, 1:] = ids[:, :-1] == tok.eos_token_id
    assert (ids[after_eos] == tok.bos_token_id).all() and (pos[after_eos] == 0).all()
    assert ds.stats["special_tokens"] == 2 * ds.stats["stream_documents"]


def test_weights_and_passes_repeat_documents(tiny_case, tmp_path):
    tok = tiny_case["tok"]
    texts_a, texts_b = tiny_case["texts"][:40], tiny_case["texts"][40:80]
    cfg = DataConfig(sources=[SourceSpec(kind="files", path=str(write_jsonl(tmp_path / "a.jsonl", texts_a)), weight=2),
                              SourceSpec(kind="files", path=str(write_jsonl(tmp_path / "b.jsonl", texts_b)),
                                         weight=0.5)],
                     seq_len=256, mode="reset", passes=3, cache_dir=str(tmp_path / "cache"))
    ds = build_packed(cfg, tok)
    a, b = wrapped(tok, texts_a, None, tok.eos_token_id), wrapped(tok, texts_b, None, tok.eos_token_id)
    assert ds.stats["stream_documents"] == 3 * (2 * 40 + 20) == 300
    found, _ = complete_documents(ds, tok.eos_token_id)
    assert set(found) <= set(a) | set(b)
    # Per pass: every A document twice, a seeded half of B once. Only the few documents reaching into the dropped
    # tail (< 256 tokens) can be missing from the complete ones.
    assert all(found[k] <= 6 for k in a) and all(found[k] <= 3 for k in b)
    total_a, total_b = sum(found[k] for k in a), sum(found[k] for k in b)
    assert 240 - 3 <= total_a <= 240 and 60 - 3 <= total_b <= 60 and total_a + total_b >= 297
    assert sum(1 for k in b if found[k]) > 20, "each pass should draw its own half of B"


def whole_in_rows(ds, eos: int) -> Counter:
    """Documents (``doc EOS``, int32 bytes) found complete inside one row, padding (EOS with label -100) left out."""
    ids, labels = np.asarray(ds.arrays["input_ids"]), np.asarray(ds.arrays["labels"])
    real = ~((ids == eos) & (labels == IGNORE_INDEX))
    flat, row_of = ids[real], np.nonzero(real)[0]
    cuts = np.union1d(np.flatnonzero(flat == eos) + 1, np.flatnonzero(np.diff(row_of)) + 1)  # after EOS, at rows
    return Counter(p.tobytes() for p in np.split(flat, cuts) if len(p) and p[-1] == eos)


def test_whole_docs_keeps_every_document_that_fits_in_one_row(tiny_case):
    """Persuasion paragraphs (byte tokens) in 2,048-token rows: cut from the stream, many documents that fit in a
    row straddle two; with whole_docs every one of them is whole in one row, nothing is lost or invented, and the
    padding is counted, ignored by the loss, at the rows' ends, its positions from 0."""
    eos, seq_len = tiny_case["tok"].eos_token_id, 2048
    fits = Counter({k: n for k, n in tiny_case["expected"].items() if len(k) // 4 <= seq_len})
    assert len(fits) > 50 and len(fits) < len(tiny_case["expected"])  # both kinds present

    def build(**kw):
        return build_packed(DataConfig(sources=tiny_case["sources"], seq_len=seq_len, mode="reset",
                                       cache_dir=tiny_case["cache"], **kw), tiny_case["tok"])

    stream, whole = build(), build(whole_docs=True, block_cross_doc=True)
    assert fits - whole_in_rows(stream, eos), "the stream packer should cut some of them (else this tests nothing)"
    assert not fits - whole_in_rows(whole, eos)
    ids, labels, pos = (np.asarray(whole.arrays[k]) for k in ("input_ids", "labels", "position_ids"))
    pad = (ids == eos) & (labels == IGNORE_INDEX)
    st = whole.stats
    assert pad.sum() == st["padding_tokens"] > 0 and st["dropped_tokens"] == 0
    assert (~pad).sum() == st["kept_tokens"] == st["stream_tokens"] == stream.stats["stream_tokens"]
    assert st["efficiency"] == st["kept_tokens"] / (st["stream_tokens"] + st["padding_tokens"]) > 0.8
    for row, p, q in zip(ids, pad, pos):
        n = int(p.sum())
        assert not p[: seq_len - n].any(), "padding only at the row's end"
        if n:
            assert (q[seq_len - n :] == np.arange(n)).all() and row[seq_len - n - 1] == eos


def test_fit_documents_first_fit_properties():
    """Random documents of 1-40 tokens (and one of 75) into rows of 16 with 1-5 open rows: every token once;
    each document that fits (with its EOS) inside one row, contiguous; a longer one fills whole rows but its rest."""
    rng = np.random.default_rng(0)
    for max_open in (1, 2, 5):
        docs = [np.full(n, 10 + i, np.int32) for i, n in enumerate(rng.integers(1, 40, size=150))]
        docs.append(np.full(75, 9, np.int32))
        tokens, starts = lay_stream(docs, rng.permutation(len(docs)), None, 1)
        out, new_starts, pad = fit_documents(tokens, starts, 16, pad_id=1, max_open=max_open)
        assert len(out) % 16 == 0 and (out[pad] == 1).all() and (~pad).sum() == len(tokens)
        rows = out.reshape(-1, 16)
        for d in docs:
            at = np.flatnonzero(out == d[0])
            if len(d) + 1 <= 16:  # the document and its EOS
                assert len(set(at // 16)) == 1 and (np.diff(at) == 1).all()
            else:
                full = -(-(len(d) + 1) // 16) - 1
                assert (rows == d[0]).all(axis=1).sum() == full, "a long document fills whole rows but its rest"
        assert np.isin(np.flatnonzero(~pad & (np.roll(out, 1) == 1)), new_starts).all()


def test_whole_docs_needs_reset():
    with pytest.raises(ValueError, match="whole_docs needs mode: reset"):
        DataConfig(seq_len=512, mode="concat", whole_docs=True)


def test_pose_positions_follow_the_paper_bounds():
    rng = np.random.default_rng(0)
    for chunks in (2, 3, 5):
        for _ in range(200):
            pos = pose_positions(64, 1000, chunks, rng)
            steps = np.diff(pos)
            assert pos[0] == 0 and (steps >= 1).all() and pos[-1] <= 999
            assert (steps > 1).sum() <= chunks - 1


def test_length_histogram_bins():
    assert length_histogram(np.array([1, 2, 3, 1023, 1024, 5000])) == {
        "[1, 2)": 1, "[2, 4)": 2, "[512, 1024)": 1, "[1024, 2048)": 1, "[4096, 8192)": 1}
