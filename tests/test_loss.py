"""models.loss: the chunked causal-LM loss equals plain full-logits cross-entropy, in value and gradients."""

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from models.loss import (
    IGNORE_INDEX,
    causal_lm_loss,
    causal_lm_parts,
    chunked_causal_lm_loss,
    final_hidden_states,
)
from models.load import TINY_PRESETS, load_model


def _plain_loss(hidden, weight, labels):
    """Reference: full [B, T, V] logits, shift, fp32 cross-entropy, sum over scored tokens."""
    logits = hidden @ weight.T
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def _labels(ids, gen, drop=0.3):
    labels = ids.clone()
    labels[torch.rand(ids.shape, generator=gen) < drop] = IGNORE_INDEX
    return labels


@pytest.mark.parametrize("head_kind", ["weight", "module"])
@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_loss_and_grads_match_full_logits(head_kind, chunk_size):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 41, 16, generator=gen, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(50, 16, generator=gen))
    labels = _labels(torch.randint(0, 50, (3, 41), generator=gen), gen)

    ref = _plain_loss(hidden, head.weight, labels)
    ref_gh, ref_gw = torch.autograd.grad(ref, [hidden, head.weight])

    loss, n = chunked_causal_lm_loss(
        hidden, head if head_kind == "module" else head.weight, labels, chunk_size=chunk_size
    )
    gh, gw = torch.autograd.grad(loss, [hidden, head.weight])
    assert int(n) == int((labels[:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-5, atol=1e-6)


def test_reduction_none_gives_per_token_nll_with_zeros_at_ignored():
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 30, 8, generator=gen)
    weight = torch.randn(20, 8, generator=gen)
    labels = _labels(torch.randint(0, 20, (2, 30), generator=gen), gen)
    nll = chunked_causal_lm_loss(hidden, weight, labels, chunk_size=4, reduction="none")
    assert nll.shape == (2, 29) and nll.dtype == torch.float32
    ref = F.cross_entropy(
        (hidden[:, :-1] @ weight.T).transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="none"
    )
    torch.testing.assert_close(nll, ref)
    assert (nll[labels[:, 1:] == IGNORE_INDEX] == 0).all()


def test_head_never_sees_more_than_chunk_rows_forward_or_backward():
    """The [T, V] logits are never built: every LM-head call, including the backward's recompute, gets <= chunk rows."""
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 100, 8, generator=gen, requires_grad=True)
    head = torch.nn.Linear(8, 30, bias=False)
    rows = []
    head.register_forward_hook(lambda mod, inp, out: rows.append(inp[0].shape[0]))
    labels = torch.randint(0, 30, (2, 100), generator=gen)
    loss, _ = chunked_causal_lm_loss(hidden, head, labels, chunk_size=16)
    n_forward = len(rows)
    loss.backward()
    assert max(rows) <= 16
    assert n_forward == -(-2 * 99 // 16) and len(rows) == 2 * n_forward  # recomputed once per chunk in backward


def test_ignored_positions_skip_the_head():
    hidden = torch.randn(1, 50, 8)
    head = torch.nn.Linear(8, 30, bias=False)
    rows = []
    head.register_forward_hook(lambda mod, inp, out: rows.append(inp[0].shape[0]))
    labels = torch.full((1, 50), IGNORE_INDEX)
    labels[0, -5:] = 3
    with torch.no_grad():
        _, n = chunked_causal_lm_loss(hidden, head, labels, chunk_size=1024)
    assert int(n) == 5 and rows == [5]


def test_all_ignored_gives_zero_and_backward_works():
    hidden = torch.randn(1, 10, 8, requires_grad=True)
    loss, n = chunked_causal_lm_loss(hidden, torch.randn(30, 8), torch.full((1, 10), IGNORE_INDEX))
    loss.backward()
    assert float(loss.detach()) == 0.0 and int(n) == 0 and (hidden.grad == 0).all()


def test_bf16_hidden_gives_fp32_loss():
    hidden = torch.randn(1, 20, 8).bfloat16()
    loss, _ = chunked_causal_lm_loss(hidden, torch.randn(30, 8).bfloat16(), torch.randint(0, 30, (1, 20)))
    assert loss.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(reduction="mean"), "reduction"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(labels=torch.zeros(1, 5, dtype=torch.long)), "labels"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    args = dict(hidden=torch.randn(1, 6, 4), lm_head=torch.randn(9, 4), labels=torch.zeros(1, 6, dtype=torch.long))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        chunked_causal_lm_loss(**args)


@pytest.mark.parametrize("name", sorted(TINY_PRESETS))
def test_tiny_model_loss_and_all_gradients_match_hf_loss(name):
    """On a real (tiny) model: same loss and same gradient for every parameter as transformers' own loss."""
    model = load_model(name).train()
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (2, 300), generator=gen)
    labels = _labels(ids, gen, drop=0.2)
    n = int((labels[:, 1:] != IGNORE_INDEX).sum())

    ref = model(input_ids=ids, labels=labels, use_cache=False).loss * n  # HF: mean over scored tokens
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    loss, count = causal_lm_loss(model, ids, labels, chunk_size=64)
    grads = torch.autograd.grad(loss, list(model.parameters()))

    assert int(count) == n
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-4)
    for (pname, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        # fp32 sums in another order (chunks, other CPU kernels): an element that is a sum of cancelling terms is
        # off by a few ulps of the terms, not of itself, so the absolute tolerance follows the tensor's scale
        atol = max(1e-6, 1e-5 * float(r.abs().max()))
        torch.testing.assert_close(g, r, rtol=1e-5, atol=atol, msg=lambda m: f"{pname}: {m}")


def test_peft_lora_model_is_unwrapped_and_adapter_grads_match():
    model = load_model("tiny-llama")
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    decoder, head = causal_lm_parts(lora)
    assert decoder is model.model and head is model.lm_head
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 256, (1, 200), generator=gen)
    trainable = [p for p in lora.parameters() if p.requires_grad]
    assert trainable

    ref = lora(input_ids=ids, labels=ids, use_cache=False).loss * 199
    ref_grads = torch.autograd.grad(ref, trainable)
    loss, _ = causal_lm_loss(lora, ids, ids, chunk_size=32)
    grads = torch.autograd.grad(loss, trainable)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-4)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_final_hidden_states_feed_the_head_like_the_model():
    model = load_model("tiny-qwen2")
    ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        hidden = final_hidden_states(model, ids)
        torch.testing.assert_close(model.lm_head(hidden), model(input_ids=ids, use_cache=False).logits)


def test_non_causal_lm_is_refused():
    model = load_model("tiny-llama")
    with pytest.raises(ValueError, match="causal LM"):
        causal_lm_parts(model.model)
