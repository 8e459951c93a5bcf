"""Which attention heads answer a passkey prompt, and at which key-to-question distances they stop finding the key.

    python bench/passkey_heads.py                                        # the committed testbed base at its native L
    python bench/passkey_heads.py --model runs/testbed/model --length 1024 --depths 0,0.2,0.4,0.6,0.8,1 --trials 2

Each prompt is the evaluation's own (eval.passkey.build_prompt, the same keys as `python -m eval.passkey` with seed 0)
followed by its true answer; the model reads it once with eager attention, teacher-forced. Per prompt it prints
the key-to-question distance in tokens, whether the argmax predicts the answer's first digit and how many of the other
four it predicts, and for the two heads that matter most the share of their attention (from the answer positions)
that lands on the key's digits: the *find* head, whose attention from the position before the first digit lands most
on the key (finding digits among filler: a match by content), and the *copy* head, the same for the positions before
digits 2-5 (an induction head: find the digit just written and copy the one after it). A copy head whose share comes
and goes with distance (found at one distance, lost at a longer and a shorter one) matches on rotary pairs that turn
within the window, not on content alone. Printed as markdown; per head, the mean share over all prompts.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eval.common import load_eval_model  # noqa: E402
from eval.passkey import build_prompt, pass_key  # noqa: E402
from ropescale.theory import frequencies, spectrum  # noqa: E402
from utils.cli import exit_process  # noqa: E402


@torch.inference_mode()
def read_prompt(model, tokenizer, length: int, depth: float, trial: int) -> dict:
    """One prompt and its answer: distance, digits predicted, attention shares [layers, heads] on the key's digits from
    the position before the first answer digit (``find``) and, averaged, before digits 2-5 (``copy``)."""
    key = pass_key(0, length, depth, trial)
    p = build_prompt(tokenizer, length, depth, key, 8)
    ids = tokenizer(p.text + " " + key + ".").input_ids
    if ids[: len(p.ids)] != p.ids:
        raise SystemExit("the tokenizer merges the prompt with its answer; this bench expects them apart")
    captured: dict = {}
    hooks = [getattr(layer.self_attn, name).register_forward_hook(
        lambda _m, _i, o, key=(i, name): captured.__setitem__(key, o[0]))
        for i, layer in enumerate(model.model.layers) for name in ("q_proj", "k_proj")]
    try:
        out = model(torch.tensor([ids]), output_attentions=True)
    finally:
        for h in hooks:
            h.remove()
    pred = out.logits[0].argmax(-1)  # pred[t] is the guess for ids[t + 1]
    digits = [t for t in range(len(p.ids), len(ids)) if tokenizer.decode([ids[t]]).strip().isdigit()][:5]
    key_digits = [t for t in range(p.key_position, len(p.ids)) if tokenizer.decode([ids[t]]).strip().isdigit()]
    if len(digits) != 5 or not key_digits:
        raise SystemExit(f"expected one token per digit of the key {key}; this tokenizer splits digits otherwise")
    att = torch.stack(out.attentions)[:, 0]  # [layers, heads, T, T]
    # the key is written twice (KEY_LINE): answer digit i's sources are digit i of either copy
    sources = [[j for j in (key_digits[i], key_digits[i + 5] if len(key_digits) > i + 5 else None) if j is not None]
               for i in range(5)]
    # [layers, heads, 5]: share of attention, from the position before answer digit i, on that digit in the key
    on_key = torch.stack([att[:, :, digits[i] - 1, sources[i]].sum(-1) for i in range(5)], -1)
    return {"distance": digits[0] - key_digits[0], "first": bool(pred[digits[0] - 1] == ids[digits[0]]),
            "rest": sum(int(pred[t - 1] == ids[t]) for t in digits[1:]),
            "find": on_key[:, :, 0], "copy": on_key[:, :, 1:].mean(-1),
            "att": att, "captured": captured, "digits": digits, "sources": sources}


def pair_scores(config, theta: torch.Tensor, q: torch.Tensor, k: torch.Tensor, head: int, query: int) -> torch.Tensor:
    """``[query + 1, head_dim / 2]``: each rotary pair's term of head ``head``'s attention logit from position
    ``query`` to every position up to it. q ``[T, heads * head_dim]`` and k ``[T, kv_heads * head_dim]`` are the
    projections before RoPE; pair j is dimensions (j, j + head_dim / 2) (transformers' rotate_half layout) turning at
    ``theta[j]`` per token, so its term is A cos(theta_j d) - B sin(theta_j d) for distance d, with
    A + iB = q_j conj(k_j) (complex q_j + i q_{j+h}); the terms sum to the logit before softmax (over sqrt(hd))."""
    hd = config.head_dim
    keys = torch.arange(query + 1)
    kv = head // (config.num_attention_heads // config.num_key_value_heads)
    half = hd // 2
    qh = q[query, head * hd:(head + 1) * hd].double()
    kh = k[keys, kv * hd:(kv + 1) * hd].double()  # [K, hd]
    a = qh[:half] * kh[:, :half] + qh[half:] * kh[:, half:]
    b = qh[half:] * kh[:, :half] - qh[:half] * kh[:, half:]
    d = (query - keys).double()[:, None] * theta.double()[None]
    return (a * torch.cos(d) - b * torch.sin(d)) / hd ** 0.5


def copy_terms(config, r: dict, layer: int, head: int) -> dict:
    """The copy head's logit on the digit it should copy (the key digit after the one just written), split by
    NTK-by-parts region (pairs that turn > beta times within the native L, < alpha times, the ramp), mean over answer
    digits 2-5, and its margin over the mean logit on every other position; checked against the model's attention."""
    q, k = r["captured"][(layer, "q_proj")], r["captured"][(layer, "k_proj")]
    hd = config.head_dim
    theta, _ = frequencies(hd, config.rope_parameters["rope_theta"], config.max_position_embeddings, "none", 1.0)
    turns = config.max_position_embeddings * theta.double() / (2 * torch.pi)
    sp = spectrum(hd, config.rope_parameters["rope_theta"], config.max_position_embeddings)
    regions = {"high": turns > sp["beta"], "low": turns < sp["alpha"]}
    regions["ramp"] = ~(regions["high"] | regions["low"])
    terms = {name: 0.0 for name in regions} | {"margin": 0.0}
    for i, t in enumerate(r["digits"][1:], start=1):
        query = t - 1
        per_key = pair_scores(config, theta, q, k, head, query)  # [query + 1, pairs]
        logits = per_key.sum(-1)
        probs = torch.softmax(logits, -1).float()
        if not torch.allclose(probs, r["att"][layer, head, query, : query + 1], atol=2e-3):
            raise SystemExit("the rotary terms do not add up to the model's attention: this bench assumes Llama's "
                             "attention (rotate_half RoPE, no query/key norm, 1/sqrt(head_dim) scaling)")
        sources = r["sources"][i]
        src = max(sources, key=lambda j: float(probs[j]))
        per_pair = per_key[src]
        for name, mask in regions.items():
            terms[name] += float(per_pair[mask].sum()) / 4
        others = torch.ones(query + 1, dtype=torch.bool)
        others[sources] = False
        terms["margin"] += float(logits[src] - logits[others].mean()) / 4
    return terms


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/testbed", help="a model folder, run folder or name")
    ap.add_argument("--length", type=int, default=None, help="prompt length in tokens (default: the model's native)")
    ap.add_argument("--depths", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1", help="key depths, 0 to 1")
    ap.add_argument("--trials", type=int, default=2, help="prompts per depth (keys differ, filler is the same)")
    args = ap.parse_args(argv)
    try:
        depths = [float(d) for d in args.depths.split(",")]
    except ValueError:
        ap.error(f"--depths takes comma-separated numbers, got {args.depths!r}")
    if any(not 0 <= d <= 1 for d in depths) or not 1 <= args.trials <= 100:
        ap.error("--depths must lie in 0-1 and --trials in 1-100")
    em = load_eval_model(args.model, {}, "float32")
    em.model.set_attn_implementation("eager")  # attention weights are returned by the eager path only
    length = args.length or em.model.config.max_position_embeddings
    if not 64 <= length <= 1_000_000:
        ap.error(f"--length must be 64-1000000 tokens, got {length}")
    t0 = time.perf_counter()
    rows = [read_prompt(em.model, em.tokenizer, length, d, t) for d in depths for t in range(args.trials)]
    find = torch.stack([r["find"] for r in rows]).mean(0)  # [layers, heads]
    copy = torch.stack([r["copy"] for r in rows]).mean(0)
    f, c = divmod(int(find.argmax()), find.shape[1]), divmod(int(copy.argmax()), copy.shape[1])
    print(f"`python {' '.join(sys.argv)}`: {len(rows)} prompts of {length} tokens, fp32, "
          f"{time.perf_counter() - t0:.0f} s\n")
    print(f"| depth | distance | first digit | digits 2-5 | find head L{f[0]}H{f[1]} | copy head L{c[0]}H{c[1]} | "
          "copy logit on the source: high / ramp / low pairs | margin over the rest |")
    print("|---|---|---|---|---|---|---|---|")
    for (d, _), r in zip([(d, t) for d in depths for t in range(args.trials)], rows):
        terms = copy_terms(em.model.config, r, *c)
        print(f"| {d:g} | {r['distance']} | {'yes' if r['first'] else 'no'} | {r['rest']}/4 | "
              f"{float(r['find'][f]):.2f} | {float(r['copy'][c]):.2f} | {terms['high']:+.1f} / {terms['ramp']:+.1f} / "
              f"{terms['low']:+.1f} | {terms['margin']:+.1f} |")
    print("\n| head | find share (mean) | copy share (mean) |\n|---|---|---|")
    for layer in range(find.shape[0]):
        for head in range(find.shape[1]):
            print(f"| L{layer}H{head} | {float(find[layer, head]):.2f} | {float(copy[layer, head]):.2f} |")
    return 0


if __name__ == "__main__":
    exit_process(main())
