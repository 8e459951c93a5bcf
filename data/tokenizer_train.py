"""A small byte-level BPE tokenizer trained on the bundled corpus's training split: the testbed's tokenizer.

Byte-level (GPT-2's byte alphabet, so any text encodes, nothing is ever unknown) with every digit its own token:
digits are split off before BPE runs, so no merge can hold a digit. A 5-digit pass key is then always the same five
single-digit tokens wherever it appears, and copying it is a token-by-token copy the model can learn; with merged
digit groups the key line and the answer could tokenize differently. Specials: ``<s>`` (0), ``</s>`` (1),
``<pad>`` (2); the tokenizer adds none of them by itself (the packer puts ``</s>`` after each document).

Training reads only the ``train`` split (the held-out book never shapes the vocabulary) and is deterministic: the
same corpus and settings give a byte-identical ``tokenizer.json``.

    python -m data.tokenizer_train --out runs/testbed/tokenizer --vocab-size 4096
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

from data.config import DataError
from utils.cli import exit_process, run_cli
from utils.files import atomic_dir

SPECIALS = ("<s>", "</s>", "<pad>")
DIGITS = "0123456789"


def train_bpe(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2):
    """A byte-level BPE with single-digit tokens trained on ``texts`` -> ``PreTrainedTokenizerFast``.

    ``vocab_size`` counts everything: 3 specials, the 256 byte symbols and the merges.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    floor = len(SPECIALS) + 256
    if vocab_size <= floor:
        raise DataError(f"vocab_size must exceed {floor} (3 specials + 256 bytes), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    # Digits first: they become pieces of their own, so no merge ever contains a digit.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def build_tokenizer(out: str | Path, vocab_size: int = 4096) -> Path:
    """Train on the bundled ``train`` split and save a Hugging Face tokenizer folder at ``out`` (written to a
    temporary folder next to it, then renamed; an existing ``out`` is replaced)."""
    from data.corpus import load_corpus

    out = Path(out)
    tokenizer = train_bpe((d.text for d in load_corpus("train")), vocab_size)
    with atomic_dir(out) as tmp:
        tokenizer.save_pretrained(tmp)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data.tokenizer_train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="tokenizer folder to write")
    ap.add_argument("--vocab-size", type=int, default=4096, help="total vocabulary (specials + bytes + merges)")
    args = ap.parse_args(argv)
    path = build_tokenizer(args.out, args.vocab_size)
    print(f"tokenizer: {path} ({args.vocab_size} tokens)")
    return 0


if __name__ == "__main__":
    exit_process(run_cli(main))
