"""Dynamic YaRN at inference: a rotary module that recomputes YaRN from the current length (YaRN paper, section 3.3).

transformers has no dynamic YaRN type. ``apply_rope(config, "dynamic_yarn", s)`` therefore writes static YaRN at
the target factor s (so a plain reload, without this project, runs static YaRN: identical to dynamic YaRN at the
target length L*s, and a little different below it), plus the provenance record that says "dynamic_yarn".
``enable_dynamic_yarn(model, rotary)`` then swaps transformers' rotary module for ``DynamicYarnRotaryEmbedding``, which uses
s = max(1, n/L) per forward, n = the longest position in each row + 1:

- up to L it is plain RoPE (s = 1, attention scale 1); at n = L*s it equals static YaRN at s;
- it is stateless: unlike transformers' ``dynamic`` type, earlier batches do not change later results, and each row
  of a batch gets its own s (in packed rows, whose positions restart per document, the longest document sets s);
- with a KV cache, keys cached at an earlier step keep the s they were rotated with (the cache stores rotated keys);
  for exact dynamic scaling, score whole sequences (evaluation, prefill) rather than generate token by token.

The attention scale multiplies cos and sin here, as transformers' rotary modules do; it is applied nowhere else.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from ropescale.apply import head_dim_of, layer_tables, partial_rotary_factor_of, rope_of
from ropescale.methods import ROPE_METHODS, RopeConfigError, rotary_dim, validate_method


class DynamicYarnRotaryEmbedding(nn.Module):
    """Drop-in for transformers' ``*RotaryEmbedding``: ``forward(x, position_ids) -> (cos, sin)``.

    ``position_ids``: ``[B, T]``; ``cos``, ``sin``: ``[B, T, rotary_dim]`` in ``x.dtype``, already multiplied by the
    attention scale of each row's s.
    """

    def __init__(self, head_dim: int, base: float, partial_rotary_factor: float, original_len: int,
                 params: dict | None = None, interleaved: bool = False):
        super().__init__()
        self.args = (head_dim, float(base), float(partial_rotary_factor), int(original_len))
        self.params, self.interleaved = dict(params or {}), interleaved
        validate_method("dynamic_yarn", 1.0, self.params, int(original_len),
                        rotary_dim=rotary_dim(head_dim, partial_rotary_factor))
        inv_freq, _ = self._yarn(None)
        # The table at s = 1, for code that reads the module's inv_freq (shape, device); forward recomputes.
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _yarn(self, seq_len: int | None) -> tuple[torch.Tensor, float]:
        return ROPE_METHODS["dynamic_yarn"].fn(*self.args, 1.0, self.params, seq_len=seq_len)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = (position_ids.max(dim=-1).values + 1).tolist()  # [B]
        tables = {n: self._yarn(int(n)) for n in set(lengths)}
        inv_freq = torch.stack([tables[n][0] for n in lengths]).to(x.device)  # [B, rotary_dim/2]
        scale = torch.tensor([tables[n][1] for n in lengths], device=x.device)[:, None, None]  # [B, 1, 1]
        freqs = position_ids[..., None].float() * inv_freq[:, None, :]  # [B, T, rotary_dim/2]
        # the layout of the module it replaces: two halves (Llama), or each frequency twice in a row (Cohere)
        emb = freqs.repeat_interleave(2, dim=-1) if self.interleaved else torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scale).to(x.dtype), (emb.sin() * scale).to(x.dtype)


def dynamic_yarn_rotary(config, interleaved: bool = False) -> DynamicYarnRotaryEmbedding:
    """The runtime module for a config written by ``apply_rope(config, "dynamic_yarn", ...)``; ``interleaved``: the
    table layout of the model's own rotary module (models.families)."""
    cur = rope_of(config)
    if cur["method"] != "dynamic_yarn":
        raise RopeConfigError(f"this config carries RoPE method '{cur['method']}', not dynamic_yarn; write one with "
                              "apply_rope(config, 'dynamic_yarn', factor) before building the model")
    if layer_tables(config) is not None:
        raise RopeConfigError("dynamic_yarn swaps the model's one rotary module, and this model has one RoPE per "
                              "layer type (Gemma 3, OLMo 3); use yarn (static) on its full-attention layers")
    return DynamicYarnRotaryEmbedding(head_dim_of(config), cur["rope_theta"], partial_rotary_factor_of(config),
                                      cur["original_max_position_embeddings"], cur["params"], interleaved)


def enable_dynamic_yarn(model: PreTrainedModel, rotary: str, interleaved: bool = False) -> PreTrainedModel:
    """Swap every rotary module of ``model`` (named ``rotary``: models.families says where each family keeps it) for
    the dynamic YaRN one, in place; returns ``model``. Raises ``RopeConfigError`` unless ``model.config`` was written
    for dynamic_yarn."""
    module = dynamic_yarn_rotary(model.config, interleaved)
    swapped = 0
    for name, child in list(model.named_modules()):
        if name.split(".")[-1] == rotary:
            parent = model.get_submodule(name.rpartition(".")[0])
            ref = next(iter(child.buffers()), None)
            setattr(parent, rotary, module.to(ref.device) if ref is not None else module)
            swapped += 1
    if not swapped:
        raise RopeConfigError(f"no rotary module named '{rotary}' found in {type(model).__name__}; "
                              "models/families.py names each family's")
    return model
