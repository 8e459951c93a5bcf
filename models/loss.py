"""The causal-LM loss over long sequences, computed in chunks of positions: the one loss used by train and eval.

A plain ``model(input_ids, labels=...)`` builds the whole ``[B, T, V]`` logits tensor (and, for the backward, keeps
it): at T = 16k and SmolLM2's V = 49,152 that is 3.2 GB in fp32 for one row, more than the model and its activations.
Here the LM head runs on ``chunk_size`` positions at a time and each chunk's logits are dropped as soon as its
cross-entropy is known; under autograd each chunk is recomputed in the backward (``torch.utils.checkpoint``), so the
backward never holds more than one chunk's logits either. Positions whose label is ignored (-100) are skipped before
the LM head, so sliding-window evaluation pays the head only for the tokens it scores.

Convention (same as transformers' ``ForCausalLMLoss``): ``labels`` are aligned with the inputs and the function
shifts them, so the hidden state at position t is scored against ``labels[:, t + 1]``; logits are upcast to fp32
before the softmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from data.pack import IGNORE_INDEX  # the one definition: packing writes it, the loss skips it
from models.families import output_head



def _head_nll(head: nn.Module | torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """NLL of ``targets`` [n] under the LM head applied to ``hidden`` [n, H] -> [n] (fp32, or fp64 for fp64 input)."""
    logits = head(hidden) if isinstance(head, nn.Module) else F.linear(hidden, head)
    # Softmax in at least fp32: bf16 logits lose the small differences that perplexity is made of.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, targets, reduction="none")


def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    lm_head: nn.Module | torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 1024,
    reduction: str = "sum",
    shifted: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
    """Causal-LM cross-entropy without materializing ``[T, V]`` logits.

    Args:
        hidden: final hidden states ``[B, T, H]`` (after the final norm; see ``final_hidden_states``).
        lm_head: the output projection, a module mapping ``[n, H] -> [n, V]`` (pass the module, not its weight, when
            its parameters are sharded or adapted, e.g. ZeRO-3 or LoRA on the head), or its weight ``[V, H]``.
        labels: ``[B, T]`` token ids aligned with the inputs; ``-100`` marks positions not to score. Shifted here:
            ``labels[:, t + 1]`` is predicted from ``hidden[:, t]``.
        chunk_size: positions per LM-head call; peak extra memory is about ``chunk_size * V`` floats (x3 in training).
        reduction: ``"sum"`` or ``"none"``.
        shifted: ``labels`` are already the targets (``labels[:, t]`` is predicted from ``hidden[:, t]``), as for a
            shard of a row under sequence parallelism, whose last target is the next shard's first token.

    Returns:
        ``"sum"``: ``(loss_sum, n_tokens)``, a scalar fp32 loss (sum of token NLLs, differentiable) and a 0-dim int64
        tensor counting the scored tokens (a tensor so that a trainer can all-reduce it without a host sync);
        ``"none"``: per-token NLL ``[B, T - 1]`` (``[B, T]`` when ``shifted``; fp32), 0 where the label is ignored.

    Equal to ``F.cross_entropy(full_logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), reduction=...)``
    up to floating-point summation order, for the loss and its gradients (tests/test_loss.py).
    """
    if reduction not in ("sum", "none"):
        raise ValueError(f"reduction must be 'sum' or 'none', got {reduction!r}")
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(
            f"expected hidden [B, T, H] and labels [B, T], got {tuple(hidden.shape)} and {tuple(labels.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    targets, inputs = (labels, hidden) if shifted else (labels[:, 1:], hidden[:, :-1])
    scored = targets != IGNORE_INDEX  # [B, T-1] ([B, T] when shifted)
    h = inputs[scored]  # [N, H]: one copy of the scored rows, small next to [N, V] logits
    y = targets[scored]  # [N]
    # Recompute each chunk's logits in the backward instead of keeping them; no RNG to preserve in a linear head.
    recompute = torch.is_grad_enabled()
    pieces = []
    for start in range(0, y.numel(), chunk_size):
        hc, yc = h[start : start + chunk_size], y[start : start + chunk_size]
        if recompute:
            pieces.append(checkpoint(_head_nll, lm_head, hc, yc, use_reentrant=False, preserve_rng_state=False))
        else:
            pieces.append(_head_nll(lm_head, hc, yc))
    # Nothing scored: an empty NLL that is still part of the graph, so backward() works on an all-masked batch.
    nll = torch.cat(pieces) if pieces else h.sum(-1).to(torch.promote_types(hidden.dtype, torch.float32))
    if reduction == "none":
        return torch.zeros(scored.shape, dtype=nll.dtype, device=nll.device).masked_scatter(scored, nll)
    return nll.sum(), scored.sum()


def causal_lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(decoder, head)`` of a Hugging Face causal LM (any family of models/families.py) or a PEFT model wrapping one.

    The decoder is the base model (``get_decoder()``: ``model.model``, GPT-NeoX's ``gpt_neox``) returning final,
    normed hidden states; with PEFT its layers carry
    the adapters. ``head`` maps ``[n, H] -> [n, V]`` logits exactly as the model's own forward does: the LM head,
    followed by the family's logit transform where it has one (Gemma 2's soft-capping, Cohere's ``logit_scale``;
    ``models.families.output_head``), so the chunked loss equals ``model(..., labels=...)``'s. A DeepSpeed engine is
    not unwrapped here: pass ``engine.module``.
    """
    if hasattr(model, "get_base_model"):  # peft.PeftModel: the wrapped *ForCausalLM, adapters injected in place
        model = model.get_base_model()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if head is None or decoder is None or decoder is model:
        raise ValueError(
            f"{type(model).__name__} is not a causal LM with a separate decoder and LM head; pass the "
            "*ForCausalLM model (or a PEFT model wrapping one)"
        )
    return decoder, output_head(model.config, head)


def final_hidden_states(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Final hidden states ``[B, T, H]`` of a causal LM for ``input_ids`` ``[B, T]``, without computing logits.

    ``use_cache=False`` always: scoring needs no KV cache, and transformers only isolates packed documents (position
    ids restarting at 0, ``attention_mask=None``) when the cache is off.
    """
    decoder, _ = causal_lm_parts(model)
    out = decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


def causal_lm_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    chunk_size: int = 1024,
    reduction: str = "sum",
    shifted: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
    """``chunked_causal_lm_loss`` of ``model`` on ``input_ids`` [B, T] / ``labels`` [B, T]: the decoder, then the
    LM head in chunks. Same returns as ``chunked_causal_lm_loss``."""
    decoder, head = causal_lm_parts(model)
    hidden = decoder(
        input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False
    ).last_hidden_state
    return chunked_causal_lm_loss(hidden, head, labels, chunk_size=chunk_size, reduction=reduction, shifted=shifted)
