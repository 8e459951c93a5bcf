"""Write a Hugging Face Llama-architecture model folder as a GGUF file that llama.cpp runs with our RoPE scaling.

Written with the ``gguf`` package's writer (the one llama.cpp's own converter uses), float32 tensors:

- the architecture ``llama`` (model types llama and mistral without a sliding window; biases refused);
- the RoPE metadata of ``ropescale.serving.llama_cpp_rope``: a native scaling type where llama.cpp's math is ours,
  else a ``rope_freqs`` tensor of per-pair divisors; methods llama.cpp cannot run are refused with the reason;
- the query and key projections reordered for llama.cpp's rotation, which turns adjacent channel pairs
  (2i, 2i+1) where transformers turns the halves (i, i + d/2) of each head;
- a byte-level BPE tokenizer (tokenizer.json: vocab, merges, special tokens) as GGUF's ``gpt2`` tokenizer with the
  default pre-tokenizer. Token ids are the model's; llama.cpp's split of raw text may differ from transformers'
  where the tokenizer pre-splits differently (digits, say): score token ids, or convert a hub tokenizer with
  llama.cpp's own converter.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from models.load import ModelLoadError, load_config, load_model, resolve
from models.families import FAMILIES
from ropescale.apply import head_dim_of, partial_rotary_factor_of
from ropescale.serving import llama_cpp_rope
from utils.files import atomic_file

LLAMA_TYPES = ("llama", "mistral")


def _check_architecture(config, folder: Path) -> None:
    if config.model_type not in LLAMA_TYPES:
        raise ModelLoadError(f"GGUF export covers the Llama architecture ({', '.join(LLAMA_TYPES)}); {folder} is "
                             f"'{config.model_type}': use llama.cpp's convert_hf_to_gguf.py (docs/serving.md says "
                             "which RoPE keys it keeps)")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ModelLoadError(f"GGUF export: {folder} has attention or MLP biases, which this writer does not map; use "
                             "llama.cpp's convert_hf_to_gguf.py")
    if partial_rotary_factor_of(config) != 1.0:
        raise ModelLoadError(f"GGUF export: {folder} rotates part of each head (partial_rotary_factor "
                             f"{partial_rotary_factor_of(config)}), which the llama architecture does not; use "
                             "llama.cpp's convert_hf_to_gguf.py")
    window = getattr(config, "sliding_window", None)
    if window is not None and window < config.max_position_embeddings:
        raise ModelLoadError(f"GGUF export: {folder} uses a sliding window of {window} tokens, which llama.cpp's "
                             "llama architecture does not apply; the GGUF would attend further than the model")


def _tokenizer(folder: Path, vocab_size: int) -> dict:
    """tokens (by id, padded to the embedding rows), token types, merges and special ids from tokenizer.json."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ModelLoadError(f"GGUF export: {folder} has no tokenizer.json (a fast tokenizer is needed)")
    tok = json.loads(path.read_text())
    model, decoder = tok.get("model") or {}, tok.get("decoder") or {}
    if model.get("type") != "BPE" or decoder.get("type") != "ByteLevel":
        raise ModelLoadError(f"GGUF export handles byte-level BPE tokenizers; {path} is {model.get('type')} with a "
                             f"{decoder.get('type')} decoder: use llama.cpp's convert_hf_to_gguf.py")
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    by_id.update({i: a["content"] for i, a in added.items()})
    if max(by_id) >= vocab_size:
        raise ModelLoadError(f"GGUF export: the tokenizer has id {max(by_id)} but the model only {vocab_size} rows")
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            # llama.cpp's token types: 1 normal, 3 control (special), 4 user-defined (added, not special), 5 unused
            types.append(3 if i in added and added[i].get("special") else 4 if i in added else 1)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(5)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:  # llama.cpp refuses a gpt2 tokenizer without merges ("cannot find tokenizer merges")
        raise ModelLoadError(f"GGUF export: {path} has no BPE merges (a byte-level vocabulary only), which llama.cpp's "
                             "BPE tokenizer needs; use a tokenizer with merges")
    return {"tokens": tokens, "types": types, "merges": merges}


def _reorder_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection ``[n_heads * head_dim, hidden]`` from transformers' half-split layout to llama.cpp's
    adjacent pairs: within each head, row i of the first half and row i of the second half become rows 2i, 2i+1."""
    out, hidden = w.shape
    return w.reshape(n_heads, 2, out // n_heads // 2, hidden).transpose(1, 2).reshape(out, hidden)


def write_gguf(folder: str | Path, out: str | Path) -> dict:
    """Write ``folder`` (a merged model: config.json, safetensors, tokenizer.json) to the GGUF file ``out``,
    atomically. Returns ``{"path", "tensors", "rope": {kv...}, "rope_freqs": bool, "how"}``.

    Raises ``ModelLoadError`` / ``RopeConfigError`` (one line, with what to do) before writing anything.
    """
    import gguf

    folder, out = Path(resolve(str(folder))), Path(out)
    if not folder.is_dir():
        raise ModelLoadError(f"GGUF export needs a local model folder (a run's merged/, a saved model); {folder} is "
                             "a hub id or preset: save it with save_pretrained first")
    config = load_config(str(folder))
    _check_architecture(config, folder)
    rope = llama_cpp_rope(config)
    tok = _tokenizer(folder, config.vocab_size)
    model = load_model(str(folder), config=config, dtype=torch.float32)
    head_dim = head_dim_of(config)
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    query, key = FAMILIES[config.model_type].attention[:2]  # llama.cpp permutes their rotary halves
    tensors = {}
    for name, value in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd when there is no output tensor
        w = value.detach().float()
        if name.endswith(f"{query}.weight"):
            w = _reorder_rotary(w, n_heads)
        elif name.endswith(f"{key}.weight"):
            w = _reorder_rotary(w, n_kv)
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ModelLoadError(f"GGUF export: no llama.cpp tensor for '{name}'")
        tensors[target] = w.numpy()
    if rope.freq_factors is not None:
        tensors[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"] = np.asarray(rope.freq_factors,
                                                                                         dtype=np.float32)
    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        writer.add_name(folder.name)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(n_heads)
        writer.add_head_count_kv(n_kv)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(config.vocab_size)
        for key, value in rope.kv.items():
            full = f"llama.{key}"
            if isinstance(value, str):
                writer.add_string(full, value)
            elif isinstance(value, int):
                writer.add_uint32(full, value)
            else:
                writer.add_float32(full, float(value))
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tok["tokens"])
        writer.add_token_types(tok["types"])
        writer.add_token_merges(tok["merges"])
        for key, setter in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                            ("pad_token_id", writer.add_pad_token_id)):
            value = getattr(config, key, None)
            if isinstance(value, int):
                setter(value)
        for name, array in tensors.items():
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return {"path": str(out), "tensors": len(tensors), "rope": dict(rope.kv),
            "rope_freqs": rope.freq_factors is not None, "how": rope.how}
