"""The testbed: its tokenizer (single-digit tokens, deterministic), its synthetic documents (the evaluation's passkey
prompt with the key where asked, inside the native window), the synthetic data source, its configs, the cached
build (reused while nothing changed, rebuilt when something did) and the demo's evaluation plan.

The heavy pretraining itself is not a test; the build test trains two steps.
"""

import json
import random
import re
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

import eval.passkey as passkey
from data import prompts
from configs.schema import load_run_config
from data.config import DataConfig, DataError, SourceSpec
from data.corpus import load_corpus
from data.pack import build_packed
from data.sources import read_source, source_fingerprint
from data.prompts import prompt_text
from data.synthetic import (copy_sample, corpus_words, fingerprint, generate, passkey_document, passkey_sample,
                            repeat_sample)
from data.tokenizer_train import DIGITS, build_tokenizer, train_bpe
from launch import testbed
from launch import demo
from models.build import apply_arch
from models.load import load_config, load_model, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TESTBED = ROOT / "configs" / "testbed"
COMMITTED_CONFIG = json.loads((testbed.COMMITTED_DIR / "config.json").read_text())
NATIVE = COMMITTED_CONFIG["max_position_embeddings"]  # the committed base's native length; the configs follow it
METHODS = {"pi": "linear", "ntk_aware": "ntk_aware", "ntk_by_parts": "ntk_by_parts", "yarn": "yarn"}


@pytest.fixture(scope="module")
def small_texts():
    """About 300 kB of real text (a slice of Emma) with numbers in it."""
    emma = next(d for d in load_corpus("train") if "emma" in d.name.lower()).text[:300_000]
    return [emma, "In 1811 there were 20374 people and 9 ships; call 555-0199 or 42."]


# ------------------------------------------------------------------------------------------------------ tokenizer


def test_every_digit_is_its_own_token_and_no_merge_holds_a_digit(small_texts):
    tok = train_bpe(small_texts, vocab_size=600)
    vocab = tok.get_vocab()
    assert all(d in vocab for d in DIGITS)
    assert [t for t in vocab if any(c in DIGITS for c in t) and t not in DIGITS] == []
    text = "The pass key is 90210. Remember it. 90210 is the pass key."
    ids = tok(text).input_ids
    pieces = tok.convert_ids_to_tokens(ids)
    assert [p for p in pieces if p in DIGITS] == list("90210") * 2
    assert tok.decode(ids) == text
    assert len(tok) == 600 and (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    assert tok("a").input_ids[:1] != [tok.bos_token_id]  # the packer adds specials, not the tokenizer


def test_tokenizer_training_is_deterministic(small_texts):
    a, b = train_bpe(small_texts, vocab_size=500), train_bpe(small_texts, vocab_size=500)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert train_bpe(small_texts[:1], vocab_size=500).backend_tokenizer.to_str() != a.backend_tokenizer.to_str()


def test_a_vocabulary_below_the_byte_alphabet_is_refused(small_texts):
    with pytest.raises(DataError, match="vocab_size must exceed 259"):
        train_bpe(small_texts, vocab_size=259)


# ----------------------------------------------------------------------------------------------- synthetic data


@pytest.mark.parametrize("before,after", [(0, 0), (0, 3), (2, 1), (5, 0)])
def test_passkey_document_is_the_eval_prompt_with_the_key_where_asked(before, after):
    text = passkey_document("48213", before, after)
    prompt = prompts.prompt_text("48213", before, after)
    assert text == f"{prompt} 48213."  # the evaluation's wording, followed by the answer
    head, tail = text.split(prompts.KEY_LINE.format(key="48213"))
    assert head.count(prompts.FILLER) == before and tail.count(prompts.FILLER) == after
    assert tail.rstrip().endswith(f"{prompts.QUESTION} 48213.")


def test_passkey_samples_are_reproducible_and_cover_every_depth():
    samples = [passkey_sample(i, 5, seed=0) for i in range(300)]
    assert samples == [passkey_sample(i, 5, seed=0) for i in range(300)]
    assert samples != [passkey_sample(i, 5, seed=1) for i in range(300)]
    assert {(b, a) for _, _, b, a in samples} == {(b, a) for b in range(6) for a in range(6 - b)}
    for text, key, before, after in samples:
        assert re.fullmatch(r"\d{5}", key) and text == passkey_document(key, before, after)


def test_passkey_min_filler_keeps_documents_long_and_depths_even():
    samples = [passkey_sample(i, 6, seed=2, min_filler=4) for i in range(400)]
    assert {b + a for _, _, b, a in samples} == {4, 5, 6}
    assert {(b, a) for _, _, b, a in samples} == {(b, n - b) for n in (4, 5, 6) for b in range(n + 1)}
    # min_filler 0 is the stream as it was: committed configs keep their documents
    assert [passkey_sample(i, 5, seed=0, min_filler=0) for i in range(50)] == [passkey_sample(i, 5) for i in range(50)]
    assert generate("passkey", 30, {"min_filler": 4, "max_filler": 6, "seed": 2}) == [t for t, *_ in samples[:30]]


def test_copy_documents_repeat_their_list():
    for i in range(50):
        m = re.fullmatch(r"Numbers: ([\d ]+)\. Again: ([\d ]+)\.", copy_sample(i, 3))
        assert m and m.group(1) == m.group(2) and 1 <= len(m.group(1).split()) <= 3


def test_copy_documents_with_filler_put_the_list_and_its_repeat_apart():
    counts = set()
    for i in range(200):
        text = copy_sample(i, 4, seed=5, min_filler=2, max_filler=6)
        m = re.fullmatch(r"Numbers: ([\d ]+)\.((?: " + re.escape(prompts.FILLER) + r")*) Again: ([\d ]+)\.", text)
        assert m and m.group(1) == m.group(3) and 1 <= len(m.group(1).split()) <= 4
        counts.add(m.group(2).count(prompts.FILLER))
        # the numbers are the stream's without filler: the filler count is drawn after them
        assert m.group(1) == re.match(r"Numbers: ([\d ]+)\.", copy_sample(i, 4, seed=5)).group(1)
    assert counts == {2, 3, 4, 5, 6}
    assert copy_sample(3, 2, min_filler=0, max_filler=0) == copy_sample(3, 2)


def test_repeat_documents_repeat_random_corpus_words_across_the_filler():
    vocab = set(corpus_words())
    # the train split's words seen 50+ times: Persuasion (held out) adds none of its own, such as its hero's name
    assert 2000 < len(vocab) < 2500 and {"the", "elizabeth", "israel"} <= vocab and "wentworth" not in vocab
    pattern = re.compile(r"Words: ([a-z ]+)\.((?: " + re.escape(prompts.FILLER) + r")*) Again: ([a-z ]+)\.")
    counts, fillers, firsts = set(), set(), set()
    for i in range(200):
        m = pattern.fullmatch(repeat_sample(i, 3, 9, seed=2, min_filler=1, max_filler=3))
        assert m and m.group(1) == m.group(3) and set(m.group(1).split()) <= vocab
        counts.add(len(m.group(1).split()))
        fillers.add(m.group(2).count(prompts.FILLER))
        firsts.add(m.group(1).split()[0])
    assert counts == set(range(3, 10)) and fillers == {1, 2, 3} and len(firsts) > 150  # lists differ, bounds hold
    assert repeat_sample(5, 3, 9, seed=2) != repeat_sample(5, 3, 9, seed=3)
    assert generate("repeat", 6, {"min_words": 3, "max_words": 9, "seed": 2, "max_filler": 2, "shuffle": 1}) == \
        [repeat_sample(i, 3, 9, 2, 0, 2, 1) for i in range(6)]
    # every word of the repeat is a look-up: the list is a single-token word most of the time
    tok = load_tokenizer(str(testbed.COMMITTED_DIR))
    words = repeat_sample(0, 40, 40).split(" Again: ")[1].removesuffix(".").split()
    assert len(tok(" " + " ".join(words)).input_ids) < 2 * len(words)


def test_shuffled_filler_draws_the_groups_sentences_and_spreads_distances():
    tok = load_tokenizer(str(testbed.COMMITTED_DIR))
    for i in range(30):
        text, key, before, after = passkey_sample(i, 6, seed=4, min_filler=2, shuffle=1)
        # the same key and depth as the repeated-filler document; only the filler differs
        assert (key, before, after) == passkey_sample(i, 6, seed=4, min_filler=2)[1:]
        head, tail = text.split(prompts.KEY_LINE.format(key=key))
        filler = head.removeprefix(prompts.TASK).strip() + " " + tail.split(prompts.QUESTION)[0].strip()
        sentences = [f"{s.strip()}." for s in filler.strip().removesuffix(".").split(".") if s.strip()]
        assert len(sentences) == 5 * (before + after) and set(sentences) <= set(prompts.SENTENCES)
    assert copy_sample(7, 2, seed=5, min_filler=1, max_filler=4, shuffle=1).split(" Again: ")[1] == \
        copy_sample(7, 2, seed=5, min_filler=1, max_filler=4).split(" Again: ")[1]

    def gaps(shuffle: int) -> set[int]:  # key-to-question distances in tokens, for 3 filler groups between them
        out = set()
        for i in range(40):
            text = passkey_document("48213", 0, 3, random.Random(i) if shuffle else None)
            ids = tok(text).input_ids
            out.add(len(ids) - len(tok(text.split("48213")[0]).input_ids))
        return out
    # repeated groups: one distance (the lattice); drawn sentences: a spread of distances
    assert len(gaps(0)) == 1 and len(gaps(1)) >= 8
    assert generate("copy", 5, {"max_numbers": 2, "max_filler": 3, "shuffle": 1}) == \
        [copy_sample(i, 2, max_filler=3, shuffle=1) for i in range(5)]


@pytest.mark.parametrize("fields,message", [
    ({"kind": "synthetic", "name": "passkey"}, "needs `name` (one of: passkey, copy, repeat) and `max_docs`"),
    ({"kind": "synthetic", "name": "passkey", "max_docs": 5, "params": {"shuffle": 2}},
     "params.shuffle must be 0 (repeated filler groups) or 1 (sentences drawn at random), got 2"),
    ({"kind": "synthetic", "name": "password", "max_docs": 5}, "unknown synthetic generator 'password'"),
    ({"kind": "synthetic", "name": "passkey", "max_docs": 5, "params": {"depth": 1}}, "unknown params depth"),
    ({"kind": "synthetic", "name": "copy", "max_docs": 5, "params": {"max_numbers": 0}}, "positive integer"),
    ({"kind": "synthetic", "name": "passkey", "max_docs": 5, "params": {"max_filler": "5"}}, "non-negative integer"),
    ({"kind": "synthetic", "name": "passkey", "max_docs": 5, "params": {"min_filler": -1}}, "non-negative integer"),
    ({"kind": "synthetic", "name": "passkey", "max_docs": 5, "params": {"min_filler": 9, "max_filler": 8}},
     "params.min_filler (9) exceeds params.max_filler (8)"),
    ({"kind": "synthetic", "name": "passkey", "max_docs": 5, "params": {"min_filler": 6}},
     "exceeds params.max_filler (5)"),
    ({"kind": "synthetic", "name": "copy", "max_docs": 5, "params": {"min_filler": 3}},
     "synthetic copy: params.min_filler (3) exceeds params.max_filler (0)"),
    ({"kind": "synthetic", "name": "repeat", "max_docs": 5, "params": {"min_words": 60}},
     "synthetic repeat: params.min_words (60) exceeds params.max_words (50); lower min_words or raise max_words"),
    ({"kind": "synthetic", "name": "repeat", "max_docs": 5, "params": {"min_words": 0}}, "positive integer"),
    ({"kind": "synthetic", "name": "repeat", "max_docs": 5, "params": {"max_words": 10**6}},
     "params.max_words (1000000) is above its limit 2000; lower it"),
    ({"kind": "synthetic", "name": "copy", "max_docs": 5, "params": {"max_numbers": 13}}, "above its limit 12"),
    ({"kind": "synthetic", "name": "passkey", "max_docs": 5, "params": {"max_filler": 10**9}}, "above its limit 1000"),
    ({"kind": "synthetic", "name": "passkey", "max_docs": 5, "params": {"seed": 2**40}}, "above its limit"),
    ({"kind": "synthetic", "name": "copy", "max_docs": 5, "params": {"min_words": 3}}, "unknown params min_words"),
    ({"kind": "bundled", "params": {"seed": 1}}, "`params` is for synthetic sources only"),
])
def test_bad_synthetic_sources_fail_with_one_line(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SourceSpec.model_validate(fields)


def test_synthetic_source_reads_and_packs(tmp_path):
    spec = SourceSpec(kind="synthetic", name="passkey", max_docs=40, params={"max_filler": 2, "seed": 3})
    texts, stats = read_source(spec)
    assert texts == generate("passkey", 40, {"max_filler": 2, "seed": 3})
    assert (stats.source, stats.documents_kept) == ("synthetic:passkey", 40)
    cfg = DataConfig(sources=[spec, SourceSpec(kind="synthetic", name="copy", max_docs=40)], seq_len=128,
                     mode="reset", cache_dir=str(tmp_path / "cache"))
    ds = build_packed(cfg, load_tokenizer("tiny-llama"))
    assert len(ds) > 0 and [s["documents_kept"] for s in ds.stats["sources"]] == [40, 40]


def test_the_cache_key_follows_the_prompt_wording(monkeypatch):
    spec = SourceSpec(kind="synthetic", name="passkey", max_docs=1)
    before = source_fingerprint(spec)
    assert before == [fingerprint("passkey")] and before != [fingerprint("copy")]
    assert len({fingerprint(name) for name in ("passkey", "copy", "repeat")}) == 3
    monkeypatch.setattr(prompts, "FILLER", "The grass is blue.")
    assert source_fingerprint(spec) != before


# ------------------------------------------------------------------------------------------------------ configs


def test_base_config_pretrains_from_scratch_at_the_committed_native_length():
    cfg = testbed.load_base()
    arch = cfg.model.arch
    assert (cfg.model.init, cfg.lora.enabled, cfg.rope.method) == ("scratch", False, "none")
    assert arch["max_position_embeddings"] == cfg.data.seq_len == NATIVE
    built = apply_arch(load_config(cfg.model.name), dict(arch))  # the architecture the build trains
    assert built.rope_parameters["rope_theta"] == COMMITTED_CONFIG["rope_parameters"]["rope_theta"]
    assert arch["hidden_size"] == arch["num_attention_heads"] * arch["head_dim"]
    kinds = [(s.kind, s.name) for s in cfg.data.sources]
    assert ("bundled", None) in kinds and ("synthetic", "passkey") in kinds
    assert all(s.split == "train" for s in cfg.data.sources if s.kind == "bundled")  # held-out book never trained


@pytest.mark.parametrize("name", [f"{m}_{f}x" for m in METHODS for f in (4, 8)])
def test_extension_configs_match_their_names(name):
    cfg = load_run_config(TESTBED / f"{name}.yaml")
    method, factor = name.rsplit("_", 1)
    factor = int(factor[:-1])
    assert (cfg.rope.method, cfg.rope.factor) == (METHODS[method], factor)
    assert cfg.model.name == str(testbed.COMMITTED_DIR.relative_to(ROOT)) and cfg.lora.enabled
    assert cfg.data.seq_len == NATIVE * factor and cfg.output.dir == f"runs/testbed/{name}"
    assert cfg.eval.perplexity.lengths == cfg.eval.passkey.lengths == [NATIVE * k for k in (1, 2, 4, 8)]


def test_demo_evaluates_nine_models_for_each_metric():
    cfg = load_run_config(TESTBED / "yarn_4x.yaml")
    methods = {name: load_run_config(TESTBED / f"{name}_4x.yaml").rope.method for name in demo.METHODS}
    assert sorted(methods.values()) == ["linear", "ntk_aware", "ntk_by_parts", "yarn"]  # the mission's four
    runs = {name: Path(f"runs/demo/{name}_4x") for name in demo.METHODS}
    models = demo.demo_models(Path("models/testbed"), runs, methods)
    jobs = {name: cmds[0] for name, cmds in demo.eval_jobs(models, cfg.eval, Path("runs/demo/eval"), NATIVE)}
    names = ["base"] + [f"{m} x4" for m in methods.values()] + [f"{m} x4 fine-tuned" for m in methods.values()]
    assert sorted(jobs) == sorted(f"{k} {m}" for k in ("ppl", "passkey") for m in names)
    assert jobs["ppl linear x4"][jobs["ppl linear x4"].index("--rope") + 1:][:3] == ["linear", "--factor", "4"]
    assert "--rope" not in jobs["ppl base"] and "--rope" not in jobs["passkey yarn x4 fine-tuned"]
    assert jobs["passkey ntk_by_parts x4 fine-tuned"][jobs["passkey ntk_by_parts x4 fine-tuned"].index("--model")
                                                     + 1] == "runs/demo/ntk_by_parts_4x"
    every = ",".join(str(NATIVE * k) for k in (1, 2, 4, 8))
    for cmd in jobs.values():
        assert cmd[cmd.index("--lengths") + 1] == every

    def arg(cmd: list[str], flag: str, default: str | None = None) -> str:
        return cmd[cmd.index(flag) + 1] if flag in cmd or default is None else default  # a default is left out

    def depths(cmd: list[str]) -> list[float]:
        return [float(d) for d in arg(cmd, "--depths").split(",")]

    # the small plan: the config's prompts up to 4x (>= 20 per length: a cell means +-10 points), fewer at 8x,
    # appended to the same result folder; perplexity on half the config's stretch of the book
    small = dict(demo.eval_jobs(models, cfg.eval, Path("e"), NATIVE, plan="small"))
    near, far = small["passkey base"]
    assert arg(near, "--lengths") == ",".join(str(NATIVE * k) for k in (1, 2, 4)) and "--append" not in near
    assert arg(far, "--lengths") == str(NATIVE * 8) and far[-1] == "--append"
    assert arg(far, "--out") == arg(near, "--out")
    assert depths(near) == depths(jobs["passkey base"]) == [0, 0.25, 0.5, 0.75, 1]
    assert len(depths(near)) * int(arg(near, "--trials", "2")) >= 20
    assert depths(far) == [0, 0.5, 1] and arg(far, "--trials", "2") == "2"
    (ppl_small,) = small["ppl base"]
    assert arg(jobs["ppl base"], "--max-tokens") == "32768" and arg(ppl_small, "--max-tokens") == "16384"


def test_demo_reads_the_native_length_from_the_base_and_refuses_a_config_without_it(tmp_path):
    assert demo.native_length(testbed.COMMITTED_DIR) == NATIVE
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(testbed.TestbedError, match="gives no max_position_embeddings"):
        demo.native_length(tmp_path)


def test_demo_reading_names_every_method_with_its_figures():
    header = ["run", "model", "method", "factor", "fine_tuned", "ppl_mode", "ppl@1024", "passkey@256", "passkey@512",
              "passkey@1024"]
    rows = [["none x1", "b", "none", 1, False, "sliding", 92.0, 0.9, 0.3, 0.0]]
    for i, m in enumerate(["linear", "ntk_aware", "ntk_by_parts", "yarn"]):
        rows.append([f"{m} x4", "b", m, 4, False, "sliding", 100.0 - i, 0.1 * i, 0.0, 0.0])
        rows.append([f"{m} x4 (fine-tuned)", f"runs/demo/{m}", m, 4, True, "sliding", 80.0 - i, 1.0, 0.9, 0.8 - i / 10])
    one, two = demo.reading(header, rows, 256)
    assert one.startswith("Perplexity at 1024 tokens (4x): fine-tuned yarn 77.0, ntk_by_parts 78.0")
    assert "training-free yarn 97.0" in one and one.endswith("the unscaled base 92.0.")
    assert two.startswith("Passkey at 1x-4x (256-1024 tokens), mean: fine-tuned linear 90%, ntk_aware 87%")
    assert two.endswith("the base 40% (90% at 256).")


# ---------------------------------------------------------------------------------------------- slow: the build


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory):
    """The committed base's recipe computed afresh from the current tree, its tokenizer trained anew."""
    manifest = json.loads((testbed.COMMITTED_DIR / testbed.MANIFEST).read_text())
    folder = tmp_path_factory.mktemp("rebuilt") / "tok"
    return manifest, testbed.recipe(manifest["overrides"], tokenizer_dir=folder), folder


@pytest.mark.slow
def test_a_rebuild_of_the_committed_base_has_its_recipe(rebuilt):
    """What `make testbed` reproduces exactly (config, tokenizer, data; the key made of them), from the current tree
    with the tokenizer trained afresh; the weights themselves differ across CPUs and are not compared."""
    manifest, recipe, folder = rebuilt
    assert testbed.recipe_differences(manifest, recipe) == []
    assert (folder / "tokenizer.json").read_bytes() == (testbed.COMMITTED_DIR / "tokenizer.json").read_bytes()


@pytest.mark.slow
def test_testbed_tokenizer_fits_the_base_and_its_passkey_documents_fit_the_window(rebuilt, tmp_path):
    cfg = testbed.load_base()
    a, b = rebuilt[2], build_tokenizer(tmp_path / "b", 4096)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    tok = AutoTokenizer.from_pretrained(a)
    arch = cfg.model.arch
    assert (len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        arch["vocab_size"], arch["bos_token_id"], arch["eos_token_id"], arch["pad_token_id"])
    max_filler = max(s.params["max_filler"] for s in cfg.data.sources if s.name == "passkey")
    assert _longest_passkey_document(tok, max_filler) + 1 <= cfg.data.seq_len  # + EOS: answer included, it fits
    # and the evaluation at the native length asks about a key as far away as the training samples put it
    prompt = passkey.build_prompt(tok, cfg.data.seq_len, 0.0, "12345", 10)
    assert prompt.n_filler <= max_filler + 1


def _longest_passkey_document(tok, max_filler: int) -> int:
    return max(len(tok(passkey_document("99999", b, max_filler - b)).input_ids) for b in range(max_filler + 1))


@pytest.mark.parametrize("name", [f"{m}_{f}x" for m in METHODS for f in (4, 8)])
def test_extension_configs_pass_key_documents_reach_their_length_and_fit_it(name):
    """Fine-tuning keeps retrieval by training it across the new window: the longest pass-key documents fill a row
    (within one filler group), the shortest are the base's own."""
    cfg = load_run_config(TESTBED / f"{name}.yaml")
    tok = AutoTokenizer.from_pretrained(testbed.COMMITTED_DIR)
    fillers = sorted(s.params["max_filler"] for s in cfg.data.sources if s.name == "passkey")
    assert fillers[0] == next(s for s in testbed.load_base().data.sources if s.name == "passkey").params["max_filler"]
    longest = _longest_passkey_document(tok, fillers[-1])
    assert cfg.data.seq_len - 30 < longest + 1 <= cfg.data.seq_len  # a filler group is 29 or 30 tokens


@pytest.mark.slow
def test_build_is_cached_by_key_and_rebuilt_when_the_config_changes(tmp_path):
    small = ("data.sources=[{kind: synthetic, name: passkey, max_docs: 60}, "
             "{kind: synthetic, name: copy, max_docs: 60}]")
    sets = [f"output.dir={tmp_path / 'base'}", f"model.tokenizer={tmp_path / 'tok'}", "train.max_steps=2",
            "train.micro_batch_size=2", "train.warmup_steps=1", "train.save_every=0",
            f"data.cache_dir={tmp_path / 'cache'}", small]
    out = tmp_path / "model"
    assert testbed.build(sets, nproc=1, model_dir=out) == out
    weights = out / "model.safetensors"
    first = weights.stat().st_mtime_ns
    model = load_model(str(out))
    assert model.config.max_position_embeddings == NATIVE and model.config.vocab_size == 4096
    assert len(load_tokenizer(str(out))) == 4096
    key = yaml.safe_load((out / testbed.KEY_FILE).read_text())["key"]

    committed = testbed.install(out, tmp_path / "committed")  # what `--install` commits: the files and a manifest
    manifest = json.loads((committed / testbed.MANIFEST).read_text())
    assert manifest["key"] == key and manifest["overrides"] == sets and "--nproc 1" in manifest["build_command"]
    assert testbed.file_table(committed) == manifest["files"] and testbed.KEY_FILE not in manifest["files"]
    assert demo.check_base(committed) == committed
    (committed / "config.json").write_text((committed / "config.json").read_text().replace(f": {NATIVE},", ": 512,"))
    with pytest.raises(testbed.TestbedError, match="does not match its manifest.json"):
        demo.check_base(committed)  # a changed file: the demo refuses the base
    with pytest.raises(testbed.TestbedError, match="has no manifest.json"):
        demo.check_base(out)  # a build that was not installed

    testbed.build(sets, nproc=1, model_dir=out)  # same key: nothing trained
    assert weights.stat().st_mtime_ns == first

    testbed.build(sets[:2] + ["train.max_steps=3"] + sets[3:], nproc=1, model_dir=out)
    assert yaml.safe_load((out / testbed.KEY_FILE).read_text())["key"] != key
    assert weights.stat().st_mtime_ns != first


def test_the_committed_base_matches_its_manifest_and_loads_in_plain_transformers():
    folder = testbed.COMMITTED_DIR
    manifest = json.loads((folder / testbed.MANIFEST).read_text())
    assert testbed.file_table(folder) == manifest["files"]  # every file, byte for byte, and nothing else
    assert sum(f["bytes"] for f in manifest["files"].values()) <= 25 * 2**20
    assert "model.safetensors" in manifest["files"] and not list(folder.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(folder)  # plain transformers: no project code, no remote code
    tok = AutoTokenizer.from_pretrained(folder)
    assert model.config.max_position_embeddings == NATIVE and len(tok) == model.config.vocab_size == 4096
    ids = tok(prompt_text("12345", 2, 2), return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_lookup_distance_bench_scores_the_committed_base(capsys):
    """bench/lookup_distance.py on the committed base: it copies a number it has just seen (100% of the digits with
    no filler between), and bad settings are one-line usage errors."""
    import bench.lookup_distance as bench

    assert bench.main(["--models", "models/testbed", "--fillers", "0,2", "--docs", "4"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| models/testbed |"))
    cells = [c.strip() for c in row.strip("|").split("|")[1:]]
    assert cells[0] == "100%" and cells[1].endswith("%") and "k=2 (~" in out
    # --shuffle draws the filler sentence by sentence: other documents (another mean length), the same look-up at k=0
    assert bench.main(["--models", "models/testbed", "--fillers", "0,2", "--docs", "4", "--shuffle"]) == 0
    shuffled = capsys.readouterr().out
    assert "filler drawn sentence by sentence" in shuffled and "filler drawn" not in out
    assert shuffled.split("k=2 (~")[1].split(" ")[0] != out.split("k=2 (~")[1].split(" ")[0]
    srow = next(line for line in shuffled.splitlines() if line.startswith("| models/testbed |"))
    assert srow.strip("|").split("|")[1].strip() == "100%"
    # --words: repeated word lists (a look-up by content), their tokens scored where --numbers' digits were
    assert bench.main(["--models", "models/testbed", "--fillers", "0,2", "--docs", "2", "--words", "8"]) == 0
    words = capsys.readouterr().out
    assert "8 words per list" in words and "number(s)" not in words
    wcells = next(line for line in words.splitlines() if line.startswith("| models/testbed |")).strip("|").split("|")
    assert len(wcells) == 3 and all(c.strip().endswith("%") for c in wcells[1:])
    assert words.split("k=0 (~")[1].split(" ")[0] != out.split("k=0 (~")[1].split(" ")[0]  # other documents
    for bad in (["--fillers", "a,b"], ["--numbers", "0"], ["--docs", "0"], ["--fillers", "-1"], ["--words", "-1"],
                ["--words", "2001"]):
        with pytest.raises(SystemExit) as err:
            bench.main(bad)
        assert err.value.code == 2



def test_passkey_heads_bench_splits_the_logit_by_rotary_pair(capsys):
    """bench/passkey_heads.py on the committed base at its native length: the answers it reports are the model's
    (every digit right, as eval.passkey finds), its per-pair rotary terms add up to the model's own attention (the
    bench stops otherwise), and the head it names as the copy head puts most of its attention on the right digit."""
    import bench.passkey_heads as bench

    assert bench.main(["--model", "models/testbed", "--depths", "0.5,1", "--trials", "1"]) == 0
    out = capsys.readouterr().out
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| 0.5 |")
            or line.startswith("| 1 |")]
    assert len(rows) == 2 and all(r[2] == "yes" and r[3] == "4/4" for r in rows)
    assert all(float(r[5]) > 0.5 for r in rows)  # the copy head's share on the digit to copy
    assert out.count("| L") == COMMITTED_CONFIG["num_hidden_layers"] * COMMITTED_CONFIG["num_attention_heads"]
    for bad in (["--depths", "x"], ["--depths", "2"], ["--trials", "0"], ["--length", "8"]):
        with pytest.raises(SystemExit) as err:
            bench.main(bad)
        assert err.value.code == 2
