"""Tokenizing documents with the model's tokenizer: batched, optionally in parallel processes, specials added here.

Documents are encoded without the tokenizer's own special tokens (``add_special_tokens=False``) and the packer adds
them itself, the same way for every tokenizer:

- EOS after every document (the separator the model learned to predict at a document's end); a tokenizer without an
  EOS token is refused;
- BOS before every document only where the tokenizer adds one by itself (Llama-2's does; SmolLM2's and the tiny byte
  tokenizer's do not), unless ``DataConfig.add_bos`` says otherwise.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
from transformers import PreTrainedTokenizerBase

from data.config import DataError


def special_ids(tokenizer: PreTrainedTokenizerBase, add_bos: bool | None = None) -> tuple[int | None, int]:
    """(BOS id or None, EOS id) to put around each document; ``add_bos=None`` follows the tokenizer's own habit."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(f"tokenizer {tokenizer.name_or_path or type(tokenizer).__name__} has no EOS token, so "
                        "documents cannot be separated; use a tokenizer with an eos_token")
    bos = tokenizer.bos_token_id
    if add_bos is None:
        add_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
    if add_bos and bos is None:
        raise DataError("add_bos is true but the tokenizer has no BOS token; set add_bos: false")
    return (bos if add_bos else None), eos


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> dict:
    """Name, vocabulary size and a sha256 of the full tokenizer definition (vocab, merges, normalizer, specials)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    h = hashlib.sha256(definition.encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return {"name": tokenizer.name_or_path, "vocab_size": len(tokenizer), "sha256": h.hexdigest()}


def _encode(batch: dict, tokenizer: PreTrainedTokenizerBase) -> dict:
    ids = tokenizer(batch["text"], add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return {"ids": ids}


def tokenize_texts(texts: list[str], tokenizer: PreTrainedTokenizerBase, num_proc: int = 1,
                   batch_size: int = 64) -> list[np.ndarray]:
    """Token ids of each text (no specials), as int32 arrays, in input order.

    ``num_proc > 1`` splits the documents into contiguous shards tokenized by that many processes (datasets'
    ``map``); one document is never split, so a few huge documents cannot use more processes than there are
    documents. Same result for any ``num_proc``.
    """
    if not texts:
        return []
    if len(tokenizer) > np.iinfo(np.int32).max:
        raise DataError(f"vocabulary of {len(tokenizer)} tokens does not fit int32 rows")
    import datasets

    ds = datasets.Dataset.from_dict({"text": texts})
    out = ds.map(_encode, batched=True, batch_size=batch_size, num_proc=num_proc if num_proc > 1 else None,
                 remove_columns=["text"], fn_kwargs={"tokenizer": tokenizer}, desc="tokenize")
    column = out.with_format("numpy")["ids"]
    return [np.asarray(ids, dtype=np.int32) for ids in column]
