"""What the loaders users serve with read of a saved config, and the keys that make each compute what we trained.

Five loaders are described (docs/serving.md has the matrix, with the file and line of each loader's code it rests
on and the version read):

- ``transformers-5`` reads ``rope_parameters`` (and, when config.json also has a ``rope_scaling`` key, takes that
  one instead);
- ``transformers-4`` (4.57) reads only the legacy ``rope_scaling`` dict and the top-level ``rope_theta`` (and, for
  longrope, a top-level ``original_max_position_embeddings``); without them it loads the model unscaled;
- ``vllm`` (0.34) and ``sglang`` (0.5.23) read the rope dict through transformers. vLLM's YaRN takes
  ``attention_factor``; SGLang's multiplies ``0.1 ln s + 1`` by ``attn_factor`` and never reads
  ``attention_factor`` (nor did vLLM before its YaRN learned that key), so a method with another attention scale
  (NTK-by-parts: 1) also carries an ``attn_factor`` key, which vLLM 0.34 ignores. vLLM's dynamic NTK keeps the
  base (served unscaled), SGLang's is computed once, at the target length;
- ``llama.cpp`` reads GGUF metadata (``models.gguf_export``): ``rope.scaling.type`` none / linear / yarn, the YaRN
  correction range fixed at beta_fast 32, beta_slow 1, truncated, and ``rope.scaling.attn_factor`` multiplying its
  own ``0.1 ln s + 1``; any other static per-pair table goes in as a ``rope_freqs`` tensor (a divisor per pair).

``serving_config`` adds the legacy keys to a config.json dict (``write_serving_files`` writes it and SERVING.md next to
the weights); ``check_legacy_keys`` refuses a config.json whose ``rope_scaling`` disagrees with its
``rope_parameters`` (a stale or hand-edited copy, which transformers 5 would load silently);
``compatibility`` says, per loader, whether it computes exactly what we trained; ``llama_cpp_rope`` gives the GGUF
metadata, or raises with the reason and what to use instead.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ropescale.apply import RECORD, head_dim_of, partial_rotary_factor_of, rope_of
from ropescale.methods import ROPE_METHODS, RopeConfigError, mscale, rotary_dim, servers_attn_factor
from utils.files import write_atomic

EXACT, APPROXIMATE, UNSUPPORTED, UNCHECKED = "exact", "approximate", "unsupported", "not checked"

# The loaders, with the version whose code the verdicts were read from (docs/serving.md cites file and line).
LOADERS = {
    "transformers-5": "transformers 5.24.0",
    "transformers-4": "transformers 4.57.1",
    "vllm": "vLLM 0.34.0",
    "sglang": "SGLang 0.5.23",
    "llama.cpp": "llama.cpp as vendored by llama-cpp-python 0.3.36",
}

# Keys of rope_parameters that live elsewhere in a transformers-4 config: the base is the top-level rope_theta, a
# partial rotary factor the top-level partial_rotary_factor.
_NOT_LEGACY = ("rope_theta", "partial_rotary_factor")


@dataclass(frozen=True)
class Verdict:
    """One loader's reading of one saved config: ``status`` exact / approximate / unsupported, and ``why``
    (what it computes instead, and what to use)."""

    loader: str
    status: str
    why: str = ""


def per_layer_type(rope_parameters: dict) -> bool:
    """Whether ``rope_parameters`` holds one dict per layer type (Gemma 3's full/sliding) instead of one RoPE."""
    return any(isinstance(v, dict) for v in rope_parameters.values())


def legacy_rope_scaling(rope_parameters: dict) -> dict | None:
    """The ``rope_scaling`` dict loaders before transformers 5 read (None for an unscaled ``default`` type)."""
    if rope_parameters.get("rope_type", "default") == "default":
        return None
    return {k: v for k, v in rope_parameters.items() if k not in _NOT_LEGACY}


def serving_config(raw: dict) -> dict:
    """``raw`` (a config.json dict with ``rope_parameters``) plus the keys older loaders read: ``rope_scaling``
    (equal to rope_parameters less the base, which stays the top-level ``rope_theta``) and, for longrope, a top-level
    ``original_max_position_embeddings`` (transformers 4.57's longrope reads the original length there, and
    otherwise takes max_position_embeddings, the target, for it); a ``partial_rotary_factor`` is mirrored at the top
    level; a yarn type whose explicit attention_factor differs from the servers' default gets ``attn_factor``
    (``servers_attn_factor``) in both dicts. A config with one rope dict per layer type is returned as it is."""
    rp = raw.get("rope_parameters")
    if not isinstance(rp, dict) or raw.get("model_type") is None:
        raise RopeConfigError("serving_config needs a config.json dict with model_type and rope_parameters")
    out = dict(raw)
    if per_layer_type(rp):
        return out  # one dict per layer type (Gemma 3): transformers 4 spells these differently; nothing to mirror
    if rp.get("rope_type") == "yarn":  # the key SGLang reads for the attention factor (idempotent)
        rp = {**rp, **servers_attn_factor(rp, float(rp["factor"]))}
        out["rope_parameters"] = rp
    out["rope_theta"] = rp["rope_theta"]
    if "partial_rotary_factor" in rp:  # transformers 4 reads it at the top level only
        out["partial_rotary_factor"] = rp["partial_rotary_factor"]
    legacy = legacy_rope_scaling(rp)
    if legacy is None:
        out.pop("rope_scaling", None)
    else:
        out["rope_scaling"] = legacy
    if rp.get("rope_type") == "longrope":
        out["original_max_position_embeddings"] = rp["original_max_position_embeddings"]
    return out


def check_legacy_keys(raw: dict, where: str) -> None:
    """Raise ``RopeConfigError`` when config.json (``raw``) has ``rope_parameters`` and a legacy copy that says
    something else: a ``rope_scaling`` (transformers 5 would load it and silently drop the other), or a top-level
    ``rope_theta`` / ``partial_rotary_factor`` (what transformers 4 reads, and transformers 5 next to a
    ``rope_scaling``). A config with only one of them (every transformers-4 config on the hub has only
    ``rope_scaling``) passes."""
    rp, legacy = raw.get("rope_parameters"), raw.get("rope_scaling")
    if not isinstance(rp, dict) or per_layer_type(rp):
        return
    fix = ("delete the legacy keys from it, then `python -m ropescale export FOLDER --write-config` writes ones that "
           "agree")
    for key in _NOT_LEGACY:
        top = raw.get(key, legacy.get(key) if isinstance(legacy, dict) else None)
        if top is not None and key in rp and top != rp[key]:
            raise RopeConfigError(f"{where}: the legacy {key} {top} disagrees with rope_parameters' {rp[key]}; "
                                  f"{fix}")
    if legacy is None:
        return
    want = legacy_rope_scaling(rp)
    got = {k: v for k, v in legacy.items() if k not in _NOT_LEGACY} if isinstance(legacy, dict) else legacy
    if isinstance(got, dict) and "type" in got and "rope_type" not in got:
        got = {("rope_type" if k == "type" else k): v for k, v in got.items()}
    if got != want:
        raise RopeConfigError(f"{where}: rope_scaling {legacy} disagrees with rope_parameters {rp}; transformers 5 "
                              f"would load rope_scaling and ignore the other. Fix: {fix}")


def _record(config) -> dict:
    cur = rope_of(config)
    p = {**ROPE_METHODS[cur["method"]].defaults, **cur["params"]}
    return {**cur, "params": p}


def compatibility(config) -> list[Verdict]:
    """One ``Verdict`` per loader in ``LOADERS`` for a config ``apply_rope`` wrote (or any config ``rope_of``
    reads), assuming config.json carries the keys ``serving_config`` adds (docs/serving.md cites the code). A config
    with one table per layer type (Gemma 3, OLMo 3) or written as LongRoPE factors (Phi-3) is ``not checked`` for
    every loader but transformers 5 (the tests reload those in it)."""
    cur = _record(config)
    method, s, L = cur["method"], cur["factor"], cur["original_max_position_embeddings"]
    record = getattr(config, RECORD, None) or {}
    unread = ("one rope_parameters dict per layer type" if per_layer_type(config.rope_parameters) else
              "the method written as LongRoPE factors (an architecture that accepts no other type)"
              if record.get("form") == "longrope" else None)
    if unread:  # the matrix below was read for one global table in the method's own type
        return [Verdict(loader, EXACT if loader == "transformers-5" else UNCHECKED,
                        "" if loader == "transformers-5" else f"{unread}: how this loader reads it was not checked")
                for loader in LOADERS]
    out = []
    for loader in LOADERS:
        if loader == "llama.cpp":
            try:
                out.append(Verdict(loader, EXACT, llama_cpp_rope(config).how))
            except RopeConfigError as e:
                out.append(Verdict(loader, UNSUPPORTED, str(e)))
        elif method == "dynamic_yarn":
            out.append(Verdict(loader, APPROXIMATE, f"static YaRN at s = {s:g}: exact at the target length, not "
                                                    "below it (only ropescale.runtime recomputes s per length)"))
        elif method == "dynamic_ntk" and loader == "vllm":
            out.append(Verdict(loader, UNSUPPORTED, "served unscaled: vLLM's dynamic type sets the base to "
                                                    "b (s L / L - (s - 1))^(d/(d-2)) = b; use ntk_aware or yarn "
                                                    "(one fixed table)"))
        elif method == "dynamic_ntk" and loader == "sglang":
            out.append(Verdict(loader, APPROXIMATE, f"dynamic NTK computed once, at the target length {L * s:g} "
                                                    "(exact there only); use ntk_aware for one fixed table"))
        elif method == "longrope" and loader in ("vllm", "sglang") and "attention_factor" in cur["params"]:
            out.append(Verdict(loader, APPROXIMATE, "attention_factor not read: the multiplier is "
                                                    "sqrt(1 + ln s / ln L)"))
        elif method == "longrope" and loader == "vllm":
            out.append(Verdict(loader, APPROXIMATE, "long_factor for every length once the served context "
                                                    "exceeds L (short_factor never below it)"))
        else:
            out.append(Verdict(loader, EXACT))
    return out


# --- llama.cpp (GGUF) --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LlamaCppRope:
    """The RoPE part of a GGUF file: ``kv`` (key suffix after ``{arch}.`` -> value), ``freq_factors`` (the
    ``rope_freqs`` tensor, one divisor per rotary pair, or None) and ``how`` (one line)."""

    kv: dict
    freq_factors: list[float] | None
    how: str


def llama_cpp_rope(config) -> LlamaCppRope:
    """GGUF metadata under which llama.cpp computes the rotary tables and attention scale of ``config``.

    Native types where llama.cpp's own math is ours: none (any base), linear, yarn with beta_fast 32, beta_slow 1 and
    truncate (llama.cpp fixes those), its multiplier ``0.1 ln s + 1`` times ``rope.scaling.attn_factor``. Every
    other static per-pair method (NTK-by-parts, YaRN with other betas, Llama 3) as scaling type none with a
    ``rope_freqs`` divisor per pair and the attention scale in ``rope.scaling.attn_factor``. Raises
    ``RopeConfigError`` for the length-dependent methods, which llama.cpp cannot run.
    """
    cur = _record(config)
    method, s, L, p = cur["method"], cur["factor"], cur["original_max_position_embeddings"], cur["params"]
    spec = ROPE_METHODS[method]
    if spec.length_dependent:
        instead = {"dynamic_ntk": "ntk_aware (one fixed table) or yarn",
                   "dynamic_yarn": "yarn at the same s (what a plain transformers reload runs)",
                   "longrope": "one table: a static method, or LongRoPE's long factors as llama3-style freq factors"}
        raise RopeConfigError(f"llama.cpp cannot run {method}: its table depends on the current length and a GGUF "
                              f"holds one table; use {instead[method]}")
    hd, prf = head_dim_of(config), partial_rotary_factor_of(config)
    base = float(cur["rope_theta"])
    rp = config.rope_parameters
    if method in ("none", "ntk_aware", "theta"):
        return LlamaCppRope({"rope.freq_base": float(rp["rope_theta"]), "rope.scaling.type": "none"}, None,
                            f"rope.scaling.type none, rope.freq_base {float(rp['rope_theta']):g}")
    if method == "linear":
        return LlamaCppRope({"rope.freq_base": base, "rope.scaling.type": "linear", "rope.scaling.factor": s},
                            None, f"rope.scaling.type linear, factor {s:g}")
    inv, scale = spec.fn(hd, base, prf, L, s, p)
    native_yarn = (method == "yarn" and p["beta_fast"] == 32 and p["beta_slow"] == 1 and p["truncate"])
    if native_yarn:
        kv = {"rope.freq_base": base, "rope.scaling.type": "yarn", "rope.scaling.factor": s,
              "rope.scaling.original_context_length": int(L)}
        extra = scale / mscale(s)
        if not math.isclose(extra, 1.0, rel_tol=0, abs_tol=1e-12):
            kv["rope.scaling.attn_factor"] = extra
        return LlamaCppRope(kv, None, f"rope.scaling.type yarn, factor {s:g}, original context {L}"
                                      + (f", attn_factor {extra:.6g}" if "rope.scaling.attn_factor" in kv else ""))
    # theta_d / inv_freq_d in float64 from the float32 tables: llama.cpp divides its own theta_d by it.
    default, _ = ROPE_METHODS["none"].fn(hd, base, prf, L, 1.0, {})
    factors = (default.double() / inv.double()).tolist()
    kv = {"rope.freq_base": base, "rope.scaling.type": "none"}
    if scale != 1.0:
        kv["rope.scaling.attn_factor"] = scale
    n = rotary_dim(hd, prf) // 2
    return LlamaCppRope(kv, factors, f"rope_freqs ({n} per-pair divisors of {method} x{s:g}), scaling type none"
                                     + (f", attn_factor {scale:.6g}" if scale != 1.0 else ""))


# --- the files written next to the weights ------------------------------------------------------------------------


def serving_markdown(config, verdicts: list[Verdict]) -> str:
    """SERVING.md: what each loader computes for this model, in one table."""
    cur = _record(config)
    lines = [
        "# Serving this model",
        "",
        f"RoPE scaling: **{cur['method']}**, factor {cur['factor']:g}, original context "
        f"{cur['original_max_position_embeddings']}, target {config.max_position_embeddings} "
        f"(written by ropescale; `config.json` carries `rope_parameters`, the legacy `rope_scaling` and "
        f"`rope_theta`, and a provenance record `ropescale`).",
        "",
        "| loader (version read) | computes what was trained | note |",
        "|---|---|---|",
    ]
    for v in verdicts:
        lines.append(f"| {v.loader} ({LOADERS[v.loader]}) | {v.status} | {v.why} |")
    if "attn_factor" in config.rope_parameters:
        lines += ["", f"`attn_factor` {config.rope_parameters['attn_factor']:.6g} is the key SGLang reads for "
                  "YaRN's attention multiplier `(0.1 ln s + 1) * attn_factor` (SGLang reads it and not "
                  "`attention_factor`; vLLM 0.34 reads `attention_factor` and ignores it); transformers logs it as an "
                  "unrecognized key and ignores it."]
    lines += ["", "llama.cpp: `python -m ropescale export THIS_FOLDER --gguf model.gguf` writes a GGUF with the "
              "metadata above. The compatibility matrix and the code each verdict rests on: docs/serving.md in "
              "the ropescale repository."]
    return "\n".join(lines) + "\n"


def write_serving_files(folder: Path, config) -> list[Verdict]:
    """Rewrite ``folder/config.json`` with the legacy keys (``serving_config``) and write ``folder/SERVING.md``;
    both atomically. Returns the verdicts."""
    path = Path(folder) / "config.json"
    raw = json.loads(path.read_text())
    # a transformers-4 config.json has rope_scaling only: the loaded config's rope_parameters are the ones to keep
    raw.setdefault("rope_parameters", dict(config.rope_parameters))
    write_atomic(path, json.dumps(serving_config(raw), indent=2, sort_keys=True) + "\n")
    verdicts = compatibility(config)
    write_atomic(Path(folder) / "SERVING.md", serving_markdown(config, verdicts))
    return verdicts
