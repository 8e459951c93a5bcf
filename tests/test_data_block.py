"""Document isolation on a real (tiny) model: what ``forward_kwargs`` makes transformers do with packed rows.

Rows are built by the packer's own functions from real text with the tiny byte tokenizer, and run through the
tiny-llama preset (sdpa). With the boundary block on, a document's logits and its loss gradient do not move when
another document of the row changes, and equal those of the document run alone (the exact equivalent of
flash-attention varlen). With it off they do move, so these tests can fail.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data.loader import forward_kwargs
from data.pack import IGNORE_INDEX, lay_stream, pose_positions, row_labels_positions
from models.load import load_model, load_tokenizer

TEXTS = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune.",
    "Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who, for his own amusement, never took up any",
    "No one who had ever seen Catherine Morland in her infancy would have supposed her born to be an heroine.",
]


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-llama")


def packed_row(texts: list[str], mode: str = "reset"):
    """One row holding ``texts`` exactly ([1, L] tensors) and each document's (start, end) columns."""
    tok = load_tokenizer("tiny-llama")
    docs = [np.asarray(tok(t, add_special_tokens=False)["input_ids"], np.int32) for t in texts]
    tokens, starts = lay_stream(docs, np.arange(len(docs)), None, tok.eos_token_id)
    is_start = np.zeros(len(tokens), bool)
    is_start[starts] = True
    labels, positions = row_labels_positions(tokens[None], is_start[None], mode)
    batch = {k: torch.from_numpy(np.asarray(v, np.int64)) for k, v in
             (("input_ids", tokens[None]), ("labels", labels), ("position_ids", positions))}
    bounds = list(zip(starts, list(starts[1:]) + [len(tokens)]))
    return batch, bounds


def altered(texts, i):
    """``texts`` with document i replaced by other text of the same byte length."""
    out = list(texts)
    out[i] = "".join("xyz"[j % 3] for j in range(len(texts[i].encode())))
    return out


def run(model, batch, kwargs, target):
    """Logits [L, V] and the gradient of document ``target``'s loss w.r.t. the weights and the input embeddings."""
    model.zero_grad(set_to_none=True)
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    kwargs = {k: v for k, v in kwargs.items() if k != "input_ids"}
    logits = model(inputs_embeds=embeds, **kwargs).logits[0]
    start, end = target
    labels = torch.full_like(batch["labels"][0], IGNORE_INDEX)
    labels[start + 1 : end] = batch["labels"][0, start + 1 : end]  # only the target document's own predictions
    F.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX).backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return logits.detach(), grads, embeds.grad[0]


def test_blocked_documents_do_not_see_each_other(model):
    batch, bounds = packed_row(TEXTS)
    other, _ = packed_row(altered(TEXTS, 0))
    target = bounds[2]
    logits, grads, d_embeds = run(model, batch, forward_kwargs(batch, True), target)
    logits2, grads2, _ = run(model, other, forward_kwargs(other, True), target)
    s, e = bounds[1][0], target[1]
    assert torch.allclose(logits[s:e], logits2[s:e], atol=1e-6, rtol=0)  # documents 1 and 2 unchanged
    assert not torch.allclose(logits[: bounds[0][1]], logits2[: bounds[0][1]])  # document 0 itself did change
    assert torch.allclose(grads, grads2, atol=1e-7, rtol=1e-5)
    assert d_embeds[: target[0]].abs().max() == 0  # no gradient reaches the other documents at all


def test_without_block_documents_leak(model):
    batch, bounds = packed_row(TEXTS)
    other, _ = packed_row(altered(TEXTS, 0))
    target = bounds[2]
    logits, grads, d_embeds = run(model, batch, forward_kwargs(batch, False), target)
    logits2, grads2, _ = run(model, other, forward_kwargs(other, False), target)
    s, e = target
    assert (logits[s:e] - logits2[s:e]).abs().max() > 1e-4
    assert (grads - grads2).abs().max() > 1e-6
    assert d_embeds[: s].abs().max() > 0


def test_blocked_row_equals_documents_run_alone(model):
    """The packed, blocked row gives each document exactly the logits it gets as its own sequence (varlen)."""
    batch, bounds = packed_row(TEXTS)
    with torch.no_grad():
        packed = model(**forward_kwargs(batch, True)).logits[0]
        for (s, e), text in zip(bounds, TEXTS):
            alone, _ = packed_row([text])
            single = model(**forward_kwargs(alone, True)).logits[0]
            assert torch.allclose(packed[s:e], single, atol=1e-5, rtol=0)


def test_use_cache_default_silently_unblocks(model):
    """Why forward_kwargs sets use_cache=False: with the model's default (True) the block is not built."""
    batch, bounds = packed_row(TEXTS)
    other, _ = packed_row(altered(TEXTS, 0))
    s, e = bounds[2]
    with torch.no_grad():
        kw, kw2 = forward_kwargs(batch, True), forward_kwargs(other, True)
        kw.pop("use_cache"), kw2.pop("use_cache")
        assert model.config.use_cache
        leak = (model(**kw).logits[0, s:e] - model(**kw2).logits[0, s:e]).abs().max()
    assert leak > 1e-4


def test_pose_chunks_attend_across_the_skip(model):
    """PoSE rows skip positions; the all-ones mask keeps transformers from reading the skip as a new document."""
    batch, _ = packed_row([" ".join(TEXTS)], mode="concat")
    length = batch["input_ids"].shape[1]
    batch["position_ids"] = torch.from_numpy(pose_positions(length, 4 * length, 2, np.random.default_rng(3)))[None]
    cut = int(torch.nonzero(batch["position_ids"][0].diff() > 1)[0]) + 1
    other = {k: v.clone() for k, v in batch.items()}
    other["input_ids"][0, :cut] = (other["input_ids"][0, :cut] + 1) % 256
    with torch.no_grad():
        out = model(**forward_kwargs(batch, False)).logits[0, cut:]
        out2 = model(**forward_kwargs(other, False)).logits[0, cut:]
        assert (out - out2).abs().max() > 1e-4  # the second chunk sees the first
        naive = {**forward_kwargs(batch, False), "attention_mask": None}
        naive2 = {**forward_kwargs(other, False), "attention_mask": None}
        cut_off = (model(**naive).logits[0, cut:] - model(**naive2).logits[0, cut:]).abs().max()
    assert cut_off < 1e-6  # without the mask the chunks would be isolated from each other
