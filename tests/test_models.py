"""Model loading: tiny presets, refusal of non-RoPE models, clear errors for missing sources, real SmolLM2."""

import json
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, GPT2Config, LlamaConfig

from data.corpus import load_corpus
from models.load import (
    SMOLLM2,
    TINY_PRESETS,
    ModelLoadError,
    load_config,
    load_model,
    load_tokenizer,
    resolve,
)


@pytest.mark.parametrize("name", sorted(TINY_PRESETS))
def test_tiny_preset_forward(name):
    model = load_model(name)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size) == (2, 64)
    assert cfg.model_type == name.removeprefix("tiny-")
    ids = load_tokenizer(name)("Emma Woodhouse, handsome, clever, and rich", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], cfg.vocab_size)
    assert torch.isfinite(logits).all()


def test_tiny_preset_is_seeded():
    a, b, c = load_model("tiny-llama", seed=1), load_model("tiny-llama", seed=1), load_model("tiny-llama", seed=2)
    wa, wb, wc = (m.model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_tiny_tokenizer_round_trips_bytes():
    tok = load_tokenizer("tiny-llama")
    text = "Persuasion — “Anne Elliot”, 1817.\n\tTabs & ünïcödé"
    ids = tok(text).input_ids
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (256, 257, 258)


@pytest.mark.parametrize("config_cls,model_type", [(GPT2Config, "gpt2"), (BertConfig, "bert")])
def test_model_without_rope_is_refused(tmp_path, config_cls, model_type):
    config_cls().save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=f"'{model_type}' does not use rotary position embeddings"):
        load_config(str(tmp_path))
    with pytest.raises(ModelLoadError, match="does not use rotary"):
        load_model("tiny-llama", config=config_cls())


def test_missing_sources_name_what_was_looked_for(tmp_path):
    with pytest.raises(ModelLoadError, match=f"model folder not found: {tmp_path / 'nope'}"):
        load_config(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match=r"GGUF file not found: .*missing\.gguf"):
        load_config(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_config(str(tmp_path / "empty"))


class _RunsCode:
    """Unpickling this calls ``Path.touch`` on ``path``: what a malicious ``pytorch_model.bin`` would do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_pickle_weights_are_refused_unless_allowed_and_then_read_as_data_only(tmp_path):
    model = load_model("tiny-llama", seed=3)
    model.config.save_pretrained(tmp_path / "bin")  # transformers 5 saves safetensors only: the .bin by hand
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="only safetensors are loaded.*model.allow_pickle: true"):
        load_model(str(tmp_path / "bin"))
    loaded = load_model(str(tmp_path / "bin"), allow_pickle=True)
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    # a pickle that would run code is refused even when pickles are allowed: torch.load(weights_only=True)
    evil = tmp_path / "evil"
    LlamaConfig(num_hidden_layers=1).save_pretrained(evil)
    torch.save({"model.embed_tokens.weight": _RunsCode(tmp_path / "pwned")}, evil / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="could not load the weights"):
        load_model(str(evil), allow_pickle=True)
    assert not (tmp_path / "pwned").exists()


def test_unknown_hub_id_fails_with_its_name():
    with pytest.raises(ModelLoadError, match="no-such-org/no-such-model"):
        load_config("no-such-org/no-such-model")


def test_local_safetensors_folder_round_trip(tmp_path):
    model = load_model("tiny-qwen2", seed=3)
    model.save_pretrained(tmp_path)
    assert any(tmp_path.glob("*.safetensors"))
    again = load_model(str(tmp_path))
    ids = torch.arange(40).unsqueeze(0)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, again(ids).logits, atol=1e-6)


@pytest.mark.slow
def test_smollm2_is_a_real_pretrained_model():
    """Mean loss on 1,024 held-out tokens: random weights give ~ln(49152) = 10.8 nats; the real model is far below 4."""
    cfg = load_config(SMOLLM2)
    assert (cfg.model_type, cfg.head_dim, cfg.max_position_embeddings) == ("llama", 64, 8192)
    assert cfg.rope_parameters["rope_theta"] == 1e5
    assert not hasattr(cfg, "quantization_config")  # GGUF's quantization marker is dropped (docs/notes.md)
    tok = load_tokenizer(SMOLLM2)
    text = load_corpus("heldout")[0].text
    ids = tok(text[20_000:60_000], return_tensors="pt").input_ids[:, :1024]
    assert ids.shape[1] == 1024
    model = load_model(SMOLLM2)
    with torch.no_grad():
        loss = model(ids, labels=ids, use_cache=False).loss.item()
    print(f"smollm2-135m mean loss on 1,024 held-out tokens: {loss:.3f} nats/token")
    assert loss < 4.0


def test_smollm2_cache_folder_is_plain_safetensors():
    folder = resolve(SMOLLM2)
    config = json.loads(open(f"{folder}/config.json").read())
    assert "quantization_config" not in config
    assert not list(__import__("pathlib").Path(folder).glob("*.bin"))
