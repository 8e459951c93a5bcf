"""eval.common: a run folder, a model folder or a name, with or without a training-free RoPE method; greedy
decoding with a KV cache, alone and reusing the prefix a prompt shares with the previous one."""

import argparse

import pytest
import torch
import yaml

from eval.common import (
    EvalError,
    SharedPrefix,
    add_model_args,
    common_prefix,
    greedy_decode,
    load_eval_model,
    locate,
    model_variants,
    shared_prefix_for,
)
from utils.cli import run_cli
from eval.perplexity import main as perplexity_main
from ropescale.apply import apply_rope, rope_of
from models.load import load_config, load_model, tiny_tokenizer


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder as train.py leaves it: config.yaml and a merged model that carries YaRN x2."""
    run = tmp_path_factory.mktemp("runs") / "yarn-s2"
    model = load_model("tiny-llama", config=apply_rope(load_config("tiny-llama"), "yarn", 2.0))
    model.save_pretrained(run / "merged", safe_serialization=True)
    tiny_tokenizer().save_pretrained(run / "merged")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "tiny-llama"},
                                                     "rope": {"method": "yarn", "factor": 2.0}}))
    return run


def _args(*argv):
    ap = argparse.ArgumentParser()
    add_model_args(ap)
    return ap.parse_args(["--model", "x", *argv])


def test_run_folder_is_the_fine_tuned_merged_model(run_dir):
    em = load_eval_model(str(run_dir), {})
    assert em.info["fine_tuned"] and em.info["source"] == "run"
    assert (em.info["method"], em.info["factor"], em.info["original_context"]) == ("yarn", 2.0, 256)
    assert em.info["slug"] == "yarn-s2-yarn-x2-ft" and em.info["label"] == "yarn x2 (fine-tuned)"
    assert em.model.config.rope_parameters["rope_type"] == "yarn"
    # Its merged/ folder, named directly, is the same run.
    assert load_eval_model(str(run_dir / "merged"), {}).info["slug"] == "yarn-s2-yarn-x2-ft"


def test_plain_model_folder_is_not_fine_tuned(tmp_path, run_dir):
    folder = tmp_path / "copy"
    load_model(str(run_dir / "merged")).save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer().save_pretrained(folder)
    info = load_eval_model(str(folder), {}).info
    assert (info["source"], info["fine_tuned"], info["method"], info["slug"]) == ("folder", False, "yarn",
                                                                                 "copy-yarn-x2")


def test_training_free_method_is_applied_before_the_model_is_built():
    variant = model_variants(_args("--rope", "ntk_by_parts", "--factor", "4"))[0]
    em = load_eval_model("tiny-qwen2", variant)
    assert em.info["method"] == "ntk_by_parts" and em.info["factor"] == 4.0 and not em.info["fine_tuned"]
    assert rope_of(em.model.config)["method"] == "ntk_by_parts"
    assert em.model.config.rope_parameters["rope_type"] == "yarn"  # by-parts = YaRN without attention scaling
    assert em.model.config.rope_parameters["attention_factor"] == 1.0


def test_dynamic_yarn_gets_its_runtime_module():
    em = load_eval_model("tiny-llama", model_variants(_args("--rope", "dynamic_yarn", "--factor", "4"))[0])
    assert type(em.model.model.rotary_emb).__name__ == "DynamicYarnRotaryEmbedding"


def test_variants():
    assert [v["method"] for v in model_variants(_args("--rope", "none,linear", "--factor", "2"))] == ["none",
                                                                                                       "linear"]
    assert model_variants(_args("--rope", "none"))[0]["factor"] == 1.0
    assert model_variants(_args()) == [{}]
    with pytest.raises(EvalError, match="needs --factor"):
        model_variants(_args("--rope", "yarn"))
    with pytest.raises(EvalError, match="not valid JSON"):
        model_variants(_args("--rope", "yarn", "--factor", "2", "--rope-params", "{beta"))
    with pytest.raises(EvalError, match="need --rope"):
        model_variants(_args("--factor", "2"))


def test_locate_refuses_folders_that_hold_no_model(tmp_path):
    with pytest.raises(EvalError, match="neither a run folder"):
        locate(str(tmp_path))
    (tmp_path / "merged").mkdir()
    with pytest.raises(EvalError, match="merged has no config.json"):
        locate(str(tmp_path))


def test_scaling_a_scaled_model_again_is_refused_with_the_fix(run_dir, capsys):
    argv = ["--model", str(run_dir), "--rope", "linear", "--factor", "2", "--lengths", "256"]
    assert run_cli(perplexity_main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "rebase" in err and len(err.strip().splitlines()) == 1


def test_unknown_method_is_one_error_line(capsys):
    assert run_cli(perplexity_main, ["--model", "tiny-llama", "--rope", "yarnn", "--factor", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "yarn" in err[0]


def test_greedy_decode_with_cache_equals_recomputing_without_it():
    model = load_model("tiny-mistral")
    ids = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    got = greedy_decode(model, ids, 6)
    seq = list(ids)
    with torch.no_grad():
        for _ in range(6):
            seq.append(int(model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].argmax()))
    assert got == seq[len(ids):]


def test_shared_prefix_reuses_only_the_common_tokens_and_gives_the_same_answers():
    model = load_model("tiny-llama")
    rand = lambda n, seed: torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()  # noqa: E731
    base = rand(400, 0)
    prompts = [base, base[:250] + rand(120, 1), base[:250] + rand(120, 1),  # a depth later; the same prompt again
               base[:100] + rand(300, 2),  # a prefix under a third of the prompt: prefilled in full
               rand(200, 3), rand(200, 3)[:150] + rand(60, 4)]  # nothing shared; then a long prefix again
    assert [common_prefix(prompts[i - 1], prompts[i]) for i in range(1, 6)] == [250, 370, 100, 0, 150]
    expected = [0, 250, 369, 0, 0, 150]  # the last prompt token is always run: it gives the first answer token
    # chunks of 64 tokens after a cached prefix, as 1,024 do at real lengths
    shared, full = SharedPrefix(model, prefill_chunk=64), SharedPrefix(model, enabled=False)
    with torch.inference_mode():
        for ids, reuse in zip(prompts, expected):
            before = shared.reused
            assert shared.decode(ids, 5) == full.decode(ids, 5) == greedy_decode(model, ids, 5)
            assert shared.reused - before == reuse
            # the cache holds the prompt and all answer tokens but the last, computed as a full prefill would
            assert shared.cache.get_seq_length() == len(ids) + 4
            ref = model(input_ids=torch.tensor([ids]), use_cache=True).cache
            for a, b in zip(shared.cache.layers, ref.layers):
                torch.testing.assert_close(a.keys[..., :len(ids), :], b.keys, rtol=1e-4, atol=1e-5)
    assert shared.reused == sum(expected) and full.reused == 0
    assert shared.reused + shared.prefilled == sum(map(len, prompts))


def test_shared_prefix_is_off_for_methods_whose_table_depends_on_the_length(capsys):
    assert shared_prefix_for(True, dict(method="yarn")) and not shared_prefix_for(False, dict(method="yarn"))
    for method in ("dynamic_ntk", "dynamic_yarn", "longrope"):
        assert not shared_prefix_for(True, dict(method=method))
        assert "depends on the sequence length" in capsys.readouterr().err
