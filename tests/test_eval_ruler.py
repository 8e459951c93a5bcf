"""eval.ruler: every task's samples hold their answers where the depth says, at the length asked, from the seed; the
scoring on hand-made answers; bad input as one line; the CLI end to end on the tiny model (real greedy decoding)."""

import json
import re

import pytest
from pydantic import ValidationError

from eval.common import EvalError, common_prefix
from eval.compare import main as compare_main
from eval.ruler import (
    RulerSettings,
    TASKS,
    build_sample,
    effective_length,
    haystack,
    main,
    sample_rng,
    string_match_all,
    summarize,
)
from models.load import load_tokenizer
from utils.cli import run_cli


@pytest.fixture(scope="module")
def smol():
    return load_tokenizer("smollm2-135m")


def _context_span(tok, s):
    """(first context token, first question token) of sample ``s``: where the haystack starts and ends."""
    t = TASKS[s.task]
    start = len(tok(f"{t.instruction}\n\n").input_ids)
    end = len(tok(s.text[: s.text.rindex("\n\n")]).input_ids)
    return start, end


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("length", [2048])
def test_samples_fit_the_length_hold_their_answers_and_repeat_from_the_seed(smol, task, length):
    t = TASKS[task]
    depths = [0.0, 0.5, 1.0] if t.has_depth else [None]
    for depth in depths:
        s = build_sample(smol, task, length, depth, index=0, seed=3)
        budget = length - t.max_new_tokens
        # the longest prompt that fits: one more unit (a word of text, a list item, a coded word) would not
        assert budget - 12 < len(s.ids) <= budget, (task, depth, len(s.ids))
        assert s.ids == smol(s.text).input_ids
        context = s.text[s.text.index("\n\n") + 2: s.text.rindex("\n\n")]
        for a in s.answers:
            assert a in context, (task, a)
        assert build_sample(smol, task, length, depth, index=0, seed=3) == s  # same seed, same sample
        other = build_sample(smol, task, length, depth, index=1, seed=3)
        assert other.text != s.text and other.answers != s.answers
        if depth is None:
            assert s.needle_token is None
            continue
        # the (first) needle after round(depth x n) of the prompt's n haystack sentences (the haystack is the first
        # thing a sample's RNG draws, so the test can draw it again); other needles do not count as sentences
        hay = haystack(sample_rng(3, task, length, 0), s.units)
        if task.startswith("niah"):
            at = context.rindex("The special number for ", 0, context.index(f" is {s.answers[0]}."))
            needles = r"The special number for \S+ is \d+\. ?"
        else:
            at = context.index(f"VAR {s.answers[0]} = ")
            needles = r"VAR [A-Z]{5} = (VAR [A-Z]{5}|\d+)\. ?"
        before = re.sub(needles, "", context[:at]).strip()
        assert before == " ".join(hay[:round(depth * len(hay))]), (task, depth)
        # the needle's token index: the needle starts there, right after the instruction at depth 0
        start, end = _context_span(smol, s)
        assert start - 1 <= s.needle_token < end
        assert smol.decode(s.ids[s.needle_token:]).lstrip().startswith(("The special number for ", "VAR "))
        assert (smol.decode(s.ids[:s.needle_token]).strip() == t.instruction) == (depth == 0.0)


@pytest.mark.parametrize("task", [t for t in TASKS if TASKS[t].has_depth])
def test_the_depths_of_a_sample_share_its_haystack_up_to_the_earlier_needle(smol, task):
    s = [build_sample(smol, task, 2048, d, index=1, seed=0) for d in (0.0, 0.3, 0.7, 1.0)]
    assert len({x.answers for x in s}) == 1  # the same keys and numbers: only the place moves
    for a, b in zip(s, s[1:]):
        assert common_prefix(a.ids, b.ids) >= a.needle_token - 1  # a merge at the join may take one token
        assert common_prefix(a.ids, b.ids) < b.needle_token


def test_answers_are_where_the_needles_say(smol):
    s = build_sample(smol, "niah_multikey", 2048, 0.25, index=0, seed=0)
    context = s.text[s.text.index("\n\n") + 2: s.text.rindex("\n\n")]
    assert context.count("The special number for ") == 4  # the asked needle and three distractors
    key = s.text.rsplit("The special number for ", 1)[1].split(" is")[0]
    assert f"The special number for {key} is {s.answers[0]}." in context
    q = build_sample(smol, "niah_multiquery", 2048, 0.25, index=0, seed=0)
    assert len(q.answers) == 4 and "What are all the special numbers for " in q.text
    v = build_sample(smol, "vt", 2048, 0.5, index=0, seed=0)
    names = list(v.answers)
    value = v.text.split(f"VAR {names[0]} = ", 1)[1].split(".", 1)[0]
    assert value.isdigit() and all(f"VAR {b} = VAR {a}." in v.text for a, b in zip(names, names[1:]))
    c = build_sample(smol, "cwe", 2048, None, index=0, seed=0)
    listed = c.text.split("\n\n")[1].split(" ")[1::2]  # "1. word 2. word ...": every second item is a word
    counts = {w: listed.count(w) for w in set(listed)}
    assert set(sorted(counts, key=lambda w: -counts[w])[:10]) == set(c.answers)
    assert min(counts[w] for w in c.answers) > max(n for w, n in counts.items() if w not in c.answers)
    f = build_sample(smol, "fwe", 2048, None, index=0, seed=0)
    coded = f.text.split("\n\n")[1].split()
    freq = {w: coded.count(w) for w in set(coded) if w != "...."}
    assert sorted(freq, key=lambda w: -freq[w])[:3] == list(f.answers)
    assert coded.count("....") > max(freq.values())


def test_string_match_all_on_hand_made_answers():
    assert string_match_all(" 1234567.", ["1234567"]) == 1.0
    assert string_match_all("It is 7654321", ["1234567"]) == 0.0
    assert string_match_all("1111111, 2222222 and 4444444", ["1111111", "2222222", "3333333", "4444444"]) == 0.75
    assert string_match_all(" QWERT, ASDFG,\x00zxcvb", ["QWERT", "ASDFG", "ZXCVB", "POIUY", "LKJHG"]) == 0.6
    assert string_match_all("apple\tpear", ["Apple", "PEAR"]) == 1.0  # case-insensitive; tab -> newline
    assert string_match_all("", ["x"]) == 0.0


def test_the_settings_know_every_task_and_refuse_others():
    assert RulerSettings().tasks == list(TASKS)  # eval.ruler.tasks is checked before a run starts
    with pytest.raises(ValidationError):
        RulerSettings(tasks=["niah_single", "needle"])


def test_effective_length_is_the_longest_length_before_the_first_miss():
    assert effective_length({"1024": 0.9, "2048": 0.8, "4096": 0.5, "8192": 0.85}, 0.75) == 2048
    assert effective_length({"1024": 0.5}, 0.75) is None
    assert effective_length({"1024": 0.75, "2048": 0.75}, 0.75) == 2048


def test_the_default_threshold_is_relative_to_the_native_score_and_never_zero():
    settings = dict(tasks=["vt"], lengths=[256, 512, 1024])

    def result(scores):
        raw = dict(cells=[dict(task="vt", length=n, depth=0.0, score=v, samples=[]) for n, v in scores.items()],
                   prompt_tokens=0, reused_tokens=0, seconds=0.0)
        return summarize(dict(original_context=256), settings, raw, None)

    r = result({256: 0.8, 512: 0.75, 1024: 0.5})
    assert r["threshold"] == pytest.approx(0.72) and r["effective_length"] == 512
    r = result({256: 0.0, 512: 0.0, 1024: 0.0})  # 0.9 x 0 would make every length pass
    assert r["threshold"] is None and r["effective_length"] is None and "is 0" in r["threshold_rule"]


def test_bad_input_is_one_line(smol, tmp_path, capsys):
    with pytest.raises(EvalError, match="unknown task 'niah'"):
        build_sample(smol, "niah", 1024, 0.5, 0)
    with pytest.raises(EvalError, match="too short for cwe"):
        build_sample(smol, "cwe", 256, None, 0)
    with pytest.raises(EvalError, match="needs a depth in"):
        build_sample(smol, "vt", 1024, 1.5, 0)
    for args, message in [(["--tasks", "niah,vt"], "--tasks: Input should be 'niah_single', "),
                          (["--lengths", "64", "--tasks", "vt"], "too short for vt"),
                          (["--samples", "0", "--tasks", "vt"], "--samples: Input should be greater than or equal"),
                          (["--threshold", "2"], "--threshold: Input should be less than or equal to 1"),
                          (["--chat-template", "--tasks", "vt", "--lengths", "512"], "has no chat template")]:
        assert run_cli(main, ["--model", "tiny-llama", "--out", str(tmp_path), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) >= 1 and err[-1].startswith("error: ") and message in err[-1], err


@pytest.mark.parametrize("task", ["niah_multikey", "vt", "fwe"])
def test_a_chat_prompt_is_the_template_around_the_plain_question_with_the_answer_prefix_after(smol, task):
    plain = build_sample(smol, task, 2048, 0.5, index=0, seed=0)
    chat = build_sample(smol, task, 2048, 0.5, index=0, seed=0, chat=True)
    budget = 2048 - TASKS[task].max_new_tokens
    assert budget - 12 < len(chat.ids) <= budget and chat.ids == smol(chat.text).input_ids
    assert chat.answers == plain.answers and chat.units <= plain.units  # the template's tokens leave less room
    user, prefix = plain.text.rsplit("\nAnswer: ", 1)
    start = chat.text.index("<|im_start|>user\n") + len("<|im_start|>user\n")
    assert chat.text.startswith("<|im_start|>system\n") and chat.text.endswith("<|im_start|>assistant\n" + prefix)
    question = user.rsplit("\n\n", 1)[1]
    assert chat.text[start:].startswith(TASKS[task].instruction) and f"{question}<|im_end|>" in chat.text
    if chat.needle_token is not None:  # the needle's token index counts the template's tokens before it
        assert chat.needle_token > plain.needle_token - 12 and smol.decode(chat.ids[chat.needle_token:]).lstrip(
        ).startswith(("The special number for", "VAR "))


def test_cli_writes_the_table_heatmaps_and_effective_length(tmp_path):
    out = main(["--model", "tiny-llama", "--tasks", "niah_single,vt", "--lengths", "768,1024", "--depths", "0.5,1",
                "--samples", "1", "--out", str(tmp_path), "--threshold", "0.5"])
    folder = tmp_path / "tiny-llama-none-x1"
    assert json.loads((folder / "ruler.json").read_text()) == out
    assert set(out["by_task"]) == {"niah_single", "vt"} and set(out["by_length"]) == {"768", "1024"}
    assert len(out["cells"]) == 2 * 2 * 2 and all(len(c["samples"]) == 1 for c in out["cells"])
    assert all(0.0 <= c["score"] <= 1.0 for c in out["cells"])
    # depth 1 of a sample reused the half before depth 0.5's needle; the answers are those of prefilling in full
    assert 0 < out["reused_tokens"] < out["prompt_tokens"] and out["settings"]["shared_prefix"]
    full = main(["--model", "tiny-llama", "--tasks", "niah_single,vt", "--lengths", "768,1024", "--depths", "0.5,1",
                 "--samples", "1", "--out", str(tmp_path / "full"), "--threshold", "0.5", "--no-shared-prefix"])
    assert full["reused_tokens"] == 0 and not full["settings"]["shared_prefix"]
    assert [c["samples"][0]["prediction"] for c in full["cells"]] == [c["samples"][0]["prediction"]
                                                                      for c in out["cells"]]
    assert out["effective_length"] == effective_length(out["by_length"], 0.5)
    for task in ("niah_single", "vt"):
        assert (folder / f"ruler_{task}.png").read_bytes()[:4] == b"\x89PNG"
    assert "| niah_single |" in (folder / "ruler.md").read_text()

    # eval.compare puts the suite's averaged score per length and the effective length next to the other columns
    table = compare_main([str(folder), "--out", str(tmp_path / "cmp")])
    row = dict(zip(table["columns"], table["rows"][0]))
    assert table["columns"][-3:] == ["ruler@768", "ruler@1024", "ruler_effective"]
    assert [row["ruler@768"], row["ruler@1024"]] == [out["by_length"]["768"], out["by_length"]["1024"]]
    assert row["ruler_effective"] == out["effective_length"]
    # and a plot of the suite's score against length, only where some result has the suite
    png = tmp_path / "cmp" / "ruler.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and str(png) in table["files"]
