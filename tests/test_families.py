"""Every model family of models/families.py, on its tiny preset built from the real transformers class: every RoPE
method's rotary tables equal the registry's (transformers computes them from the config we write), the chunked loss
equals the model's own loss (logit soft-capping and scaling included), and (slow) two training steps under DeepSpeed
with an in-run evaluation, after which ``merged/`` reloads in a plain process with the fine-tuned logits at twice the
native length."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from models.build import build_model, scale, scaled_config
from models.families import FAMILIES, PUBLISHED, SLIDING, TINY_PRESETS, family_of, published_config, tiny_config
from models.load import load_config, load_model
from models.loss import causal_lm_loss
from ropescale.apply import head_dim_of, layer_tables, partial_rotary_factor_of, rope_of
from ropescale.methods import ROPE_METHODS, RopeConfigError, rotary_dim
from tests.helpers import PY, ROOT, train_env

L = 256  # every preset's native context

# The table: every family a user tried, the ones that failed included.
TRIED = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "olmo2", "granite", "smollm3", "stablelm", "glm",
         "gpt_neox", "phi3", "gemma2", "cohere", "gemma3_text", "olmo3")


def pairs(preset: str) -> int:
    config = tiny_config(preset)
    return rotary_dim(head_dim_of(config), partial_rotary_factor_of(config)) // 2


def params_of(method: str, preset: str) -> dict:
    n = pairs(preset)
    return {"ntk_aware": {"alpha": 1.5}, "theta": {"rope_theta": 1e5},
            "longrope": {"short_factor": [1.0 + 0.01 * i for i in range(n)],
                         "long_factor": [1.0 + 0.1 * i for i in range(n)]}}.get(method, {})


def refusal(preset: str, method: str) -> str | None:
    """What a family refuses, and the reason it must give."""
    family = FAMILIES[preset.removeprefix("tiny-")]
    if family.rope_types is not None and ROPE_METHODS[method].length_dependent and method != "longrope":
        return "recomputes its table from the current length"
    if family.per_layer_rope and method == "dynamic_yarn":
        return "one RoPE per layer type"
    return None


def rotary_tables(model) -> dict[str | None, tuple[torch.Tensor, float]]:
    """{layer type (None: the only one): (inv_freq, attention scaling)} as the model's own rotary module holds them."""
    rotary = model.get_submodule(next(n for n, _ in model.named_modules()
                                      if n.split(".")[-1] == family_of(model.config).rotary))
    types = layer_tables(model.config)
    if types is None:
        return {None: (rotary.inv_freq, float(getattr(rotary, "attention_scaling", 1.0)))}  # ours: 1 until a forward
    return {t: (getattr(rotary, f"{t}_inv_freq"), float(getattr(rotary, f"{t}_attention_scaling"))) for t in types}


def test_every_family_users_tried_is_in_the_spec_with_a_tiny_preset():
    assert set(TRIED) <= set(FAMILIES)
    assert {f"tiny-{t}" for t in TRIED} <= set(TINY_PRESETS)
    for preset in TINY_PRESETS:
        config = tiny_config(preset)
        assert config.model_type == preset.removeprefix("tiny-") and config.num_hidden_layers == 2
        if FAMILIES[config.model_type].per_layer_rope:  # both layer types present, so both tables are exercised
            assert set(config.layer_types) == {"full_attention", SLIDING}


CASES = [(p, m) for p in TINY_PRESETS for m in ROPE_METHODS]


@pytest.mark.parametrize("preset,method", CASES)
def test_the_model_computes_the_registry_tables(preset, method):
    """transformers' own rotary module, built from the config we write, holds the registry's table and attention
    scale on the scaled layers and the untouched table on the others; a family that cannot run a method says why."""
    base = load_config(preset)
    why = refusal(preset, method)
    if why:
        with pytest.raises(RopeConfigError, match=why):
            build_model(preset, scaled_config(preset, method, 2.0, params_of(method, preset)))
        return
    config = scaled_config(preset, method, 2.0, params_of(method, preset))
    model = build_model(preset, config)
    cur = rope_of(config)
    assert cur["method"] == method and cur["factor"] == 2.0
    tables = rotary_tables(model)
    originals = layer_tables(base) or {None: base.rope_parameters}
    for layer_type, (inv, attention) in tables.items():
        original = originals[layer_type]
        if layer_type not in (None, "full_attention"):  # Gemma 3's recipe: the sliding-window layers untouched
            want, scale_ = ROPE_METHODS["none"].fn(head_dim_of(base), original["rope_theta"],
                                                   partial_rotary_factor_of(base), L, 1.0, {})
        else:
            want, scale_ = ROPE_METHODS[method].fn(head_dim_of(base), original["rope_theta"],
                                                   partial_rotary_factor_of(base), L, 2.0,
                                                   {**ROPE_METHODS[method].defaults, **params_of(method, preset)})
        if method == "dynamic_yarn" and layer_type is None:  # our runtime module: plain RoPE until a forward
            want, scale_ = ROPE_METHODS["none"].fn(head_dim_of(base), original["rope_theta"],
                                                   partial_rotary_factor_of(base), L, 1.0, {})
        torch.testing.assert_close(inv, want, rtol=2e-6, atol=0)
        assert attention == pytest.approx(scale_, rel=1e-6)
    if FAMILIES[base.model_type].rope_types is not None and method not in ("none", "ntk_aware", "theta", "longrope"):
        assert config.rope_parameters["rope_type"] == "longrope"  # Phi-3: written as LongRoPE factors


@pytest.mark.parametrize("preset", [p for p in TINY_PRESETS if not refusal(p, "dynamic_yarn")])
def test_dynamic_yarn_at_the_target_length_is_static_yarn(preset):
    """The runtime module replaces the family's own rotary module with the family's table layout (Cohere
    interleaves the halves): at n = L s it gives static YaRN's logits."""
    ids = torch.randint(0, 256, (1, 2 * L), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dynamic = build_model(preset, scaled_config(preset, "dynamic_yarn", 2.0))(ids).logits
        static = build_model(preset, scaled_config(preset, "yarn", 2.0))(ids).logits
    torch.testing.assert_close(dynamic, static, atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_the_chunked_loss_is_the_models_own_loss(preset):
    """Gemma 2's soft-capping, Cohere's logit scale and Granite's logits scaling included: training and eval score
    what the model predicts."""
    model = build_model(preset, scaled_config(preset, "yarn" if not refusal(preset, "yarn") else "linear", 2.0))
    ids = torch.randint(0, 256, (2, 2 * L), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        own = model(ids, labels=ids, use_cache=False).loss
        total, n = causal_lm_loss(model, ids, ids, chunk_size=100)
    torch.testing.assert_close(total / n, own, atol=1e-5, rtol=0)
    if preset in ("tiny-gemma2", "tiny-cohere", "tiny-granite"):  # the transform matters: the raw head differs
        decoder, head = model.get_decoder(), model.get_output_embeddings()
        with torch.no_grad():
            raw = torch.nn.functional.cross_entropy(head(decoder(ids).last_hidden_state)[:, :-1].flatten(0, 1),
                                                    ids[:, 1:].flatten())
        assert abs(raw - own) > 1e-4  # 20x the tolerance above


def test_gemma3_scales_its_global_layers_only_unless_asked():
    base = load_config("tiny-gemma3_text")
    one = scale(base, "yarn", 4.0)
    assert one.rope_parameters[SLIDING] == base.rope_parameters[SLIDING]
    assert one.rope_parameters["full_attention"]["rope_type"] == "yarn"
    both = scale(base, "linear", 4.0, layer_types=["full_attention", SLIDING])
    assert {t["rope_type"] for t in both.rope_parameters.values()} == {"linear"}
    assert both.rope_parameters[SLIDING]["rope_theta"] == 1e4  # each layer type from its own base
    back = scale(both, "yarn", 2.0, rebase=True)  # a rebase restores the layers it no longer scales
    assert back.rope_parameters[SLIDING] == base.rope_parameters[SLIDING]
    with pytest.raises(RopeConfigError, match="one RoPE for all its layers"):
        scale(load_config("tiny-llama"), "yarn", 2.0, layer_types=["full_attention"])


def test_a_published_gemma3_config_is_rebased_from_its_linear_global_layers():
    """Gemma 3 as published: linear x8 on the global layers; a rebase replaces it there and leaves the local ones."""
    config = published_config("google/gemma-3-12b-pt")
    with pytest.raises(RopeConfigError, match="compound"):
        scale(config, "yarn", 4.0, original_len=32768)
    new = scale(config, "yarn", 4.0, original_len=32768, rebase=True)
    assert new.rope_parameters["full_attention"]["rope_type"] == "yarn"
    assert new.rope_parameters[SLIDING] == {"rope_type": "default", "rope_theta": 10000.0}
    assert new.max_position_embeddings == 131072


def test_phi3_longrope_form_equals_the_direct_tables_at_every_length():
    """The factors are one table for short and long inputs: a forward beyond L (where Phi-3 switches to the long
    factors) gives what the direct method gives."""
    config = scaled_config("tiny-phi3", "yarn", 4.0)
    rp = config.rope_parameters
    assert rp["rope_type"] == "longrope" and rp["short_factor"] == rp["long_factor"]
    assert config.original_max_position_embeddings == L
    model = build_model("tiny-phi3", config)
    model(torch.randint(0, 256, (1, 3 * L)))  # past L: transformers recomputes from long_factor
    want, attention = ROPE_METHODS["yarn"].fn(32, 1e4, 1.0, L, 4.0, {})
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, want, rtol=2e-6, atol=0)
    assert float(model.model.rotary_emb.attention_scaling) == pytest.approx(attention)


def test_gemma2_refuses_sdpa_and_picks_eager():
    with pytest.raises(Exception, match="sdpa"):
        load_model("tiny-gemma2", attn_implementation="sdpa")
    assert load_model("tiny-gemma2").config._attn_implementation == "eager"


def test_a_multimodal_gemma3_is_extended_as_its_text_decoder(tmp_path):
    """A multimodal Gemma 3 checkpoint (as transformers saves one): the config is its text decoder's and the decoder's
    weights load from it (vision tower left out), giving the multimodal model's hidden states."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = {k: v for k, v in tiny_config("tiny-gemma3_text").to_dict().items() if k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "max_position_embeddings", "layer_types", "sliding_window",
        "rope_parameters")}
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    wrapper = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                                          image_token_index=259, boi_token_index=257,
                                                          eoi_token_index=258)).eval()
    wrapper.save_pretrained(tmp_path)
    config = load_config(str(tmp_path))
    assert config.model_type == "gemma3_text" and rope_of(config)["rope_theta"] == 1e6
    model = load_model(str(tmp_path), config=config)
    ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = wrapper.model.language_model(input_ids=ids).last_hidden_state
        got = model.model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_sliding_windows_need_flash_attention_under_sequence_parallelism():
    from configs.schema import load_run_config
    from training.parallel import check_sequence_parallel
    from training.runtime import TrainError

    cfg = load_run_config(ROOT / "configs/cpu_tiny.yaml", ["train.sequence_parallel_size=2",
                                                           "data.block_cross_doc=false"])
    with pytest.raises(TrainError, match="sliding-window attention"):
        check_sequence_parallel(cfg, tiny_config("tiny-gemma3_text"), "sdpa", 2)
    check_sequence_parallel(cfg, tiny_config("tiny-gemma3_text"), "flash_attention_2", 2)
    check_sequence_parallel(cfg, tiny_config("tiny-llama"), "sdpa", 2)  # no window: fine


def test_a_family_outside_the_spec_works_where_its_modules_match(tmp_path):
    """Starcoder2 (not in the spec) has Llama's attention names but c_fc/c_proj MLPs: LoRA on attention passes the
    preflight; LoRA on the Llama MLP names is refused there, naming the modules it has."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from configs.schema import load_run_config
    from training.preflight import preflight
    from utils.cli import UserError

    config = AutoConfig.for_model("starcoder2", vocab_size=260, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                  max_position_embeddings=256, bos_token_id=256, eos_token_id=257)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "sc2")
    sets = [f"model.name={tmp_path / 'sc2'}", "model.tokenizer=tiny-llama", f"output.dir={tmp_path / 'run'}"]
    checked = preflight(load_run_config(ROOT / "configs/cpu_tiny.yaml", sets), None, plan_only=True)
    assert checked.model_config.model_type == "starcoder2"
    with pytest.raises(UserError, match="no module of .* is named 'gate_proj'.*c_fc"):
        preflight(load_run_config(ROOT / "configs/cpu_tiny.yaml", [*sets, "lora.target_modules=[mlp]"]), None,
                  plan_only=True)


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_the_memory_plan_reads_each_family(preset):
    """The plan's linears come from the spec: LoRA on the family's attention linears is what it counts."""
    from configs.schema import load_run_config
    from training.memory import count_params, plan_memory

    cfg = load_run_config(ROOT / "configs/cpu_tiny.yaml", [f"model.name={preset}"])
    params = count_params(cfg, tiny_config(preset))
    assert params.trainable_linears == set(FAMILIES[preset.removeprefix("tiny-")].attention)
    assert params.embed_trainable and params.norm_trainable
    assert plan_memory(cfg, 1).total > 0


def test_published_shapes_build():
    for name in PUBLISHED:
        config = published_config(name)
        assert config.model_type in FAMILIES and rope_of(config)["rope_theta"] > 0


# ------------------------------------------------------------------------------ training (slow: real processes)

_RELOAD = """
import json, sys, torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
ids = load_file(sys.argv[1])["ids"]
for folder in sys.argv[2:]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        save_file({"logits": model(ids).logits.contiguous()}, folder + "/plain.safetensors")
assert not any(m.split('.')[0] in ('ropescale', 'models', 'training', 'configs') for m in sys.modules)
"""


def finetuned(run, preset):
    """The fine-tuned model, unmerged: the RoPE-scaled base, the LoRA adapter and the trainable extras."""
    from peft import PeftModel
    from transformers import AutoConfig

    model = load_model(preset, config=AutoConfig.from_pretrained(run / "adapter" / "base_config"), seed=0)
    model = PeftModel.from_pretrained(model, run / "adapter").eval()
    with torch.no_grad():
        for k, v in load_file(run / "adapter" / "trainable_extra.safetensors").items():
            model.get_parameter(k).copy_(v)
    return model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Every tiny preset trained 2 steps by train.py (one process, DeepSpeed) with an in-run perplexity eval, then
    every merged/ reloaded in one plain subprocess (it cannot import this project)."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("families")
    runs = {}
    for preset in TINY_PRESETS:
        run = root / preset
        method = "linear" if preset == "tiny-phi3" else "yarn"  # phi3: written as LongRoPE factors
        r = subprocess.run([PY, "train.py", "--config", "configs/cpu_tiny.yaml", "--set", f"output.dir={run}",
                            "--set", f"model.name={preset}", "--set", f"rope.method={method}",
                            "--set", "train.max_steps=2", "--set", "train.save_every=0",
                            "--set", "wandb.mode=disabled", "--set", "eval.perplexity.lengths=[512]",
                            "--set", "eval.perplexity.max_docs=1", "--set", "eval.perplexity.mode=truncate"],
                           cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=600)
        runs[preset] = (run, r)
    ids = torch.randint(0, 256, (1, 2 * L), generator=torch.Generator().manual_seed(3))
    save_file({"ids": ids}, str(root / "ids.safetensors"))
    done = [str(run / "merged") for run, r in runs.values() if r.returncode == 0]
    reload = subprocess.run([PY, "-I", "-c", _RELOAD, str(root / "ids.safetensors"), *done], cwd=root,
                            env=train_env(), capture_output=True, text=True, timeout=600)
    assert reload.returncode == 0, reload.stderr[-3000:]
    return ids, runs


@pytest.mark.slow
@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_each_family_trains_reloads_with_the_finetuned_logits_and_evaluates(trained, preset):
    ids, runs = trained
    run, r = runs[preset]
    assert r.returncode == 0, f"{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(x == x for x in losses)
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert summary["eval/ppl@512"] < 1000, summary  # a finite perplexity over 512-token windows (vocab 260)
    with torch.no_grad():
        ours = finetuned(run, preset)(ids).logits
    plain = load_file(run / "merged" / "plain.safetensors")["logits"]
    torch.testing.assert_close(plain, ours, atol=1e-4, rtol=0)
    saved = json.loads((run / "merged" / "config.json").read_text())
    assert saved["ropescale"]["method"] == ("linear" if preset == "tiny-phi3" else "yarn")
