"""Perplexity at long context lengths, with the definition written next to every number.

Two definitions, because the field uses both and their numbers are not comparable:

- ``sliding`` (YaRN's GovReport table, LongLoRA's tables): the documents' tokens are joined into one stream (EOS
  between documents); windows of ``length`` tokens start every ``stride`` tokens, the last one ending at the end of
  the stream; each token is scored once, in the first window that reaches it, so every token after the first window
  sees at least ``length - stride`` tokens of context.
- ``truncate`` (YaRN's proof-pile table): each document of at least ``length`` tokens is cut to its first ``length``
  tokens and scored as one window; shorter documents are skipped.

Both report ``ppl = exp(sum of token NLL / number of scored tokens)``. Scoring runs without gradients and without a KV
cache, and the LM head only ever sees the scored positions, in chunks (``models.loss``): the ``[length, vocab]``
logits never exist. Besides one perplexity per length, the first window at the longest length is kept per token and
averaged in position buckets: how the loss behaves before and past the model's original context.

    python -m eval.perplexity --model smollm2-135m --rope yarn --factor 2 --lengths 4096,8192,16384 --mode truncate
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from eval.common import EvalError, EvalModel, Timer, length_axis, log, plot_lines
from eval.task import EvalTask, task_main
from models.loss import IGNORE_INDEX, causal_lm_parts, chunked_causal_lm_loss
from utils.cli import exit_process, run_cli
from utils.files import save_figure, user_path, write_atomic, write_json
from utils.schema import MAX_TOKENS, Length, StrictModel

MODES = ("sliding", "truncate")
DEFINITIONS = {
    "sliding": (
        "sliding: documents joined into one token stream (EOS between documents); windows of `length` tokens every "
        "`stride` tokens (the last ends at the stream's end); each token scored once, in the first window that "
        "reaches it, so tokens after the first window see >= length - stride tokens of context; "
        "ppl = exp(sum of token NLL / scored tokens)"
    ),
    "truncate": (
        "truncate: each document with >= `length` tokens cut to its first `length` tokens and scored as one window "
        "(shorter documents skipped); ppl = exp(sum of token NLL / scored tokens)"
    ),
}


class PerplexitySettings(StrictModel):
    """The ``eval.perplexity`` section and ``python -m eval.perplexity``'s options."""

    lengths: list[Length] = Field(default=[2048, 4096, 8192, 16384, 32768], min_length=1)
    """Window lengths in tokens."""
    mode: Literal[MODES] = "sliding"
    """The perplexity definition (see the module docstring)."""
    stride: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    """Sliding stride in tokens (sliding only; default: half the length)."""
    data: list[str] = Field(default=["bundled"], min_length=1)
    """'bundled' (the bundled held-out split, which training never reads), local .txt/.jsonl files or folders, or
    one dataset name."""
    split: str = "test"
    """Dataset split (dataset names only)."""
    text_field: str = "text"
    """Text column (datasets, .jsonl)."""
    max_docs: int | None = Field(default=None, ge=1, le=10**9)
    """Use at most this many documents."""
    batch_size: int = Field(default=1, ge=1, le=4096)
    """Windows per forward."""
    chunk_size: int = Field(default=1024, ge=1, le=MAX_TOKENS)
    """Positions per LM-head chunk."""
    buckets: int = Field(default=16, ge=1, le=4096)
    """Position buckets of the loss curve over the longest window."""
    max_tokens: int | None = Field(default=None, ge=2, le=2**40)
    """Sliding only: score the stream's first N tokens (a quicker estimate; default: all)."""

    @model_validator(mode="after")
    def _consistent(self):
        if self.mode == "truncate" and self.stride is not None:
            raise ValueError("stride applies to mode sliding only; truncate scores one window per document")
        if self.stride is not None and self.stride >= min(self.lengths):
            # stride = length would score each window's first token with no context at all
            raise ValueError(f"stride must be below the shortest length ({min(self.lengths)}), got {self.stride}")
        if self.max_tokens is not None and (self.mode != "sliding" or self.max_tokens < max(self.lengths)):
            raise ValueError(f"max_tokens applies to mode sliding only and must be at least the longest length "
                             f"({max(self.lengths)}), got {self.max_tokens} with mode {self.mode}")
        data_source(self.data)
        return self


def plan_windows(n_tokens: int, length: int, stride: int) -> list[tuple[int, int, int]]:
    """Sliding windows over a stream of ``n_tokens``: ``(begin, end, score_from)`` per window.

    The window feeds tokens ``[begin, end)`` and scores the predictions of tokens ``[score_from, end)``. Every token
    but the first is scored exactly once; a token scored in a window other than the first has at least
    ``length - stride`` tokens of that window before it. All windows have ``min(length, n_tokens)`` tokens.
    """
    if not 1 <= stride < length:
        # stride = length would score each window's first token with no context at all
        raise EvalError(f"stride must be between 1 and the length - 1 ({length - 1}), got {stride}")
    if n_tokens < 2:
        return []
    if n_tokens <= length:
        return [(0, n_tokens, 1)]
    windows = [(0, length, 1)]
    while windows[-1][1] < n_tokens:
        begin = min(windows[-1][0] + stride, n_tokens - length)
        windows.append((begin, begin + length, windows[-1][1]))
    return windows


def tokenize_documents(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each document, with the tokenizer's own special-token convention (e.g. Llama-2 adds BOS)."""
    return [tokenizer(t, verbose=False).input_ids for t in texts]


def token_stream(docs: list[list[int]], eos: int | None) -> list[int]:
    """The documents' tokens end to end, ``eos`` between documents (none when the tokenizer has no EOS)."""
    out: list[int] = []
    for i, d in enumerate(docs):
        if i and eos is not None:
            out.append(eos)
        out.extend(d)
    return out


@torch.inference_mode()
def score(model, ids: torch.Tensor, windows: list[tuple[int, int, int]], batch_size: int = 1,
          chunk_size: int = 1024, keep_first: bool = False) -> dict:
    """Score ``windows`` (``plan_windows`` triples) over the token row ``ids`` ``[n]``.

    Windows of one size are batched ``batch_size`` at a time. Returns ``nll_sum`` (fp64 sum over scored tokens),
    ``tokens`` (scored), ``forward_tokens`` (fed), ``seconds``, and with ``keep_first`` the first window's per-token
    NLL ``first_nll`` ``[end - begin - 1]`` (0 where not scored).
    """
    decoder, head = causal_lm_parts(model)
    device = next(model.parameters()).device
    nll_sum = torch.zeros((), dtype=torch.float64)
    tokens = fed = 0
    first = None
    with Timer() as t:
        for i in range(0, len(windows), batch_size):
            group = windows[i : i + batch_size]  # plan_windows and truncate mode give windows of one size
            inputs = torch.stack([ids[b:e] for b, e, _ in group]).to(device)  # [B, size]
            labels = inputs.clone()
            for row, (b, _, s) in enumerate(group):
                labels[row, : s - b] = IGNORE_INDEX  # predictions of tokens before score_from are not scored
            hidden = decoder(input_ids=inputs, use_cache=False).last_hidden_state  # [B, size, H]
            nll = chunked_causal_lm_loss(hidden, head, labels, chunk_size=chunk_size, reduction="none")
            nll_sum += nll.double().sum().cpu()
            tokens += int((labels[:, 1:] != IGNORE_INDEX).sum())
            fed += inputs.numel()
            if keep_first and first is None:
                first = nll[0].cpu()
    out = dict(nll_sum=float(nll_sum), tokens=tokens, forward_tokens=fed, seconds=t.seconds)
    if keep_first:
        out["first_nll"] = first
    return out


def ppl_of(mean_nll: float) -> float | None:
    """exp(mean NLL); None (JSON null) where it overflows."""
    return math.exp(mean_nll) if mean_nll < 709.0 else None


def position_buckets(nll: torch.Tensor, n_buckets: int) -> list[dict]:
    """Mean NLL of ``nll`` ``[T-1]`` (entry t = prediction of token t+1) in ``n_buckets`` equal position ranges.

    Positions are those of the predicted tokens (1 to T-1), so a bucket's ``start``/``end`` are token positions.
    """
    T = nll.numel() + 1
    edges = [round(1 + k * (T - 1) / n_buckets) for k in range(n_buckets + 1)]
    out = []
    for lo, hi in zip(edges, edges[1:]):
        if hi > lo:
            mean = float(nll[lo - 1 : hi - 1].double().mean())
            out.append(dict(start=lo, end=hi, nll=mean, ppl=ppl_of(mean)))
    return out


def evaluate_perplexity(model, tokenizer, texts: list[str], lengths: list[int], mode: str = "sliding",
                        stride: int | None = None, batch_size: int = 1, chunk_size: int = 1024,
                        n_buckets: int = 16, max_tokens: int | None = None) -> dict:
    """Perplexity of ``model`` on ``texts`` at each length (``mode``: see module). ``stride`` defaults to half the
    length (sliding only); ``max_tokens`` keeps the stream's first tokens only (sliding only: a quicker estimate on
    a prefix of the data). Returns ``ppl`` {length: value}, per-length ``results`` and the position ``buckets``."""
    if mode not in MODES:
        raise EvalError(f"--mode must be one of {', '.join(MODES)}, got '{mode}'")
    if mode == "truncate" and stride is not None:
        raise EvalError("--stride applies to --mode sliding only; truncate scores one window per document")
    if batch_size < 1:
        raise EvalError(f"--batch-size must be >= 1, got {batch_size}")
    if max_tokens is not None and (mode != "sliding" or max_tokens < max(lengths)):
        raise EvalError(f"--max-tokens applies to --mode sliding only and must be at least the longest length "
                        f"({max(lengths)}), got {max_tokens} with --mode {mode}")
    docs = tokenize_documents(tokenizer, texts)
    stream = torch.tensor(token_stream(docs, tokenizer.eos_token_id)) if mode == "sliding" else None
    if stream is not None and max_tokens is not None:
        stream = stream[:max_tokens]
    lengths = sorted(set(lengths))  # ascending: transformers' dynamic RoPE keeps the largest table it has seen
    results, first_nll = [], None
    for length in lengths:
        if mode == "sliding":
            if stream.numel() < length:
                raise EvalError(f"the data has {stream.numel()} tokens, fewer than the length {length}; "
                                "use more data or shorter --lengths")
            step = stride if stride is not None else max(1, length // 2)
            ids, windows, n_docs = stream, plan_windows(stream.numel(), length, step), len(docs)
        else:
            step = None
            rows = [torch.tensor(d[:length]) for d in docs if len(d) >= length]
            if not rows:
                raise EvalError(f"no document has {length} tokens (longest: {max(map(len, docs), default=0)}); "
                                "truncate mode needs documents at least as long as the length")
            # The kept documents end to end; window k is document k's first `length` tokens.
            ids, n_docs = torch.cat(rows), len(rows)
            windows = [(k * length, (k + 1) * length, k * length + 1) for k in range(n_docs)]
        r = score(model, ids, windows, batch_size, chunk_size, keep_first=length == lengths[-1])
        first_nll = r.pop("first_nll", first_nll)
        mean = r["nll_sum"] / r["tokens"]
        results.append(dict(
            length=length, stride=step, ppl=ppl_of(mean), nll_mean=mean, documents=n_docs, windows=len(windows), **r,
            tokens_per_s=round(r["forward_tokens"] / r["seconds"], 1),
            scored_tokens_per_s=round(r["tokens"] / r["seconds"], 1),
        ))
        log(f"perplexity length {length}: ppl {results[-1]['ppl']} over {r['tokens']} tokens "
            f"({r['seconds']:.1f} s, {results[-1]['tokens_per_s']} tokens/s)")
    return dict(
        ppl={str(r["length"]): r["ppl"] for r in results},
        results=results,
        positions=dict(length=lengths[-1], buckets=position_buckets(first_nll, n_buckets)),
    )


def data_source(data: list[str]) -> str:
    """What ``data`` names: ``bundled``, ``files`` (every path exists) or ``dataset`` (one name without a suffix);
    EvalError otherwise."""
    if data == ["bundled"]:
        return "bundled"
    if not data:
        raise EvalError("data names nothing; give 'bundled', existing files, or one dataset name")
    if all(user_path(d).exists() for d in data):
        return "files"
    if len(data) == 1 and not Path(data[0]).suffix:
        return "dataset"
    missing = [d for d in data if not user_path(d).exists()]
    raise EvalError(f"data file not found: {', '.join(missing)} (give 'bundled', existing files, or one dataset "
                    "name)")


def load_texts(data: list[str], split: str = "test", text_field: str = "text", max_docs: int | None = None,
               ) -> tuple[list[str], str]:
    """The documents to score and a description: ``["bundled"]`` (the bundled held-out split), local files (``.txt``
    = one document; ``.jsonl`` = one document per line, in ``text_field``; a folder = its .txt/.jsonl files), or one
    dataset name for ``datasets.load_dataset``."""
    source = data_source(data)
    if source == "bundled":
        from data.corpus import load_corpus

        docs = load_corpus("heldout")
        texts, desc = [d.text for d in docs], "bundled held-out split (" + ", ".join(d.name for d in docs) + ")"
    elif source == "files":
        texts, desc = _read_files([user_path(d) for d in data], text_field), "files: " + ", ".join(data)
    else:
        texts, desc = load_hub_texts(data[0], split, text_field), f"dataset {data[0]} split {split}"
    texts = [t for t in texts if t.strip()][:max_docs]
    if not texts:
        raise EvalError(f"--data {' '.join(data)}: no non-empty documents found")
    return texts, desc


def _read_files(paths: list[Path], text_field: str) -> list[str]:
    texts = []
    for p in paths:
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.suffix in (".txt", ".jsonl"))
            if not files:
                raise EvalError(f"--data: {p} holds no .txt or .jsonl files")
            texts += _read_files(files, text_field)
        elif p.suffix == ".jsonl":
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        texts.append(json.loads(line)[text_field])
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise EvalError(f"--data: {p}:{n} is not a JSON object with a '{text_field}' field "
                                        "(set --text-field)") from None
        else:
            texts.append(p.read_text(encoding="utf-8"))
    return texts


def load_hub_texts(name: str, split: str, text_field: str) -> list[str]:
    """The ``text_field`` column of ``datasets.load_dataset(name, split=split)`` (a hub id or a local dataset dir)."""
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many types (connection, not found, bad split)
        raise EvalError(f"could not load dataset '{name}' split '{split}' ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); check the name and network, or pass local "
                        "files to --data") from None
    if text_field not in ds.column_names:
        raise EvalError(f"dataset '{name}' has no column '{text_field}' (columns: {', '.join(ds.column_names)}); "
                        "set --text-field")
    return list(ds[text_field])


def perplexity_markdown(result: dict) -> str:
    m, s = result["model"], result["settings"]
    lines = [
        f"# Perplexity: {m['label']}",
        "",
        f"Model `{m['model']}`, method {m['method']} x{m['factor']:g}, dtype {m['dtype']}; data: {s['data']}"
        + (f" (its first {s['max_tokens']:,} tokens)" if s.get("max_tokens") else "") + f"; mode **{s['mode']}**.",
        "",
        "| length | stride | ppl | scored tokens | windows | seconds | tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["results"]:
        ppl = f"{r['ppl']:.3f}" if r["ppl"] is not None else "inf"
        lines.append(f"| {r['length']} | {r['stride'] or '-'} | {ppl} | {r['tokens']} | {r['windows']} | "
                     f"{r['seconds']:.1f} | {r['tokens_per_s']} |")
    pos = result["positions"]
    lines += ["", f"Definition: {result['definition']}.", "",
              f"Loss by position, first window at {pos['length']} tokens (original context "
              f"{m['original_context']}):", "", "| positions | mean NLL | ppl |", "|---|---|---|"]
    for b in pos["buckets"]:
        ppl = f"{b['ppl']:.3f}" if b["ppl"] is not None else "inf"
        lines.append(f"| {b['start']}-{b['end'] - 1} | {b['nll']:.4f} | {ppl} |")
    return "\n".join(lines) + "\n"


def write_perplexity(result: dict, folder: Path) -> None:
    """perplexity.json, perplexity.md and perplexity.png (ppl by length; NLL by position) in ``folder``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    rs = [r for r in result["results"] if r["ppl"] is not None]
    ax1.plot([r["length"] for r in rs], [r["ppl"] for r in rs], marker="o")
    length_axis(ax1, [r["length"] for r in rs])
    ax1.set_xlabel("context length (tokens)")
    ax1.set_ylabel(f"perplexity ({result['settings']['mode']})")
    ax1.set_title(f"perplexity: {result['model']['label']}", fontsize=10)
    buckets = result["positions"]["buckets"]
    ax2.plot([(b["start"] + b["end"]) / 2 for b in buckets], [b["nll"] for b in buckets], marker=".")
    ax2.axvline(result["model"]["original_context"], color="grey", linestyle="--", label="original context")
    ax2.set_xlabel(f"token position (first {result['positions']['length']}-token window)")
    ax2.set_ylabel("mean NLL")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    save_figure(fig, folder / "perplexity.png")
    write_atomic(folder / "perplexity.md", perplexity_markdown(result))
    write_json(folder / "perplexity.json", result)


def run(em: EvalModel, s: PerplexitySettings) -> dict:
    """``EvalTask.run``: perplexity of a loaded model with settings ``s``."""
    texts, desc = load_texts(s.data, s.split, s.text_field, s.max_docs)
    log(f"perplexity: {em.info['label']} ({em.info['model']}), {desc}, mode {s.mode}")
    with torch.inference_mode():
        raw = evaluate_perplexity(em.model, em.tokenizer, texts, s.lengths, s.mode, s.stride, s.batch_size,
                                  s.chunk_size, s.buckets, s.max_tokens)
    return dict(
        kind="perplexity", model=em.info,
        settings=dict(data=desc, mode=s.mode, stride=s.stride, lengths=sorted(set(s.lengths)),
                      batch_size=s.batch_size, chunk_size=s.chunk_size, max_tokens=s.max_tokens),
        definition=DEFINITIONS[s.mode], **raw,
        seconds=round(sum(r["seconds"] for r in raw["results"]), 3),
    )


def plot(entries: list[tuple[dict, dict]], path: Path) -> None:
    """``eval.compare``'s picture: perplexity against length, one line per run."""
    modes = sorted({result["settings"]["mode"] for _, result in entries})
    plot_lines(entries, "ppl", f"perplexity ({', '.join(modes)})", "perplexity by context length", path)


EVAL_TASK = EvalTask(
    name="perplexity",
    module="eval.perplexity",  # not __name__: that is "__main__" under `python -m`
    description="Perplexity at long context lengths (sliding windows or truncated documents; eval/perplexity.py).",
    settings=PerplexitySettings,
    run=run,
    write=write_perplexity,
    summary=lambda result: {f"ppl@{n}": v for n, v in result["ppl"].items()},
    metrics=lambda s: [f"ppl@{n}" for n in sorted(set(s.lengths))],
    goal="minimize",
    objective=lambda s: f"ppl@{max(s.lengths)}",
    files=("perplexity.json", "perplexity.md", "perplexity.png"),
    formats=(("ppl@", ".3f"),),
    describe=lambda result: {"ppl_mode": result["settings"]["mode"]},
    plot=plot,
    renamed={"perplexity_lengths": "lengths", "perplexity_mode": "mode", "stride": "stride"},
)


def main(argv: list[str] | None = None) -> dict:
    return task_main(EVAL_TASK, argv, __doc__)


if __name__ == "__main__":
    exit_process(run_cli(main))
