"""eval.perplexity: both definitions equal a plain full-logits implementation; windows, data loading, CLI output."""

import json
import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eval.common import EvalError
from eval.perplexity import (
    evaluate_perplexity,
    load_hub_texts,
    load_texts,
    main,
    plan_windows,
)
from ropescale.apply import apply_rope
from models.load import load_config, load_model, tiny_tokenizer

EOS = 257  # the tiny byte-level tokenizer's </s>


@pytest.fixture(scope="module")
def model64():
    """tiny-llama with YaRN x4 (native 256 -> 1024), in float64 so that 1e-6 compares definitions, not rounding."""
    return load_model("tiny-llama", config=apply_rope(load_config("tiny-llama"), "yarn", 4.0), dtype=torch.float64)


@pytest.fixture(scope="module")
def texts():
    # Two real documents of different lengths (byte tokenizer: 1 token per byte): 700 and 380 tokens.
    from data.corpus import load_corpus

    book = load_corpus("heldout")[0].text
    return [book[1000:1700], book[5000:5380]]


def _full_logits_nll(model, ids: list[int]) -> torch.Tensor:
    """NLL of ids[1:] given the prefix, from the model's plain full logits: [len(ids) - 1]."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


def _reference_sliding(model, stream: list[int], length: int, stride: int) -> float:
    """Plain sliding-window perplexity: windows start at 0, stride, 2*stride, ... and the last ends at the end of the
    stream; each token is scored in the first window whose end is past it."""
    n = len(stream)
    begins = list(range(0, n - length, stride)) + [n - length]
    nll_sum, count, cache = 0.0, 0, {}
    for t in range(1, n):
        b = next(b for b in begins if b + length > t)
        if b not in cache:
            cache[b] = _full_logits_nll(model, stream[b : b + length])
        nll_sum += float(cache[b][t - b - 1])
        count += 1
    return math.exp(nll_sum / count)


def _reference_truncate(model, docs: list[list[int]], length: int) -> float:
    nll = [_full_logits_nll(model, d[:length]) for d in docs if len(d) >= length]
    return math.exp(float(torch.cat(nll).sum()) / sum(len(x) for x in nll))


def test_sliding_equals_plain_implementation(model64, texts):
    stream = list(texts[0].encode()) + [EOS] + list(texts[1].encode())  # the byte tokenizer, written out by hand
    out = evaluate_perplexity(model64, tiny_tokenizer(), texts, [256, 512], mode="sliding", stride=100)
    for length in (256, 512):
        ref = _reference_sliding(model64, stream, length, 100)
        assert abs(out["ppl"][str(length)] - ref) < 1e-6, (length, out["ppl"][str(length)], ref)
    assert all(r["tokens"] == len(stream) - 1 for r in out["results"])


def test_truncate_equals_plain_implementation(model64, texts):
    docs = [list(t.encode()) for t in texts]
    out = evaluate_perplexity(model64, tiny_tokenizer(), texts, [256, 512], mode="truncate")
    for length in (256, 512):
        ref = _reference_truncate(model64, docs, length)
        assert abs(out["ppl"][str(length)] - ref) < 1e-6
    by_len = {r["length"]: r for r in out["results"]}
    assert by_len[256]["documents"] == 2 and by_len[512]["documents"] == 1  # the 380-token document is skipped
    assert by_len[512]["tokens"] == 511


def test_max_tokens_scores_a_prefix_of_the_stream(model64, texts):
    stream = list(texts[0].encode()) + [EOS] + list(texts[1].encode())
    out = evaluate_perplexity(model64, tiny_tokenizer(), texts, [256], stride=100, max_tokens=600)
    assert out["results"][0]["tokens"] == 599
    assert abs(out["ppl"]["256"] - _reference_sliding(model64, stream[:600], 256, 100)) < 1e-6
    for bad, mode in ((255, "sliding"), (600, "truncate")):
        with pytest.raises(EvalError, match="--max-tokens applies to --mode sliding only"):
            evaluate_perplexity(model64, tiny_tokenizer(), texts, [256], mode=mode, max_tokens=bad)


def test_batching_does_not_change_the_numbers(model64, texts):
    one = evaluate_perplexity(model64, tiny_tokenizer(), texts, [256], stride=64, batch_size=1)
    three = evaluate_perplexity(model64, tiny_tokenizer(), texts, [256], stride=64, batch_size=3)
    assert abs(one["ppl"]["256"] - three["ppl"]["256"]) < 1e-9


def test_position_buckets_average_to_the_first_window(model64, texts):
    out = evaluate_perplexity(model64, tiny_tokenizer(), texts[:1], [512], mode="truncate", n_buckets=8)
    buckets = out["positions"]["buckets"]
    assert out["positions"]["length"] == 512 and len(buckets) == 8
    assert buckets[0]["start"] == 1 and buckets[-1]["end"] == 512
    weighted = sum(b["nll"] * (b["end"] - b["start"]) for b in buckets) / 511
    assert abs(weighted - out["results"][0]["nll_mean"]) < 1e-9  # one document: the window is the whole score


@settings(max_examples=200, deadline=None)
@given(n=st.integers(2, 3000), length=st.integers(2, 600), data=st.data())
def test_windows_score_every_token_once_with_enough_context(n, length, data):
    stride = data.draw(st.integers(1, length - 1))
    windows = plan_windows(n, length, stride)
    scored = [t for _, e, s in windows for t in range(s, e)]
    assert scored == list(range(1, n))  # every token but the first, once, in order
    size = min(n, length)
    for i, (b, e, s) in enumerate(windows):
        assert 0 <= b < s <= e <= n and e - b == size
        if i:
            assert s - b >= length - stride  # context of the first scored token of a later window


def test_bad_stride_and_lengths_are_refused(model64, texts):
    tok = tiny_tokenizer()
    with pytest.raises(EvalError, match="stride"):
        evaluate_perplexity(model64, tok, texts, [256], stride=256)
    with pytest.raises(EvalError, match="sliding only"):
        evaluate_perplexity(model64, tok, texts, [256], mode="truncate", stride=100)
    with pytest.raises(EvalError, match="fewer than the length"):
        evaluate_perplexity(model64, tok, texts, [4096])
    with pytest.raises(EvalError, match="no document has"):
        evaluate_perplexity(model64, tok, texts, [1024], mode="truncate")


def test_load_texts_from_files_and_folders(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "second"}) + "\n\n" + json.dumps({"text": "third"}) + "\n")
    texts, desc = load_texts([str(tmp_path)])
    assert texts == ["first document", "second", "third"] and str(tmp_path) in desc
    assert load_texts([str(tmp_path / "b.jsonl")], max_docs=1)[0] == ["second"]
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(EvalError, match="text-field"):
        load_texts([str(tmp_path / "bad.jsonl")])
    with pytest.raises(EvalError, match="not found"):
        load_texts([str(tmp_path / "a.txt"), str(tmp_path / "missing.txt")])
    texts, desc = load_texts(["bundled"])
    assert len(texts) == 1 and "persuasion" in desc


def test_dataset_path_goes_through_datasets(tmp_path, monkeypatch):
    """The hub code path (datasets.load_dataset), exercised offline with a local dataset folder."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "test.jsonl").write_text("".join(json.dumps({"content": t}) + "\n" for t in ["one", "two"]))
    assert load_hub_texts(str(ds), "test", "content") == ["one", "two"]
    with pytest.raises(EvalError, match="no column 'text'"):
        load_hub_texts(str(ds), "test", "text")
    with pytest.raises(EvalError, match="could not load dataset 'nobody/no-such-dataset'"):
        load_texts(["nobody/no-such-dataset"])  # HF_HUB_OFFLINE=1 in conftest: fails at once, with the fix named


def test_cli_writes_files_and_json_last_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "eval.perplexity", "--model", "tiny-qwen2", "--rope", "linear", "--factor", "2",
         "--lengths", "256,512", "--mode", "truncate", "--out", str(tmp_path), "--json"],
        capture_output=True, text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"}, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result["ppl"]) == {"256", "512"} and all(v > 1 for v in result["ppl"].values())
    assert result["model"]["method"] == "linear" and result["model"]["factor"] == 2.0
    assert result["definition"].startswith("truncate:")
    assert all(r["tokens_per_s"] > 0 for r in result["results"])
    folder = tmp_path / "tiny-qwen2-linear-x2"
    assert json.loads((folder / "perplexity.json").read_text()) == result
    assert "Definition: truncate:" in (folder / "perplexity.md").read_text()
    assert (folder / "perplexity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_cli_bad_input_is_one_error_line(tmp_path, capsys):
    from utils.cli import run_cli

    assert run_cli(main, ["--model", "tiny-llama", "--data", str(tmp_path / "nope.txt"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: data file not found")
    assert run_cli(main, ["--model", "tiny-llama", "--rope", "yarn", "--lengths", "256"]) == 2
    assert "needs --factor" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
